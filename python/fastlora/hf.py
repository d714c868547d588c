"""Hugging Face transformers' own entry point: a quantization method named "fastlora".

Importing this module registers `FastLoraConfig` and its quantizer with transformers (5.x),
after which

    AutoModelForCausalLM.from_pretrained(path, quantization_config=FastLoraConfig(...))

builds the model with `fastlora.Linear4bit` layers: transformers does the loading (shards,
the Hub, tied weights, dtypes, devices) and hands each weight to the ops here as it is read,
so a 16/32-bit checkpoint is quantized one tensor at a time and the dense model never exists
in memory. A bitsandbytes 4-bit checkpoint's packed bytes and statistics are taken as stored,
without bitsandbytes. `fastlora.from_pretrained` picks the right config for a checkpoint.

`FastLoraConfig` serializes as bitsandbytes' config, and `Linear4bit`'s state dict holds
bitsandbytes' keys: `save_pretrained` writes a checkpoint that transformers + bitsandbytes
load byte for byte.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

try:
    import transformers
    from transformers.core_model_loading import ConversionOps
    from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
    from transformers.utils.quantization_config import QuantizationConfigMixin
except ImportError as exc:  # transformers missing, or 4.x (another quantizer interface)
    raise ImportError(f"fastlora.hf needs transformers 5 or later: pip install 'transformers>=5' ({exc})") from exc

from . import _checks
from .formats import QUANT_TYPES
from .model import _set_submodule, dequantize_model
from .nn import Linear4bit
from .quant_state import QuantState

QUANT_METHOD = "fastlora"
_BNB_METHOD = "bitsandbytes"
_DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_STORAGE_DTYPES = ("uint8", "float16", "bfloat16", "float32")
_STAT_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map") + tuple(
    f"quant_state.bitsandbytes__{q}" for q in QUANT_TYPES)


def _dtype(value: object, name: str) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        dtype = value
    elif isinstance(value, str) and value.removeprefix("torch.") in _DTYPE_NAMES:
        dtype = _DTYPE_NAMES[value.removeprefix("torch.")]
    else:
        raise ValueError(f"{name} must be float32, bfloat16, float16 or None, got {value!r}")
    if dtype is not None and dtype not in _checks.FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16, float16 or None, got {value!r}")
    return dtype


class FastLoraConfig(QuantizationConfigMixin):
    """What to quantize and how: bitsandbytes' 4-bit format (`quant_type` "nf4" or "fp4",
    `blocksize`, `compress_statistics` = double quantization), `compute_dtype` for the layers'
    products (default: the input's dtype), `quant_storage`, the dtype the packed bytes are
    viewed as ("uint8", or a float dtype for FSDP over 16-bit models, bitsandbytes'
    `bnb_4bit_quant_storage`), and `skip_modules`, names of modules left dense (default: the
    output head, as bitsandbytes does). `target_modules` restricts quantization to the
    `nn.Linear` layers whose names equal or end in one of its entries."""

    def __init__(self, quant_type: str = "nf4", compress_statistics: bool = True, blocksize: int = 64,
                 compute_dtype: torch.dtype | str | None = None, skip_modules: list[str] | None = None,
                 target_modules: list[str] | None = None, quant_storage: str = "uint8") -> None:
        self.quant_method = QUANT_METHOD
        if quant_storage not in _STORAGE_DTYPES:
            raise ValueError(f"quant_storage must be one of {', '.join(_STORAGE_DTYPES)}, got {quant_storage!r}")
        self.quant_storage = quant_storage
        self.quant_type = _checks.quant_type(quant_type)
        self.compress_statistics = bool(compress_statistics)
        self.blocksize = _checks.blocksize(blocksize)
        self.compute_dtype = _dtype(compute_dtype, "compute_dtype")
        for name, value in (("skip_modules", skip_modules), ("target_modules", target_modules)):
            if value is not None and (isinstance(value, str) or not all(isinstance(v, str) and v for v in value)):
                raise ValueError(f"{name} must be a list of module names or None, got {value!r}")
        self.skip_modules = list(skip_modules) if skip_modules is not None else None
        self.target_modules = list(target_modules) if target_modules is not None else None

    @classmethod
    def from_bitsandbytes(cls, config: dict | Any) -> FastLoraConfig:
        """The config of a bitsandbytes 4-bit checkpoint (its `config.json` entry, or a
        `BitsAndBytesConfig`), read as fastlora's."""
        entry = config if isinstance(config, dict) else config.to_dict()
        if entry.get("quant_method") != _BNB_METHOD or not (entry.get("load_in_4bit") or entry.get("_load_in_4bit")):
            raise ValueError(f"not a bitsandbytes 4-bit quantization_config: {entry!r}")
        storage = str(entry.get("bnb_4bit_quant_storage") or "uint8").removeprefix("torch.")
        if storage not in _STORAGE_DTYPES:
            raise ValueError(f"bnb_4bit_quant_storage: unsupported storage dtype {storage!r}")
        return cls(quant_type=entry.get("bnb_4bit_quant_type", "fp4"), quant_storage=storage,
                   compress_statistics=bool(entry.get("bnb_4bit_use_double_quant", False)),
                   blocksize=int(entry.get("fastlora_blocksize") or 64),
                   compute_dtype=entry.get("bnb_4bit_compute_dtype"),
                   skip_modules=entry.get("llm_int8_skip_modules"))

    @classmethod
    def from_dict(cls, config_dict: dict, return_unused_kwargs: bool = False, **kwargs: Any):
        # A saved config is bitsandbytes' (see `to_dict`); one of ours is read as it was written.
        if config_dict.get("quant_method") == _BNB_METHOD:
            config = cls.from_bitsandbytes(config_dict)
        else:
            fields = {k: v for k, v in config_dict.items() if k != "quant_method"}
            config = cls(**fields)
        return (config, kwargs) if return_unused_kwargs else config

    def to_dict(self) -> dict[str, Any]:
        """bitsandbytes' entry (`BitsAndBytesConfig.to_dict()` keys), so a saved checkpoint is
        one that transformers + bitsandbytes load."""
        compute_dtype = str(self.compute_dtype or torch.float32).removeprefix("torch.")
        return {
            "quant_method": _BNB_METHOD, "_load_in_4bit": True, "_load_in_8bit": False, "load_in_4bit": True,
            "load_in_8bit": False, "bnb_4bit_compute_dtype": compute_dtype, "bnb_4bit_quant_type": self.quant_type,
            "bnb_4bit_use_double_quant": self.compress_statistics, "bnb_4bit_quant_storage": self.quant_storage,
            "llm_int8_enable_fp32_cpu_offload": False, "llm_int8_has_fp16_weight": False,
            "llm_int8_skip_modules": self.skip_modules or None, "llm_int8_threshold": 6.0,
            "fastlora_blocksize": self.blocksize,  # bitsandbytes' config has no block size (it assumes 64)
        }

    def fields(self) -> dict[str, Any]:
        """fastlora's own entry, which `from_dict` reads back (`to_dict` is bitsandbytes')."""
        return {"quant_method": QUANT_METHOD, "quant_type": self.quant_type,
                "compress_statistics": self.compress_statistics, "blocksize": self.blocksize,
                "compute_dtype": None if self.compute_dtype is None else str(self.compute_dtype).removeprefix("torch."),
                "skip_modules": self.skip_modules, "target_modules": self.target_modules,
                "quant_storage": self.quant_storage}

    def get_loading_attributes(self) -> dict[str, Any]:
        return {"compute_dtype": self.compute_dtype}


def _selected(name: str, patterns: list[str] | None) -> bool:
    return patterns is None or any(name == p or name.endswith("." + p) for p in patterns)


class FastLoraHfQuantizer(HfQuantizer):
    """Puts `fastlora.Linear4bit` in place of the selected `nn.Linear` layers, each when its
    weight is read: quantized from a dense checkpoint (`FastLoraQuantize`), or rebuilt from a
    4-bit one (`FastLoraDeserialize`)."""

    requires_calibration = False
    quantization_config: FastLoraConfig
    serialized_names = {"weight": ["weight"] + [f"weight.{suffix}" for suffix in _STAT_SUFFIXES]}

    def __init__(self, quantization_config: FastLoraConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self.targets: set[str] = set()

    @property
    def quantized_element_size(self) -> float:
        return 0.5

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and "disk" in set(device_map.values()):
            raise ValueError("fastlora: offloading 4-bit layers to disk is not supported")

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> None:
        config = self.quantization_config
        keep_dense = getattr(model, "_keep_in_fp32_modules", None)
        skip = self.get_modules_to_not_convert(model, config.skip_modules, keep_dense, add_default_skips=True)
        # transformers names the head by its last parameter ("classifier.bias"): its module is meant.
        skip = [s.removesuffix(".weight").removesuffix(".bias") for s in skip]
        self.targets = {
            name for name, module in model.named_modules()
            if type(module) is nn.Linear and name and _selected(name, config.target_modules)
            and not any(name == s or name.endswith("." + s) or name.startswith(s + ".") for s in skip)
        }

    def param_needs_quantization(self, model: nn.Module, param_name: str, **kwargs: Any) -> bool:
        module_name, _, leaf = param_name.rpartition(".")
        return leaf == "weight" and module_name in self.targets

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        # Quantizing, every target's weight went through `FastLoraQuantize`: one that did not was
        # missing. A 4-bit checkpoint may keep layers dense; those loaded as they are.
        left = sorted(n for n in self.targets if not isinstance(model.get_submodule(n), Linear4bit))
        if left and not self.pre_quantized:
            raise ValueError(f"fastlora: {left[0]}.weight is missing from the checkpoint")
        # Not `is_loaded_in_4bit`: transformers then imports bitsandbytes (`num_parameters`).
        return model

    def is_serializable(self, safe_serialization: bool = True) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    def _dequantize(self, model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
        return dequantize_model(model, dtype)

    def get_quantize_ops(self) -> ConversionOps:
        return FastLoraQuantize(self)

    def get_load_operations(self) -> dict:
        return {"deserialize": FastLoraDeserialize}

    def swap_in(self, model: nn.Module, module_name: str, layer: Linear4bit) -> Linear4bit:
        """Replaces the (meta) `nn.Linear` at `module_name` by `layer`, keeping its bias if it
        was loaded first."""
        old = model.get_submodule(module_name)
        bias = getattr(old, "bias", None)
        if layer.bias is None and bias is not None:
            layer.bias = bias if not bias.is_meta else nn.Parameter(torch.empty_like(bias, device="meta"))
        layer.compute_dtype = self.quantization_config.compute_dtype
        layer._is_hf_initialized = True
        _set_submodule(model, module_name, layer)
        return layer


class FastLoraQuantize(ConversionOps):
    """A dense checkpoint weight, quantized as it is read."""

    def __init__(self, hf_quantizer: FastLoraHfQuantizer) -> None:
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict: dict[str, Any], model: nn.Module | None = None, **kwargs: Any) -> dict:
        config = self.hf_quantizer.quantization_config
        result = {}
        for param_name, value in input_dict.items():
            weight = value[0] if isinstance(value, list) else value
            module_name = param_name.rpartition(".")[0]
            old = model.get_submodule(module_name)
            if tuple(weight.shape) != (old.out_features, old.in_features):
                raise ValueError(f"{param_name}: the checkpoint's weight has shape {tuple(weight.shape)}, the "
                                 f"model's layer {(old.out_features, old.in_features)}")
            dense = nn.Linear(old.in_features, old.out_features, bias=False, device="meta")
            dense.weight = nn.Parameter(weight, requires_grad=False)
            _checks.finite(param_name, weight)
            layer = Linear4bit.from_linear(dense, quant_type=config.quant_type, blocksize=config.blocksize,
                                           compress_statistics=config.compress_statistics,
                                           quant_storage=getattr(torch, config.quant_storage))
            layer.register_parameter("bias", None)
            result[param_name] = self.hf_quantizer.swap_in(model, module_name, layer).weight
        return result


class _Unchanged(ConversionOps):
    def convert(self, input_dict: dict[str, Any], **kwargs: Any) -> dict:
        return input_dict


class FastLoraDeserialize(ConversionOps):
    """A bitsandbytes 4-bit weight (packed bytes and its statistics) as stored."""

    def __init__(self, hf_quantizer: FastLoraHfQuantizer) -> None:
        self.hf_quantizer = hf_quantizer

    @property
    def reverse_op(self) -> ConversionOps:
        # Saving: `Linear4bit`'s state dict already holds bitsandbytes' keys.
        return _Unchanged()

    def convert(self, input_dict: dict[str, Any], model: nn.Module | None = None, full_layer_name: str | None = None,
                **kwargs: Any) -> dict:
        if len(input_dict) == 1:  # a weight stored without statistics: not a 4-bit one, loaded as it is
            return input_dict
        # Copies: what transformers hands over may be a view of a read buffer it reuses.
        tensors = {k: (v[0] if isinstance(v, list) else v).clone() for k, v in input_dict.items()}
        module_name = full_layer_name.rpartition(".")[0]
        packed = tensors.pop("weight", None)
        if packed is None:
            raise ValueError(f"{full_layer_name}: the checkpoint has its quantization statistics but not the weight")
        try:
            state = QuantState.from_dict(tensors, device=packed.device)
        except ValueError as exc:  # it names the entry, with or without the "weight." its key has
            message = str(exc)
            raise ValueError(f"{module_name}.{message if message.startswith('weight.') else 'weight.' + message}") \
                from None
        old = model.get_submodule(module_name)
        expected = (getattr(old, "out_features", None), getattr(old, "in_features", None))
        if tuple(state.shape) != expected:
            raise ValueError(f"{full_layer_name}: the checkpoint's 4-bit weight has shape {tuple(state.shape)}, "
                             f"the model's layer {expected}")
        try:
            layer = Linear4bit.from_quantized(packed, state)
        except ValueError as exc:
            raise ValueError(f"{full_layer_name}: {exc}") from None
        return {"weight": self.hf_quantizer.swap_in(model, module_name, layer).weight}


def _register() -> None:
    # A second import (or a reload) must not fail on transformers' "already registered".
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not FastLoraConfig:
        AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)
        register_quantization_config(QUANT_METHOD)(FastLoraConfig)
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not FastLoraHfQuantizer:
        AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
        register_quantizer(QUANT_METHOD)(FastLoraHfQuantizer)


_register()


# `from_pretrained` arguments that the model's loading needs as well as the config's.
_LOADING_KWARGS = ("revision", "token", "cache_dir", "local_files_only", "trust_remote_code", "subfolder", "dtype",
                   "torch_dtype", "device_map")


def from_pretrained(name_or_path: str | os.PathLike, *, compute_dtype: torch.dtype | None = None,
                    quant_type: str = "nf4", compress_statistics: bool = True, blocksize: int = 64,
                    target_modules: str | list[str] = "all-linear", skip_modules: list[str] | None = None,
                    device: torch.device | str | None = None, auto_class: type | None = None,
                    **kwargs: Any) -> nn.Module:
    """A Hugging Face model (`AutoModelForCausalLM` unless `auto_class` says otherwise) with
    its linear layers as `fastlora.Linear4bit`. A bitsandbytes 4-bit checkpoint is loaded as
    stored (its own quantization settings win over the arguments here), bitsandbytes not
    needed; any other checkpoint is quantized while it loads, but for `skip_modules` (kept
    dense, like the output head, which always is). `kwargs` go to transformers'
    `from_pretrained` (`dtype`, `revision`, `token`, `num_labels`, ...)."""
    auto_class = auto_class or transformers.AutoModelForCausalLM
    if target_modules != "all-linear" and (isinstance(target_modules, str) or not target_modules):
        raise ValueError(f"target_modules must be 'all-linear' or a list of module names, got {target_modules!r}")
    config = kwargs.pop("config", None)
    if config is None:
        # Config attributes among kwargs (num_labels, ...) go into the config; what the model's
        # loading also needs is passed on again.
        kept = {k: kwargs[k] for k in _LOADING_KWARGS if k in kwargs}
        config, unused = transformers.AutoConfig.from_pretrained(name_or_path, return_unused_kwargs=True, **kwargs)
        kwargs = {**unused, **kept}
    stored = getattr(config, "quantization_config", None)
    if stored is not None:
        entry = stored if isinstance(stored, dict) else stored.to_dict()
        if entry.get("quant_method") != _BNB_METHOD:
            raise ValueError(f"{name_or_path}: quantized with {entry.get('quant_method')!r}; fastlora reads "
                             "bitsandbytes 4-bit checkpoints and 16/32-bit ones")
        quantization = FastLoraConfig.from_bitsandbytes(entry)
        if compute_dtype is not None:
            quantization.compute_dtype = _dtype(compute_dtype, "compute_dtype")
        # As a dict, as config.json would hold it: transformers then treats the checkpoint as
        # pre-quantized by this method.
        config.quantization_config = quantization.fields()
        extra = {}
    else:
        extra = {"quantization_config": FastLoraConfig(
            quant_type=quant_type, compress_statistics=compress_statistics, blocksize=blocksize,
            compute_dtype=compute_dtype, skip_modules=skip_modules,
            target_modules=None if target_modules == "all-linear" else target_modules)}
    if device is not None:
        kwargs.setdefault("device_map", {"": torch.device(device)})
    return auto_class.from_pretrained(name_or_path, config=config, **extra, **kwargs)
