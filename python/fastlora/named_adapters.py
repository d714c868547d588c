"""Several named adapters over one base model: list, switch, delete, and a mixed batch whose
rows each run through their own adapter.

`fastlora.load_adapter(model, dir, adapter_name="x")` adds an adapter beside those loaded
(its rank, alpha and target modules its own); `set_adapter` picks the one the model runs and
trains, rebinding each layer's modules (no weight is copied). `adapters_per_row` runs a batch
whose rows use different adapters, as serving stacks do (`fastlora.lora_batched`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from torch import nn

from .model import _set_submodule, lora_modules
from .nn import LoraLinear


def list_adapters(model: nn.Module) -> list[str]:
    """The names of the adapters loaded into the model, in the order they were added."""
    present: dict[str, None] = {}
    for layer in lora_modules(model).values():
        present.update(dict.fromkeys(layer.adapters))
    added = [name for name in getattr(model, "fastlora_adapters", None) or {} if name in present]
    return added + [name for name in present if name not in added]


def active_adapter(model: nn.Module) -> str | None:
    """The adapter the model runs and trains (None without LoRA layers)."""
    return next((layer.active_adapter for layer in lora_modules(model).values() if layer.active_adapter), None)


def _check_name(model: nn.Module, name: object) -> None:
    names = list_adapters(model)
    if not names:
        raise ValueError("model has no LoRA layers; call fastlora.prepare_model or fastlora.load_adapter first")
    if name not in names:
        raise ValueError(f"unknown adapter {name!r}; the model has {names}")


def _check_switchable(layers: dict[str, LoraLinear], what: str) -> None:
    for name, layer in layers.items():
        if layer.merged:
            raise ValueError(f"{name}: an adapter is merged into the base; unmerge it before {what}")
        if layer.row_adapters is not None:
            raise ValueError(f"cannot {what} inside fastlora.adapters_per_row")


def settings(model: nn.Module, name: str) -> dict:
    """The settings `prepare_model` or `load_adapter` kept for adapter `name` (empty for
    layers built by hand)."""
    kept = getattr(model, "fastlora_adapters", None)
    if kept is None:
        return getattr(model, "fastlora_config", {}) if name == active_adapter(model) else {}
    return kept.get(name, {})


def set_adapter(model: nn.Module, name: str) -> nn.Module:
    """Makes `name` the adapter the model runs and trains; the others stay loaded, frozen.
    Layers that adapter does not target run their base alone. Switch before building the
    optimizer or wrapping the model (DDP, FSDP): they hold the parameters they were given."""
    _check_name(model, name)
    layers = lora_modules(model)
    _check_switchable(layers, "switching adapters")
    for layer in layers.values():
        layer.set_adapter(name)
    kept = getattr(model, "fastlora_adapters", None)
    if kept is not None and name in kept:
        model.fastlora_config = kept[name]
    _train_whole_modules(model, name)
    return model


def _train_whole_modules(model: nn.Module, active: str | None) -> None:
    """The modules an adapter trains whole (`modules_to_save`: only a model's first adapter
    may have them, and every adapter runs with them) train with that adapter only."""
    for name, kept in (getattr(model, "fastlora_adapters", None) or {}).items():
        for module in kept.get("modules_to_save") or []:
            for p in model.get_submodule(module).parameters():
                p.requires_grad_(name == active)


def delete_adapter(model: nn.Module, name: str) -> nn.Module:
    """Removes adapter `name` and frees its weights. If it was active, the first remaining
    adapter becomes active (PEFT's rule); layers left without an adapter become their base
    layer again, and without any adapter the model is its base model."""
    _check_name(model, name)
    layers = lora_modules(model)
    _check_switchable(layers, "deleting an adapter")
    was_active = active_adapter(model) == name
    for layer_name, layer in layers.items():
        if name in layer.adapters:
            layer.delete_adapter(name)
        if not layer.adapters:
            _set_submodule(model, layer_name, layer.base_layer)
    _train_whole_modules(model, None)  # a deleted adapter's head keeps its weights, frozen
    kept = getattr(model, "fastlora_adapters", None)
    if kept is not None:
        kept.pop(name, None)
    remaining = list_adapters(model)
    if not remaining:
        for attribute in ("fastlora_config", "fastlora_adapters"):
            if hasattr(model, attribute):
                delattr(model, attribute)
    elif was_active:
        set_adapter(model, remaining[0])
    else:
        _train_whole_modules(model, active_adapter(model))
    return model


@contextlib.contextmanager
def adapters_per_row(model: nn.Module, names: Sequence[str | None]) -> Iterator[nn.Module]:
    """Within the block, batch row `b` runs through adapter `names[b]` (None: the base alone),
    in forward calls and `model.generate` alike (rows that generate repeats, for
    `num_return_sequences` or beams, keep their row's adapter). Each layer stacks the adapters
    it holds once, on entry, and runs every row's LoRA term in one `fastlora::lora_batched`
    op. Inference only: the model must be in eval mode (as PEFT's `adapter_names=` requires)."""
    if isinstance(names, str) or not isinstance(names, Sequence) or not names:
        raise ValueError(f"names must be a non-empty list of adapter names (or None), one per batch row, got "
                         f"{names!r}")
    known = list_adapters(model)
    if not known:
        raise ValueError("model has no LoRA layers; call fastlora.prepare_model or fastlora.load_adapter first")
    for name in names:
        if name is not None and name not in known:
            raise ValueError(f"names: unknown adapter {name!r}; the model has {known}")
    if model.training:
        raise ValueError("adapters_per_row runs inference only (no adapter is trained by a mixed batch): call "
                         "model.eval() first")
    layers = lora_modules(model)
    _check_switchable(layers, "start a mixed batch")
    rows = list(names)
    plans = {name: layer.stack_adapters(rows) for name, layer in layers.items()}
    try:
        for name, layer in layers.items():
            layer.row_adapters = plans[name]
        yield model
    finally:
        for layer in layers.values():
            layer.row_adapters = None
