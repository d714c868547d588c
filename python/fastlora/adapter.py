"""LoRA adapters on disk in PEFT's format: `adapter_config.json` plus
`adapter_model.safetensors`, keys `base_model.model.<module>.lora_A.weight` / `.lora_B.weight`.

`peft.PeftModel.from_pretrained` loads what `save_adapter` writes, and `load_adapter` reads
what peft writes. Modules trained whole (`modules_to_save`, e.g. a classifier head) are saved
as PEFT saves them: every parameter under `base_model.model.<module>.<parameter>`.
fastlora's own settings (quantization) go to `fastlora_config.json` beside them, since older
peft versions reject unknown config keys. Files are read with safetensors (never pickle) and
written to a temporary file, then renamed.

A model holds named adapters (`fastlora.named_adapters`): each is saved on its own, and a
loaded one either fills an adapter the model has or is added beside them.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import _checks, named_adapters
from .model import _set_submodule, find_modules_to_save, find_target_modules, lora_modules, prepare_model
from .nn import Linear4bit, LoraLinear
from .nn.lora import LoraAdapter, check_lora_args

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FASTLORA_CONFIG_NAME = "fastlora_config.json"
KEY_PREFIX = "base_model.model."
_QUANT_KEYS = ("quant_type", "compress_statistics", "blocksize", "quantize")


def _atomic_write(files: dict[Path, object]) -> None:
    """Writes every file to a temporary name (`{path: write(tmp_path)}`), then renames them all:
    a failure while writing leaves no temporary file and the previous files untouched."""
    temps: dict[Path, str] = {}
    try:
        for path, write in files.items():
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            os.close(fd)
            temps[path] = tmp
            write(tmp)
        for path, tmp in temps.items():
            os.replace(tmp, path)
    except BaseException:
        for tmp in temps.values():
            Path(tmp).unlink(missing_ok=True)
        raise


def _target_names(model: nn.Module, names: list[str]) -> list[str]:
    """PEFT's usual form, the leaf names, when they select exactly these modules in the
    original model; else the full module names (which PEFT matches exactly)."""
    leaves = sorted({n.split(".")[-1] for n in names})
    inside_lora = tuple(n + "." for n in names)
    selected = {
        n for n, _ in model.named_modules()
        if not n.startswith(inside_lora) and any(n == leaf or n.endswith("." + leaf) for leaf in leaves)
    }
    return leaves if selected == set(names) else sorted(names)


def _task_type(model: nn.Module, saves_modules: bool) -> str | None:
    name = type(model).__name__
    if name.endswith("ForCausalLM"):
        return "CAUSAL_LM"
    # PEFT loads a SEQ_CLS adapter with the classifier head among its modules_to_save, and
    # fails on one saved without a head.
    return "SEQ_CLS" if name.endswith("ForSequenceClassification") and saves_modules else None


def _saved_module_shapes(model: nn.Module, names: list[str]) -> dict[str, tuple[int, ...]]:
    """`{key: shape}` of the parameters of the modules trained whole, under PEFT's keys."""
    return {f"{KEY_PREFIX}{name}.{param}": tuple(p.shape)
            for name in names for param, p in model.get_submodule(name).named_parameters()}


def _adapter_layers(model: nn.Module, name: str) -> dict[str, LoraAdapter]:
    return {layer_name: layer.adapters[name] for layer_name, layer in lora_modules(model).items()
            if name in layer.adapters}


def _adapter_name(model: nn.Module, adapter_name: object) -> str | None:
    """The adapter a call means: `adapter_name`, else the active one (None: no LoRA layers)."""
    if adapter_name is not None and (not isinstance(adapter_name, str) or not adapter_name):
        raise ValueError(f"adapter_name must be a non-empty string, got {adapter_name!r}")
    return adapter_name or named_adapters.active_adapter(model)


def save_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str | None = None) -> Path:
    """Writes one adapter's LoRA weights and config in PEFT's format (`adapter_name`, default
    the active adapter); returns the directory."""
    name = _adapter_name(model, adapter_name)
    if name is None:
        raise ValueError("model has no LoRA layers; call fastlora.prepare_model first")
    named_adapters._check_name(model, name)
    layers = _adapter_layers(model, name)
    first = next(iter(layers.values()))
    settings = (first.r, first.lora_alpha, first.use_rslora)
    if any((layer.r, layer.lora_alpha, layer.use_rslora) != settings for layer in layers.values()):
        raise ValueError("save_adapter needs one r, lora_alpha and use_rslora across layers (PEFT's config has one)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for layer_name, layer in layers.items():
        tensors[f"{KEY_PREFIX}{layer_name}.lora_A.weight"] = layer.lora_A.weight.detach().contiguous().cpu()
        tensors[f"{KEY_PREFIX}{layer_name}.lora_B.weight"] = layer.lora_B.weight.detach().contiguous().cpu()
    settings = named_adapters.settings(model, name)
    saved = list(settings.get("modules_to_save") or [])
    for module in saved:
        for param, p in model.get_submodule(module).named_parameters():
            tensors[f"{KEY_PREFIX}{module}.{param}"] = p.detach().contiguous().cpu()
    dropout = first.lora_dropout.p if isinstance(first.lora_dropout, nn.Dropout) else 0.0
    config = {
        "peft_type": "LORA",
        "task_type": _task_type(model, bool(saved)),
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "r": first.r,
        "lora_alpha": first.lora_alpha,
        "lora_dropout": dropout,
        "target_modules": _target_names(model, list(layers)),
        "bias": "none",
        "use_rslora": first.use_rslora,
        "use_dora": False,
        "fan_in_fan_out": False,
        "modules_to_save": saved or None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    quant = {k: settings[k] for k in _QUANT_KEYS if k in settings}
    _atomic_write({
        directory / WEIGHTS_NAME: lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}),
        directory / CONFIG_NAME: lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2)),
        directory / FASTLORA_CONFIG_NAME: lambda tmp: Path(tmp).write_text(json.dumps(quant, indent=2)),
    })
    return directory


def _read_config(directory: Path) -> dict:
    path = directory / CONFIG_NAME
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no adapter config here") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(config).__name__}")
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: not a LoRA adapter config (peft_type={config.get('peft_type')!r})")
    for key in ("r", "lora_alpha"):
        value = config.get(key, 8)  # peft's defaults
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(f"{path}: {key} must be a positive number, got {value!r}")
    if config.get("use_dora"):
        raise ValueError(f"{path}: DoRA adapters are not supported")
    for key in ("rank_pattern", "alpha_pattern"):  # per-layer r/alpha would silently get the wrong scaling
        if config.get(key):
            raise ValueError(f"{path}: {key} (per-layer settings) is not supported")
    targets = config.get("target_modules")
    if targets is not None and not isinstance(targets, (str, list)):
        raise ValueError(f"{path}: target_modules must be a string or a list, got {targets!r}")
    return config


def _read_quant_settings(directory: Path) -> dict:
    path = directory / FASTLORA_CONFIG_NAME
    if not path.exists():
        return {}
    try:
        settings = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(settings, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(settings).__name__}")
    return {k: v for k, v in settings.items() if k in _QUANT_KEYS}


def load_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str | None = None,
                 **prepare_kwargs) -> nn.Module:
    """Loads a PEFT-format LoRA adapter (fastlora's or peft's) into the model.

    - A model without LoRA layers is first prepared from the adapter's config
      (`prepare_kwargs` go to `prepare_model`, e.g. `quant_type`); the adapter is named
      `adapter_name` (default "default") and is active.
    - Into a model with adapters, the weights fill adapter `adapter_name` (default: the
      active one) if the model has it, with the same r and alpha; a new name is added beside
      the others, with its own r, alpha and target modules, inactive until `set_adapter`.

    Every key and shape is checked before any weight changes; a mismatch raises `ValueError`
    naming the key, and the model is left as it was."""
    directory = Path(directory)
    config = _read_config(directory)
    weights_path = directory / WEIGHTS_NAME
    try:
        state = load_file(weights_path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{weights_path}: no adapter weights here") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{weights_path}: unreadable safetensors file ({exc})") from None

    saved_entries = config.get("modules_to_save")
    if saved_entries is not None and (not isinstance(saved_entries, list)
                                      or not all(isinstance(m, str) and m for m in saved_entries)):
        raise ValueError(f"{directory / CONFIG_NAME}: modules_to_save must be a list of names, got {saved_entries!r}")
    r, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    use_rslora = bool(config.get("use_rslora", False))
    dropout = config.get("lora_dropout", 0.0) or 0.0
    targets = config.get("target_modules") or "all-linear"
    # Every key and shape is checked against the model (or, for layers still to be made,
    # against the layers the config targets) before anything changes.
    name = _adapter_name(model, adapter_name)
    options = None  # prepare_model's arguments, for a model without LoRA layers
    new_adapter = False
    if not lora_modules(model):
        name = adapter_name or "default"
        options = {
            "r": r, "lora_alpha": alpha, "target_modules": targets, "lora_dropout": dropout,
            "use_rslora": use_rslora, "modules_to_save": saved_entries, "adapter_name": name,
            **_read_quant_settings(directory), **prepare_kwargs,
        }
        features = _features(model, find_target_modules(model, options["target_modules"]))
    elif prepare_kwargs:
        raise TypeError(f"load_adapter: {sorted(prepare_kwargs)} set up the base model, which is already prepared")
    elif name in named_adapters.list_adapters(model):
        layers = _adapter_layers(model, name)
        for layer_name, layer in layers.items():
            if (layer.r, layer.lora_alpha, layer.use_rslora) != (r, alpha, use_rslora):
                raise ValueError(f"{layer_name}: adapter {name!r} has r={layer.r}, lora_alpha={layer.lora_alpha}, "
                                 f"use_rslora={layer.use_rslora}; the file has r={r}, lora_alpha={alpha}, "
                                 f"use_rslora={use_rslora} (load it under a new adapter_name)")
        features = {n: (layer.lora_A.in_features, layer.lora_B.out_features) for n, layer in layers.items()}
    else:
        if saved_entries:
            raise ValueError(f"{directory / CONFIG_NAME}: an adapter with modules_to_save (modules trained whole) "
                             "can only be a model's first adapter: the model keeps one copy of those modules")
        try:
            check_lora_args(r, alpha, dropout, True)
        except ValueError as exc:
            raise ValueError(f"{directory / CONFIG_NAME}: {exc}") from None
        new_adapter = True
        new_targets = find_target_modules(model, targets)
        _check_new_targets(model, new_targets)
        features = _features(model, new_targets)

    saved = find_modules_to_save(model, saved_entries)
    expected = _saved_module_shapes(model, saved)
    for layer_name, (in_features, out_features) in features.items():
        expected[f"{KEY_PREFIX}{layer_name}.lora_A.weight"] = (r, in_features)
        expected[f"{KEY_PREFIX}{layer_name}.lora_B.weight"] = (out_features, r)
    for key, shape in expected.items():
        if key not in state:
            raise ValueError(f"{weights_path}: missing key {key}")
        if tuple(state[key].shape) != shape:
            raise ValueError(f"{weights_path}: {key} has shape {tuple(state[key].shape)}, the model needs {shape}")
        if not state[key].is_floating_point():
            raise ValueError(f"{weights_path}: {key} has dtype {state[key].dtype}, expected a float dtype")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise ValueError(f"{weights_path}: unexpected key {extra[0]} (no such LoRA layer in the model)")

    if options is not None:
        prepare_model(model, **options)
    elif new_adapter:
        _add_adapter(model, name, list(features), r=r, lora_alpha=alpha, lora_dropout=dropout,
                     use_rslora=use_rslora)
    layers = _adapter_layers(model, name)
    updates = [
        (getattr(layer, part).weight, state[f"{KEY_PREFIX}{layer_name}.{part}.weight"])
        for layer_name, layer in layers.items() for part in ("lora_A", "lora_B")
    ]
    updates += [(p, state[f"{KEY_PREFIX}{module}.{param}"])
                for module in saved for param, p in model.get_submodule(module).named_parameters()]
    with torch.no_grad():
        for target, value in updates:
            target.copy_(_laid_out_like(target, value))
    if saved:  # trained whole from here on, and saved with the adapter
        for module in saved:
            for p in model.get_submodule(module).parameters():
                p.requires_grad_(True)
        settings = named_adapters.settings(model, name)
        settings["modules_to_save"] = sorted(set(settings.get("modules_to_save") or []) | set(saved))
    return model


def _features(model: nn.Module, names: list[str]) -> dict[str, tuple[int, int]]:
    return {name: (model.get_submodule(name).in_features, model.get_submodule(name).out_features) for name in names}


def _base_settings(model: nn.Module) -> dict:
    """How the model's base was prepared (quantization), from its first adapter's settings."""
    kept = getattr(model, "fastlora_adapters", None) or {}
    first = next(iter(kept.values()), {})
    return {k: first[k] for k in _QUANT_KEYS if k in first}


def _check_new_targets(model: nn.Module, targets: list[str]) -> None:
    """Raises before a further adapter changes the model: its targets must not lie in a module
    trained whole, and a plain linear layer it turns 4-bit must be quantizable."""
    whole = [m for settings in (getattr(model, "fastlora_adapters", None) or {}).values()
             for m in settings.get("modules_to_save") or []]
    quantize = _base_settings(model).get("quantize")
    for target in targets:
        inside = next((m for m in whole if target == m or target.startswith(m + ".")), None)
        if inside is not None:
            raise ValueError(f"target_modules: {target} lies in {inside}, which another adapter trains whole "
                             "(modules_to_save)")
        module = model.get_submodule(target)
        if quantize and isinstance(module, nn.Linear):
            weight = _checks.float_tensor(f"{target}.weight", module.weight.detach())
            _checks.finite(f"{target}.weight", weight)


def _add_adapter(model: nn.Module, name: str, targets: list[str], **lora) -> None:
    """Adapter `name` on `targets`, beside the model's adapters and inactive: a LoRA layer
    gets one more; a plain linear layer is wrapped, running its base alone until `name` is
    set active, and first quantized as the model's base was (one 4-bit base for every
    adapter, as in QLoRA training)."""
    active = named_adapters.active_adapter(model)
    base = _base_settings(model)
    compute_dtype = next((layer.base_layer.compute_dtype for layer in lora_modules(model).values()
                          if isinstance(layer.base_layer, Linear4bit)), None)
    for target in targets:
        module = model.get_submodule(target)
        if isinstance(module, LoraLinear):
            module.add_adapter(name, init_lora_weights=False, **lora)
            continue
        if base.get("quantize") and isinstance(module, nn.Linear):
            module = Linear4bit.from_linear(module, quant_type=base["quant_type"], blocksize=base["blocksize"],
                                            compress_statistics=base["compress_statistics"],
                                            compute_dtype=compute_dtype)
            if module.bias is not None:
                module.bias.requires_grad_(False)
        layer = LoraLinear(module, init_lora_weights=False, adapter_name=name, **lora)
        layer.set_adapter(active)
        layer.train(model.get_submodule(target).training)
        _set_submodule(model, target, layer)
    kept = getattr(model, "fastlora_adapters", None)
    if kept is not None:
        kept[name] = {**base, **lora, "target_modules": targets, "modules_to_save": []}


def _laid_out_like(param: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """`whole` laid out as `param` is: this rank's shard of it for an FSDP2-sharded (DTensor)
    parameter, else the tensor itself."""
    if hasattr(param, "device_mesh") and hasattr(param, "placements"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(whole.to(param.device, param.dtype), param.device_mesh, param.placements)
    return whole
