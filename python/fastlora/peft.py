"""PEFT over fastlora's 4-bit layers: `peft.get_peft_model` runs fastlora's fused QLoRA op.

    >>> import peft, fastlora.peft
    >>> config = fastlora.peft.register(peft.LoraConfig(r=16, target_modules=["q_proj", "v_proj"]))
    >>> model = peft.get_peft_model(model, config)  # a model whose linear layers are fastlora.Linear4bit

`register` maps `fastlora.Linear4bit` to `LoraLinear4bit` through PEFT's custom-module hook
(`LoraConfig._register_custom_module`), so PEFT itself builds, saves, loads and switches the
adapters. The mapping lives on the config object and is not saved with it:
`PeftModel.from_pretrained(model, path, config=fastlora.peft.register(peft.LoraConfig.from_pretrained(path)))`.

`LoraLinear4bit` is PEFT's own LoRA `Linear` with two changes. Its forward is fastlora's
fused op (`x @ W.T + bias + scaling * B(A(dropout(x)))` in one call, as `fastlora.LoraLinear`
runs it) when exactly one plain adapter is active and the call is a plain one; several active
adapters, `adapter_names=` mixed batches, `disable_adapter()`, merged adapters, `lora_bias=True`
and extra forward arguments take PEFT's general path, unchanged. And it merges by swapping the
4-bit base for a dense `nn.Linear` (dequantized `W + scaling * B @ A`, in the weight's original
dtype); unmerging puts the untouched 4-bit layer back, so `merge_and_unload` gives a dense model
and `merge_adapter`/`unmerge_adapter` round-trip exactly. Only plain LoRA is supported: variants
(DoRA, aLoRA, ...) and initializations that read the base weight (PiSSA, LoftQ, ...) raise
`ValueError`.

PEFT's `target_modules="all-linear"` cannot find `fastlora.Linear4bit` on its own: PEFT
resolves it, before it consults any custom-module mapping, to the model's modules that are
`nn.Linear` or transformers' `Conv1D` instances, and `Linear4bit` is deliberately not an
`nn.Linear`. That class promises a dense float `weight` that code writes directly:
transformers' `_init_weights` draws `normal_` into it, PEFT's default LoRA layer merges by
`weight.data += delta`, and fastlora's own `prepare_model` would take it for a dense layer to
quantize. (bitsandbytes' `Linear4bit` subclasses `nn.Linear`, and those callers special-case
its `Params4bit` weight by class name.) `register(config, model)` resolves "all-linear" on the
model instead: PEFT's choice plus every `Linear4bit` but the output head.

Importing `fastlora` does not import this module; importing it without peft raises
`ImportError`.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

try:
    from peft import LoraConfig, PeftType
    from peft.tuners.lora import Linear as PeftLoraLinear
    from peft.tuners.tuners_utils import BaseTunerLayer, _maybe_include_all_linear_layers, check_adapters_to_merge
except ImportError as exc:
    raise ImportError("fastlora.peft needs peft: pip install peft") from exc

from .model import ALL_LINEAR
from .nn import Linear4bit
from .nn.lora import INIT_CHOICES, fused_lora_forward


def check_config(config: object) -> None:
    """Raises unless `config` is a plain-LoRA `peft.LoraConfig` that fastlora's layer can run."""
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a peft.LoraConfig, got {type(config).__name__}")
    if config.peft_type != PeftType.LORA:
        raise ValueError(f"config must be a LoRA config, got {type(config).__name__} (peft_type={config.peft_type})")
    # Variants either rewrite the forward or read the dense base weight, which is packed here.
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.metadata.get("is_lora_variant") and value:
            raise ValueError(f"config.{field.name}={value!r}: fastlora.Linear4bit layers support plain LoRA only")
    # `1 in INIT_CHOICES` holds, so the bool is checked by type.
    if not (isinstance(config.init_lora_weights, bool) or config.init_lora_weights == "gaussian"):
        raise ValueError(f"config.init_lora_weights={config.init_lora_weights!r}: over fastlora.Linear4bit layers it "
                         f"must be one of {INIT_CHOICES} (the others read the dense base weight)")


def register(config: LoraConfig, model: nn.Module | None = None) -> LoraConfig:
    """Registers `LoraLinear4bit` for `fastlora.Linear4bit` layers on `config` (in place) and
    returns it. Registering again is harmless. `target_modules="all-linear"` needs `model`,
    the model the config will wrap (`peft_model.base_model.model` for `add_adapter`; see the
    module docstring): it becomes the names `all_linear_names` finds there."""
    check_config(config)
    targets = config.target_modules
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        if model is None:
            raise ValueError("config.target_modules='all-linear' does not find fastlora.Linear4bit layers by itself; "
                             "pass the model: fastlora.peft.register(config, model)")
        config.target_modules = all_linear_names(config, model)
    config._register_custom_module({Linear4bit: LoraLinear4bit})
    return config


def all_linear_names(config: LoraConfig, model: nn.Module) -> set[str]:
    """What PEFT's "all-linear" selects on `model`, plus every `Linear4bit` that is not the
    output head and not already inside a PEFT layer."""
    probe = copy.copy(config)  # PEFT's resolver writes into the config it is given
    probe.target_modules = ALL_LINEAR
    names = set(_maybe_include_all_linear_layers(probe, model).target_modules)
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    tuner_prefixes = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, BaseTunerLayer))
    names.update(
        name for name, module in model.named_modules()
        if isinstance(module, Linear4bit) and module is not head and not name.startswith(tuner_prefixes)
    )
    if not names:
        raise ValueError("target_modules='all-linear' matches no linear or fastlora.Linear4bit layer of this model")
    return names


class LoraLinear4bit(PeftLoraLinear):
    """PEFT's LoRA layer over a `fastlora.Linear4bit` base (see the module docstring)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, r: int = 0,
                 lora_alpha: int = 1, **kwargs) -> None:
        super().__init__(base_layer, adapter_name, config=config, r=r, lora_alpha=lora_alpha, **kwargs)
        # The packed weight is always (out, in); a Conv1D-oriented config must not transpose the delta.
        self.fan_in_fan_out = False

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        # PEFT's generic lookup works too, but warns that the layer type is unknown.
        if isinstance(module, Linear4bit):
            return module.in_features, module.out_features
        return super()._get_in_out_features(module)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: LoraConfig, **kwargs) -> None:
        # Every adapter passes here, also one added later with a config that `register` never saw.
        check_config(config)
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def fused_adapter(self, args: tuple, kwargs: dict) -> str | None:
        """The adapter the fused op can run this call with, or None for PEFT's general path."""
        if args or kwargs or self.disable_adapters or self.merged or not isinstance(self.base_layer, Linear4bit):
            return None
        active = [name for name in self.active_adapters if name in self.lora_A]
        # The fused op has no term for a bias on lora_B.
        if len(active) != 1 or self.lora_bias[active[0]]:
            return None
        return active[0]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapter = self.fused_adapter(args, kwargs)
        if adapter is None:
            return super().forward(x, *args, **kwargs)
        return fused_lora_forward(self.base_layer, x, self.lora_dropout[adapter], self.lora_A[adapter].weight,
                                  self.lora_B[adapter].weight, self.scaling[adapter])

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        adapter_names = [name for name in check_adapters_to_merge(self, adapter_names) if name in self.lora_A]
        if not adapter_names:
            return
        quantized = self.base_layer
        if isinstance(quantized, Linear4bit):
            # The weight's original dtype, not the compute dtype: the dense layer stands in the
            # model for the 4-bit one, which took activations of any dtype, so it must take the
            # model's (`from_linear` keeps the dtype of the layer it quantized).
            self.base_layer = quantized.to_linear().requires_grad_(False)
            # Kept outside the module tree: as a submodule its packed bytes would sit in
            # state_dict() and named_modules() next to the dense copy.
            self.__dict__["quantized_base"] = quantized
        try:
            super().merge(safe_merge=safe_merge, adapter_names=adapter_names)
        finally:
            if not self.merged and "quantized_base" in self.__dict__:  # it raised (a safe merge found NaNs)
                self.restore_quantized_base()

    def unmerge(self) -> None:
        if self.merged and "quantized_base" in self.__dict__:
            # The 4-bit layer was never written: putting it back undoes every merge exactly,
            # with none of the round-off of subtracting the deltas again.
            self.merged_adapters.clear()
            self.restore_quantized_base()
            return
        super().unmerge()

    def restore_quantized_base(self) -> None:
        quantized = self.__dict__.pop("quantized_base")
        # The dense stand-in may have been moved since the merge.
        self.base_layer = quantized.to(self.base_layer.weight.device)
