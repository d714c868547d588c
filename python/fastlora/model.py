"""Model-level API: turn the linear layers of any torch model (Hugging Face transformers
models in particular) into frozen 4-bit bases with trainable LoRA adapters, and back into
dense merged layers."""

from __future__ import annotations

import torch
from torch import nn

from . import _checks
from .nn import Linear4bit, LoraLinear
from .nn.lora import check_lora_args

ALL_LINEAR = "all-linear"


def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if isinstance(head, nn.Module) else None


def find_target_modules(model: nn.Module, target_modules: str | list[str] | tuple[str, ...]) -> list[str]:
    """Names of the linear modules (`nn.Linear`, `Linear4bit` already in 4 bits, or a
    `LoraLinear` holding other adapters) that
    `target_modules` selects, PEFT's way: `"all-linear"` is every linear layer but the output
    head (`get_output_embeddings()`, else a module named `lm_head`); a list matches names
    equal to or ending in `.<entry>`."""
    if isinstance(target_modules, str):
        if target_modules != ALL_LINEAR:
            target_modules = [target_modules]
    elif not isinstance(target_modules, (list, tuple)) or not all(isinstance(t, str) and t for t in target_modules):
        raise ValueError(f"target_modules must be 'all-linear' or a list of module names, got {target_modules!r}")
    head = _output_head(model)
    # nn.MultiheadAttention reads its out_proj's weight directly instead of calling it: a LoRA
    # layer in its place would break the attention (AttributeError on .weight).
    in_attention = {
        f"{name}.{child}" if name else child
        for name, module in model.named_modules() if isinstance(module, nn.MultiheadAttention)
        for child, _ in module.named_children()
    }
    # A LoRA layer is the linear layer at its name (a further adapter goes beside the others);
    # the modules inside it are not targets.
    inside_lora = tuple(f"{name}." for name, m in model.named_modules() if isinstance(m, LoraLinear))
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, Linear4bit, LoraLinear)) or not name or name.startswith(inside_lora):
            continue
        if target_modules == ALL_LINEAR:
            if module is head or (head is None and name.split(".")[-1] == "lm_head") or name in in_attention:
                continue
            names.append(name)
        elif any(name == t or name.endswith("." + t) for t in target_modules):
            if name in in_attention:
                raise ValueError(f"{name} belongs to an nn.MultiheadAttention, which reads its weight directly; "
                                 "fastlora cannot put a LoRA layer there")
            names.append(name)
    if not names:
        raise ValueError(f"target_modules={target_modules!r} matches no linear layer of this model")
    return names


def _within(name: str, outer: str) -> bool:
    return name == outer or name.startswith(outer + ".")


def find_modules_to_save(model: nn.Module, modules_to_save: list[str] | tuple[str, ...] | None) -> list[str]:
    """Names of the modules `modules_to_save` selects (names equal to or ending in
    `.<entry>`, PEFT's way), outermost only. An entry may match nothing (PEFT's classifier
    defaults name both `score` and `classifier`), but the list as a whole must match."""
    if modules_to_save is None:
        return []
    if isinstance(modules_to_save, str) or not all(isinstance(m, str) and m for m in modules_to_save):
        raise ValueError(f"modules_to_save must be a list of module names, got {modules_to_save!r}")
    names: list[str] = []
    for name, _ in model.named_modules():
        if name and any(name == m or name.endswith("." + m) for m in modules_to_save) \
                and not any(_within(name, n) for n in names):
            names.append(name)
    if modules_to_save and not names:
        raise ValueError(f"modules_to_save={list(modules_to_save)!r} matches no module of this model")
    return names


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def lora_modules(model: nn.Module) -> dict[str, LoraLinear]:
    """Every `LoraLinear`, whichever adapters it holds."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    """The `LoraLinear` layers the active adapter is on (what trains and what is saved)."""
    return {name: m for name, m in lora_modules(model).items() if m.active_adapter is not None}


def prepare_model(
    model: nn.Module,
    r: int = 16,
    lora_alpha: float = 32,
    target_modules: str | list[str] = ALL_LINEAR,
    lora_dropout: float = 0.0,
    use_rslora: bool = False,
    quant_type: str = "nf4",
    compress_statistics: bool = True,
    blocksize: int = 64,
    compute_dtype: torch.dtype | None = None,
    init_lora_weights: bool | str = True,
    quantize: bool = True,
    modules_to_save: list[str] | None = None,
    adapter_name: str = "default",
) -> nn.Module:
    """Replaces the selected `nn.Linear` layers with `LoraLinear(Linear4bit)` (or
    `LoraLinear(nn.Linear)` when `quantize=False`), freezes every other parameter, and
    returns the model (changed in place). Layers that are already `Linear4bit` (a model from
    `fastlora.from_pretrained`) are wrapped as they are, never quantized again; the
    quantization arguments then do not apply to them (`compute_dtype`, if given, does). The
    settings are kept on the model for `save_adapter`.

    `modules_to_save` (PEFT's option, e.g. `["score"]` or `["classifier"]` for a sequence
    classifier's head) names dense modules trained whole, in their own dtype, and saved with the
    adapter under PEFT's keys, so that a head trained here comes back when the adapter is
    loaded, by `load_adapter` or by PEFT.

    The adapter is named `adapter_name`; `fastlora.load_adapter(..., adapter_name=)` adds
    others beside it (`fastlora.named_adapters`)."""
    if lora_modules(model):
        raise ValueError("model already has LoRA layers; prepare_model applies once (load_adapter adds adapters)")
    if not isinstance(adapter_name, str) or not adapter_name:
        raise ValueError(f"adapter_name must be a non-empty string, got {adapter_name!r}")
    # Everything that can fail is checked before the model changes: a bad call leaves it as it was.
    check_lora_args(r, lora_alpha, lora_dropout, init_lora_weights)
    names = find_target_modules(model, target_modules)
    saved = find_modules_to_save(model, modules_to_save)
    if target_modules == ALL_LINEAR:  # a head trained whole is not also a LoRA target (PEFT's rule)
        names = [n for n in names if not any(_within(n, m) for m in saved)]
        if not names:
            raise ValueError("target_modules='all-linear' leaves no layer outside modules_to_save")
    for name in names:
        inside = next((m for m in saved if _within(name, m) or _within(m, name)), None)
        if inside is not None:
            raise ValueError(f"modules_to_save: {inside} overlaps the LoRA target {name}")
    for name in saved:
        frozen = next((n for n, p in model.get_submodule(name).named_parameters() if not p.is_floating_point()), None)
        if frozen is not None:
            raise ValueError(f"modules_to_save: {name}.{frozen} is a 4-bit weight, which cannot be trained whole; "
                             "load that module dense (fastlora.from_pretrained keeps skip_modules dense)")
    if compute_dtype is not None and compute_dtype not in _checks.FLOAT_DTYPES:
        raise ValueError(f"compute_dtype must be float32, bfloat16, float16 or None, got {compute_dtype!r}")
    if quantize:
        _checks.quant_type(quant_type)
        _checks.blocksize(blocksize)
        for name in names:
            module = model.get_submodule(name)
            if isinstance(module, nn.Linear):
                weight = _checks.float_tensor(f"{name}.weight", module.weight.detach())
                _checks.finite(f"{name}.weight", weight)
    for p in model.parameters():
        p.requires_grad_(False)
    prequantized = [m for m in (model.get_submodule(n) for n in names) if isinstance(m, Linear4bit)]
    if prequantized:  # what the layers hold, for save_adapter
        quant_type, blocksize = prequantized[0].quant_type, prequantized[0].blocksize
        compress_statistics = prequantized[0].compress_statistics
    for name in names:
        linear = model.get_submodule(name)
        if isinstance(linear, Linear4bit):
            base = linear
            if compute_dtype is not None:
                base.compute_dtype = compute_dtype
        elif quantize:
            base = Linear4bit.from_linear(linear, quant_type=quant_type, blocksize=blocksize,
                                          compress_statistics=compress_statistics, compute_dtype=compute_dtype)
        else:
            base = linear
        if base.bias is not None:
            base.bias.requires_grad_(False)
        layer = LoraLinear(base, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_rslora=use_rslora,
                           init_lora_weights=init_lora_weights, adapter_name=adapter_name)
        layer.train(model.training)  # an eval model must not get live LoRA dropout
        _set_submodule(model, name, layer)
    for name in saved:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)
    model.fastlora_config = {
        "r": r, "lora_alpha": lora_alpha, "lora_dropout": lora_dropout, "use_rslora": use_rslora,
        "target_modules": names, "quant_type": quant_type, "compress_statistics": compress_statistics,
        "blocksize": blocksize, "quantize": quantize or bool(prequantized), "modules_to_save": saved,
    }
    # Each adapter's settings by name; `fastlora_config` is the active adapter's.
    model.fastlora_adapters = {adapter_name: model.fastlora_config}
    return model


def merge_and_unload(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replaces every `LoraLinear` by a dense `nn.Linear` holding `W + scaling * B @ A` of
    the active adapter (in `dtype`, default the layer's compute dtype or the weight's original
    dtype; the other adapters are dropped) and returns the model. Merging into 16 bits and
    quantizing again, not into 4 bits, is the lossless order."""
    layers = lora_modules(model)
    if not layers:
        raise ValueError("model has no LoRA layers to merge")
    for name, layer in layers.items():
        _set_submodule(model, name, layer.merged_linear(dtype))
    for attribute in ("fastlora_config", "fastlora_adapters"):
        if hasattr(model, attribute):
            delattr(model, attribute)
    return model


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replaces every `Linear4bit` (a 4-bit layer without an adapter, e.g. left by
    `merge_and_unload`) by a dense `nn.Linear` holding its dequantized weight, in `dtype`
    (default: the layer's compute dtype, else the weight's original dtype); returns the model."""
    for name, module in list(model.named_modules()):
        if isinstance(module, Linear4bit):
            _set_submodule(model, name, module.to_linear(dtype or module.compute_dtype))
    return model
