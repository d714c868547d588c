"""Loading the model to fine-tune: a local Hugging Face directory, a Hub id, a model saved by
`fastlora quantize`, or (no model given) the tiny Llama shipped in `fastlora/assets`."""

from __future__ import annotations

import json
import os
import re
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from ..model import ALL_LINEAR, _output_head
from .errors import TrainError

EMBEDDED_NAME = "fastlora/tiny-llama"
EMBEDDED_SEED = 0
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def assets_dir() -> Path:
    return Path(str(resources.files("fastlora") / "assets"))


def embedded_model_dir() -> Path:
    return assets_dir() / "tiny-llama"


def default_data_path() -> Path:
    return assets_dir() / "tiny_tasks.jsonl"


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return " ".join(lines)[:400] or type(exc).__name__


def _hf():
    try:
        import transformers
    except ImportError:
        raise TrainError("fastlora train needs transformers: pip install 'fastlora[hf]'") from None
    return transformers


def dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """`from_pretrained`/`from_config`'s dtype argument: `dtype` since transformers 4.56,
    `torch_dtype` before."""
    version = tuple(int(p) for p in re.findall(r"\d+", _hf().__version__)[:2])
    return {"dtype": dtype} if version >= (4, 56) else {"torch_dtype": dtype}


def load_tokenizer(source: str | Path):
    transformers = _hf()
    try:
        return transformers.AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TrainError(f"{source}: cannot load a tokenizer ({_one_line(exc)})") from None


def classifier_options(classes: list[str]) -> dict:
    """`from_pretrained`/`from_config` options for a sequence classifier over `classes`."""
    return {"auto_class": _hf().AutoModelForSequenceClassification, "num_labels": len(classes),
            "id2label": dict(enumerate(classes)), "label2id": {name: i for i, name in enumerate(classes)}}


def build_embedded(dtype: torch.dtype = torch.float32, head: dict | None = None) -> nn.Module:
    """The shipped tiny Llama, randomly initialized with a fixed seed (the same model every
    time, whatever the training seed); with `head` (`classifier_options`), as a sequence
    classifier."""
    transformers = _hf()
    options = dict(head or {})
    auto_class = options.pop("auto_class", transformers.AutoModelForCausalLM)
    config = transformers.AutoConfig.from_pretrained(str(embedded_model_dir()), **options)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(EMBEDDED_SEED)
        model = auto_class.from_config(config, **dtype_kwarg(dtype))
    model.config._name_or_path = EMBEDDED_NAME
    return model


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or not _HUB_ID.match(name)


def _is_4bit(quant: object) -> bool:
    """Whether a config's `quantization_config` (a dict, or transformers' object) is bitsandbytes' 4-bit."""
    if not quant:
        return False
    entry = quant if isinstance(quant, dict) else quant.to_dict()
    return entry.get("quant_method") == "bitsandbytes" and bool(entry.get("load_in_4bit"))


def is_quantized_dir(path: Path) -> bool:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return _is_4bit(config.get("quantization_config"))


def _is_quantized_hub_model(name: str) -> bool:
    """Whether a Hub model's config says it is a bitsandbytes 4-bit checkpoint (its config
    fetched; a model that cannot be reached is left for the load to report)."""
    try:
        config = _hf().AutoConfig.from_pretrained(name)
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return _is_4bit(getattr(config, "quantization_config", None))


def resolve(model: str | os.PathLike | None) -> tuple[str, Path | None]:
    """(display name, local directory or None for a Hub id); raises for a missing path."""
    if model is None:
        return EMBEDDED_NAME, embedded_model_dir()
    name = str(model)
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise TrainError(f"{name}: not a model directory (a file)")
        if not (path / "config.json").exists():
            raise TrainError(f"{name}: not a Hugging Face model directory (no config.json)")
        return name, path
    if _looks_local(name):
        raise TrainError(f"{name}: no such model directory")
    return name, None


def load_model(model: str | os.PathLike | None, dtype: torch.dtype, quantization: dict | None = None,
               head: dict | None = None) -> tuple[nn.Module, object, str]:
    """(model, tokenizer, name). The embedded model when `model` is None. With `quantization`
    (`fastlora.from_pretrained`'s options), and always for a bitsandbytes 4-bit checkpoint, a
    checkpoint is loaded through `fastlora.from_pretrained`: its linear layers come as
    `Linear4bit`, quantized while loading, or as stored (a 4-bit checkpoint's own settings
    win). `head` (`classifier_options`) makes it a sequence classifier."""
    name, path = resolve(model)
    if model is None:
        return build_embedded(dtype, head), load_tokenizer(path), name
    transformers = _hf()
    source = str(path) if path is not None else name
    if quantization is None and (is_quantized_dir(path) if path is not None else _is_quantized_hub_model(name)):
        quantization = dict(head or {})  # its 4-bit layers as stored, without bitsandbytes
    try:
        if quantization is not None:
            from .. import hf

            net = hf.from_pretrained(source, **quantization, **dtype_kwarg(dtype))
        else:
            options = dict(head or {})
            auto_class = options.pop("auto_class", transformers.AutoModelForCausalLM)
            net = auto_class.from_pretrained(source, **options, **dtype_kwarg(dtype))
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, EnvironmentError) as exc:
        where = "local directory" if path is not None else "Hugging Face Hub model"
        kind = "sequence classifier" if head else "causal LM"
        raise TrainError(f"{name}: cannot load a {kind} from this {where} ({_one_line(exc)})") from None
    return net, load_tokenizer(source), name


def parse_target_modules(value: str | list[str] | tuple[str, ...]) -> str | list[str]:
    """`"all-linear"` or a comma-separated list of module names."""
    if isinstance(value, (list, tuple)):
        names = [str(v).strip() for v in value]
    else:
        if value.strip() == ALL_LINEAR:
            return ALL_LINEAR
        names = [v.strip() for v in value.split(",")]
    if not names or any(not n for n in names):
        raise TrainError(f"--target-modules: expected 'all-linear' or names separated by commas, got {value!r}")
    return names


def check_target_modules(model: nn.Module, target: str | list[str]) -> None:
    """Raises a one-line `TrainError` when `target` selects no linear layer (`nn.Linear` or
    `Linear4bit`) of the model: naming the unknown module, or saying the model has none to adapt."""
    head = _output_head(model)
    from ..nn import Linear4bit

    linears = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, Linear4bit)) and n}
    eligible = {n for n, m in linears.items() if m is not head and not (head is None and n.endswith("lm_head"))}
    kind = type(model).__name__
    if target == ALL_LINEAR:
        if not eligible:
            raise TrainError(f"{kind} has no nn.Linear layers to adapt besides its output head "
                             f"(--target-modules all-linear matches nothing)")
        return
    leaves = sorted({n.rsplit(".", 1)[-1] for n in eligible})
    modules = dict(model.named_modules())
    for t in target:
        matches = [n for n in modules if n == t or n.endswith("." + t)]
        if not matches:
            hint = f"its linear layers are named: {', '.join(leaves)}" if leaves else "it has no nn.Linear layers"
            raise TrainError(f"--target-modules: {kind} has no module named {t!r} ({hint})")
        if not any(n in linears for n in matches):
            hint = f"linear layers: {', '.join(leaves)}" if leaves else "it has no nn.Linear layers"
            raise TrainError(f"--target-modules: {t!r} in {kind} is a {type(modules[matches[0]]).__name__}, "
                             f"not an nn.Linear ({hint})")
