"""`fastlora quantize`: a model's weights as bitsandbytes-format 4-bit safetensors.

The selected `nn.Linear` layers are stored as bitsandbytes' `Linear4bit` state dict stores them
(`<module>.weight` packed bytes, `.weight.absmax`, `.weight.quant_map`, `.weight.nested_absmax`,
`.weight.nested_quant_map`, `.weight.quant_state.bitsandbytes__<nf4|fp4>`), every other tensor
as it is, beside a `config.json` with a bitsandbytes `quantization_config` (what Hugging Face
4-bit checkpoints carry) and the tokenizer. `load_quantized` reads one back into a
fastlora-prepared model; `fastlora train --model <dir>` does so.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..model import ALL_LINEAR, find_target_modules, lora_layers, prepare_model
from ..nn import Linear4bit
from .errors import TrainError

WEIGHTS_NAME = "model.safetensors"
_STATE_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def quantize_model(model: nn.Module, target_modules: str | list[str] = ALL_LINEAR, quant_type: str = "nf4",
                   blocksize: int = 64, compress_statistics: bool = True) -> list[str]:
    """Replaces the selected `nn.Linear` layers by frozen `Linear4bit` (in place); returns
    their names."""
    names = find_target_modules(model, target_modules)
    for name in names:
        linear = model.get_submodule(name)
        layer = Linear4bit.from_linear(linear, quant_type=quant_type, blocksize=blocksize,
                                       compress_statistics=compress_statistics)
        if layer.bias is not None:
            layer.bias.requires_grad_(False)
        _set_submodule(model, name, layer)
    return names


def quantization_config(quant_type: str, compress_statistics: bool, blocksize: int, skip: list[str],
                        compute_dtype: torch.dtype) -> dict:
    """bitsandbytes' entry of a Hugging Face config (`BitsAndBytesConfig.to_dict()` keys)."""
    return {
        "quant_method": "bitsandbytes",
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "load_in_4bit": True,
        "load_in_8bit": False,
        "bnb_4bit_compute_dtype": str(compute_dtype).removeprefix("torch."),
        "bnb_4bit_quant_type": quant_type,
        "bnb_4bit_use_double_quant": compress_statistics,
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": skip or None,
        "llm_int8_threshold": 6.0,
        "fastlora_blocksize": blocksize,
    }


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drops the later keys of tensors that share memory (tied weights), as safetensors needs;
    the model's `tie_weights` restores them on load."""
    seen: dict[tuple, str] = {}
    out = {}
    for key, tensor in state.items():
        ident = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                 tensor.dtype) if tensor.numel() else None
        if ident is not None and ident in seen:
            continue
        if ident is not None:
            seen[ident] = key
        out[key] = tensor.detach().contiguous().cpu()
    return out


def quantize_to_dir(model_name: str | None, output_dir: str | os.PathLike, target_modules: str = ALL_LINEAR,
                    quant_type: str = "nf4", blocksize: int = 64, compress_statistics: bool = True,
                    dtype: torch.dtype | None = None) -> Path:
    """Loads `model_name` (a directory, a Hub id, None for the embedded model), quantizes it
    and writes `model.safetensors`, `config.json` and the tokenizer to `output_dir`
    (atomically: a temporary directory renamed into place)."""
    from .modeling import check_target_modules, load_model, parse_target_modules

    out = Path(output_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise TrainError(f"{out}: exists and is not an empty directory")
    model, tokenizer, _ = load_model(model_name, dtype or torch.float32)
    target = parse_target_modules(target_modules)
    check_target_modules(model, target)
    try:
        names = quantize_model(model, target, quant_type=quant_type, blocksize=blocksize,
                               compress_statistics=compress_statistics)
    except ValueError as exc:
        raise TrainError(str(exc)) from None
    skip = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear) and n})
    weight_dtype = next(m for m in model.modules() if isinstance(m, Linear4bit)).weight_dtype
    config = model.config.to_dict()
    config["quantization_config"] = quantization_config(quant_type, compress_statistics, blocksize, skip,
                                                        weight_dtype)
    config.setdefault("torch_dtype", str(weight_dtype).removeprefix("torch."))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        save_file(_unshared(model.state_dict()), str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / "fastlora_quantized.json").write_text(json.dumps({"modules": names}, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def quantized_modules(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """{module name: quant type} of the 4-bit layers in a bitsandbytes-format state dict."""
    found = {}
    for key in state:
        head, sep, quant = key.partition(".weight.quant_state.bitsandbytes__")
        if sep:
            found[head] = quant
    return found


def to_prepared_keys(state: dict[str, torch.Tensor], lora_names: list[str]) -> dict[str, torch.Tensor]:
    """The state dict's keys as a fastlora-prepared model names them: a LoRA-wrapped module's
    `<m>.weight...`/`<m>.bias` become `<m>.base_layer.weight...`/`<m>.base_layer.bias` (what
    PEFT does too)."""
    prefixes = sorted(lora_names, key=len, reverse=True)
    out = {}
    for key, value in state.items():
        for name in prefixes:
            if key.startswith(name + "."):
                key = f"{name}.base_layer.{key[len(name) + 1:]}"
                break
        out[key] = value
    return out


def _no_init():
    for where in ("transformers.initialization", "transformers.modeling_utils"):
        try:
            module = __import__(where, fromlist=["no_init_weights"])
            return module.no_init_weights()
        except (ImportError, AttributeError):
            continue
    return contextlib.nullcontext()


def load_quantized(directory: str | os.PathLike, dtype: torch.dtype = torch.float32, seed: int | None = None,
                   **prepare_kwargs) -> nn.Module:
    """A model written by `fastlora quantize` (or any bitsandbytes-format 4-bit checkpoint in
    one safetensors file), prepared with LoRA adapters over its 4-bit layers: the skeleton is
    built from the config, `prepare_model(quantize=True)` runs on it, and the file's tensors
    are loaded with `load_state_dict` (`seed`, if given, seeds the LoRA initialization just
    before). `prepare_kwargs` go to `prepare_model` (`r`,
    `lora_alpha`, `target_modules`: default every 4-bit layer; a subset leaves the others
    as frozen `Linear4bit` without an adapter)."""
    import transformers

    from .modeling import dtype_kwarg

    directory = Path(directory)
    path = directory / WEIGHTS_NAME
    try:
        state = load_file(str(path))
    except FileNotFoundError:
        raise TrainError(f"{path}: no such file (fastlora reads 4-bit checkpoints in one safetensors file)") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise TrainError(f"{path}: unreadable safetensors file ({exc})") from None
    quantized = quantized_modules(state)
    if not quantized:
        raise TrainError(f"{path}: holds no bitsandbytes 4-bit layers")
    quant_types = set(quantized.values())
    if len(quant_types) > 1:
        raise TrainError(f"{path}: mixes quant types {sorted(quant_types)}")
    config = transformers.AutoConfig.from_pretrained(str(directory))
    quant = getattr(config, "quantization_config", None) or {}
    if not isinstance(quant, dict):
        quant = quant.to_dict()
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with _no_init():
        model = transformers.AutoModelForCausalLM.from_config(config, **dtype_kwarg(dtype))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # uninitialized memory could hold NaN, which quantizing rejects
    target = prepare_kwargs.pop("target_modules", ALL_LINEAR)
    if target == ALL_LINEAR:
        target = sorted(quantized)
    else:
        from .modeling import check_target_modules

        check_target_modules(model, target)
        chosen = find_target_modules(model, target)
        outside = [n for n in chosen if n not in quantized]
        if outside:
            raise TrainError(f"--target-modules: {outside[0]} is not a 4-bit layer of {directory}")
        target = chosen
    first = next(iter(quantized))
    blocksize = int(quant.get("fastlora_blocksize") or _blocksize(state, first))
    options = dict(quant_type=quant_types.pop(), blocksize=blocksize,
                   compress_statistics=any(k.endswith(".weight.nested_absmax") for k in state))
    if seed is not None:
        torch.manual_seed(seed)  # the LoRA initialization
    prepare_model(model, target_modules=target, quantize=True, **options, **prepare_kwargs)
    for name in sorted(set(quantized) - set(target)):
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise TrainError(f"{path}: {name} is 4-bit in the file but not an nn.Linear in the model")
        _set_submodule(model, name, Linear4bit.from_linear(linear, **options))
    state = to_prepared_keys(state, list(lora_layers(model)))
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if ".lora_A." not in k and ".lora_B." not in k]
    tied = set()
    if hasattr(model, "tie_weights"):
        model.tie_weights()
        tied = {k for k in missing if _is_tied(model, k)}
    missing = [k for k in missing if k not in tied]
    if missing or result.unexpected_keys:
        key = (missing or result.unexpected_keys)[0]
        raise TrainError(f"{path}: {'missing' if missing else 'unexpected'} key {key} for {type(model).__name__}")
    model.config._name_or_path = str(directory)
    return model


def _blocksize(state: dict[str, torch.Tensor], module: str) -> int:
    """The block size recorded in a layer's bitsandbytes JSON entry."""
    entry = next(v for k, v in state.items() if k.startswith(module + ".weight.quant_state.bitsandbytes__"))
    try:
        return int(json.loads(bytes(entry.to(torch.uint8).tolist()).decode())["blocksize"])
    except (ValueError, KeyError, UnicodeDecodeError) as exc:
        raise TrainError(f"{module}.weight.quant_state: unreadable ({exc})") from None


def _is_tied(model: nn.Module, key: str) -> bool:
    """Whether parameter `key` shares its storage with another parameter (a tied weight)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    target = params.get(key)
    if target is None:
        return False
    return any(p is target or p.data_ptr() == target.data_ptr() for k, p in params.items() if k != key)


def dense_copy(model: nn.Module) -> None:
    """Replaces leftover `Linear4bit` (4-bit layers without an adapter) by dense `nn.Linear`."""
    for name, module in list(model.named_modules()):
        if isinstance(module, Linear4bit):
            dtype = module.compute_dtype or module.weight_dtype
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, dtype=dtype,
                               device=module.weight.device)
            with torch.no_grad():
                linear.weight.copy_(module.dequantize().to(dtype))
                if module.bias is not None:
                    linear.bias.copy_(module.bias)
            _set_submodule(model, name, linear)

