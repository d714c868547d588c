"""`QuantState`: the metadata of a 4-bit tensor, interchangeable with bitsandbytes'.

The fields, `as_dict` and `from_dict` follow `bitsandbytes.functional.QuantState`
(0.50), so a state round-trips through a bitsandbytes or Hugging Face checkpoint
in either direction. `from_dict` additionally validates what it reads and raises
`ValueError` naming the offending key, instead of failing later in a kernel.
"""

from __future__ import annotations

import json
from math import prod
from typing import Any

import torch

from .formats import BLOCKSIZES, QUANT_TYPES, code_tensor
from .reference import dequantize_nested_absmax
from .scales import BlockScales, NestedScales

# The dtypes a 4-bit tensor may be dequantized to, by their name in the packed JSON.
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_PACKED_KEY_PREFIX = "quant_state.bitsandbytes__"
_NESTED_KEYS = ("nested_absmax", "nested_quant_map", "nested_blocksize", "nested_dtype", "nested_offset")
_KNOWN_KEYS = frozenset(("absmax", "quant_map", "quant_type", "blocksize", "dtype", "shape", *_NESTED_KEYS))


def _dtype_name(dtype: torch.dtype) -> str:
    """How bitsandbytes writes a dtype: ``torch.bfloat16`` becomes ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


class QuantState:
    """Quantization metadata of a packed 4-bit tensor (and, as ``state2``, of its scales).

    Fields, as in bitsandbytes:

    * ``absmax``: per-block scales, float32; uint8 codes when double-quantized.
    * ``shape``: the original tensor's ``torch.Size``.
    * ``code``: the 16-entry float32 code table (256 entries for ``state2``).
    * ``blocksize``, ``quant_type`` ("nf4"/"fp4"), ``dtype``: the original dtype.
    * ``offset``: 0-d float32 mean subtracted from the scales before double
      quantization; ``state2``: the `QuantState` of the quantized scales
      (``absmax``, ``code``, ``blocksize`` 256, ``dtype`` float32).
    """

    def __init__(
        self,
        absmax: torch.Tensor,
        shape: torch.Size | tuple[int, ...] | None = None,
        code: torch.Tensor | None = None,
        blocksize: int | None = None,
        quant_type: str | None = None,
        dtype: torch.dtype | None = None,
        offset: torch.Tensor | None = None,
        state2: QuantState | None = None,
    ) -> None:
        self.absmax = absmax
        self.shape = None if shape is None else torch.Size(shape)
        self.code = code
        self.blocksize = blocksize
        self.quant_type = quant_type
        self.dtype = dtype
        self.offset = offset
        self.state2 = state2

    @property
    def nested(self) -> bool:
        """Whether the scales are double-quantized (``absmax`` holds uint8 codes)."""
        return self.state2 is not None

    def block_scales(self) -> BlockScales:
        """The block scales as the ops take them (double-quantized ones as stored)."""
        if not self.nested:
            return BlockScales(self.absmax)
        state2 = self.state2
        offset = torch.as_tensor(self.offset, dtype=torch.float32, device=self.absmax.device)
        return BlockScales(self.absmax, NestedScales(state2.absmax, state2.code, offset, state2.blocksize))

    def absmax_fp32(self) -> torch.Tensor:
        """The float32 scale of every block, decoding double-quantized scales."""
        if not self.nested:
            return self.absmax
        return dequantize_nested_absmax(
            self.absmax, self.state2.absmax, self.offset, self.state2.code, self.state2.blocksize
        )

    def as_dict(self, packed: bool = False) -> dict[str, Any]:
        """The state as bitsandbytes serializes it.

        With ``packed=False``: tensors plus plain values (dtype names as strings,
        shape as a tuple). With ``packed=True``: only tensors, the plain values
        being JSON-encoded into a uint8 tensor under
        ``"quant_state.bitsandbytes__<quant_type>"``, ready for safetensors.
        """
        qs_dict: dict[str, Any] = {
            "quant_type": self.quant_type,
            "absmax": self.absmax,
            "blocksize": self.blocksize,
            "quant_map": self.code,
            "dtype": _dtype_name(self.dtype),
            "shape": None if self.shape is None else tuple(self.shape),
        }
        if self.nested:
            qs_dict.update(
                {
                    "nested_absmax": self.state2.absmax,
                    "nested_blocksize": self.state2.blocksize,
                    # A copy, as bitsandbytes does: safetensors refuses tensors that share memory.
                    "nested_quant_map": self.state2.code.clone(),
                    "nested_dtype": _dtype_name(self.state2.dtype),
                    "nested_offset": self.offset.item(),
                }
            )
        if not packed:
            return qs_dict
        tensors = {k: v for k, v in qs_dict.items() if isinstance(v, torch.Tensor)}
        plain = {k: v for k, v in qs_dict.items() if not isinstance(v, torch.Tensor)}
        json_bytes = json.dumps(plain).encode("utf-8")
        tensors[_PACKED_KEY_PREFIX + self.quant_type] = torch.tensor(list(json_bytes), dtype=torch.uint8)
        return tensors

    @classmethod
    def from_dict(cls, qs_dict: dict[str, Any], device: torch.device | str) -> QuantState:
        """Rebuild a state from `as_dict` output, fastlora's or bitsandbytes', packed or not.

        Keys may carry a module prefix (``"weight.absmax"``, as in a state_dict):
        everything up to the last ``.`` is dropped, as bitsandbytes does. The
        input dict is not modified. Raises `ValueError` naming the key at fault.
        """
        entries = _unpack(qs_dict)
        quant_type = _require(entries, "quant_type")
        if quant_type not in QUANT_TYPES:
            raise ValueError(f"quant_type: expected one of {QUANT_TYPES}, got {quant_type!r}")
        blocksize = _require(entries, "blocksize")
        if type(blocksize) is not int or blocksize not in BLOCKSIZES:
            raise ValueError(f"blocksize: expected one of {BLOCKSIZES}, got {blocksize!r}")
        dtype = _parse_dtype(entries, "dtype", allowed=tuple(_DTYPES))
        shape = _require(entries, "shape")
        if not isinstance(shape, (list, tuple)) or not all(type(d) is int and d >= 0 for d in shape):
            raise ValueError(f"shape: expected a list of non-negative integers, got {shape!r}")

        quant_map = _tensor(entries, "quant_map", torch.float32, numel=16)
        if not torch.equal(quant_map, code_tensor(quant_type, quant_map.device)):
            raise ValueError(f"quant_map: does not match the standard {quant_type} code table")

        # Any nested entry makes the state nested, so a missing nested_absmax is named as such.
        nested = any(name in entries for name in _NESTED_KEYS)
        n_blocks = -(-prod(shape) // blocksize)
        absmax = _tensor(entries, "absmax", torch.uint8 if nested else torch.float32, numel=n_blocks)
        offset: torch.Tensor | None = None
        state2: QuantState | None = None
        if nested:
            nested_blocksize = _require(entries, "nested_blocksize")
            if type(nested_blocksize) is not int or nested_blocksize <= 0:
                raise ValueError(f"nested_blocksize: expected a positive integer, got {nested_blocksize!r}")
            nested_offset = _require(entries, "nested_offset")
            if type(nested_offset) not in (int, float):
                raise ValueError(f"nested_offset: expected a number, got {nested_offset!r}")
            nested_absmax = _tensor(entries, "nested_absmax", torch.float32, numel=-(-n_blocks // nested_blocksize))
            nested_code = _tensor(entries, "nested_quant_map", torch.float32, numel=256)
            state2 = cls(
                absmax=nested_absmax.to(device),
                code=nested_code.to(device),
                blocksize=nested_blocksize,
                dtype=_parse_dtype(entries, "nested_dtype", allowed=("float32",)),
            )
            offset = torch.tensor(float(nested_offset), dtype=torch.float32, device=device)

        return cls(
            absmax=absmax.to(device),
            shape=torch.Size(shape),
            code=quant_map.to(device),
            blocksize=blocksize,
            quant_type=quant_type,
            dtype=dtype,
            offset=offset,
            state2=state2,
        )

    def to(self, device: torch.device | str) -> QuantState:
        """A copy of this state with every tensor on ``device``; ``self`` is left as it was."""
        state2 = None
        if self.state2 is not None:
            state2 = QuantState(
                absmax=self.state2.absmax.to(device),
                code=self.state2.code.to(device),
                blocksize=self.state2.blocksize,
                dtype=self.state2.dtype,
            )
        return QuantState(
            absmax=self.absmax.to(device),
            shape=self.shape,
            code=None if self.code is None else self.code.to(device),
            blocksize=self.blocksize,
            quant_type=self.quant_type,
            dtype=self.dtype,
            offset=None if self.offset is None else self.offset.to(device),
            state2=state2,
        )

    def __repr__(self) -> str:
        shape = None if self.shape is None else tuple(self.shape)
        return (
            f"QuantState(quant_type={self.quant_type!r}, shape={shape}, dtype={self.dtype}, "
            f"blocksize={self.blocksize}, nested={self.nested})"
        )


def _unpack(qs_dict: dict[str, Any]) -> dict[str, Any]:
    """Strip key prefixes and decode the packed JSON entry, if there is one."""
    packed_keys = [k for k in qs_dict if "quant_state" in k]
    if len(packed_keys) > 1:
        raise ValueError(f"quant_state: expected at most one packed entry, found {packed_keys}")
    entries: dict[str, Any] = {}
    for key, value in qs_dict.items():
        if key in packed_keys:
            continue
        name = key.rsplit(".", 1)[-1]
        if name not in _KNOWN_KEYS:
            raise ValueError(f"{key}: not a quantization state entry")
        if name in entries:
            raise ValueError(f"{key}: appears twice once prefixes are stripped")
        entries[name] = value
    if not packed_keys:
        return entries

    packed_key = packed_keys[0]
    suffix = packed_key.rsplit(".", 1)[-1]
    key_quant_type = suffix.removeprefix("bitsandbytes__")
    if not suffix.startswith("bitsandbytes__") or key_quant_type not in QUANT_TYPES:
        raise ValueError(f"{packed_key}: expected a key ending in bitsandbytes__nf4 or bitsandbytes__fp4")
    packed = qs_dict[packed_key]
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise ValueError(f"{packed_key}: expected a uint8 tensor of UTF-8 JSON")
    try:
        plain = json.loads(bytes(packed.cpu().reshape(-1).tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{packed_key}: not valid UTF-8 JSON ({err})") from None
    if not isinstance(plain, dict):
        raise ValueError(f"{packed_key}: expected a JSON object, got {type(plain).__name__}")
    for name, value in plain.items():
        if name not in _KNOWN_KEYS or name in entries:
            raise ValueError(f"{packed_key}: unexpected entry {name!r}")
        entries[name] = value
    if "quant_type" in entries and entries["quant_type"] != key_quant_type:
        raise ValueError(f"{packed_key}: the key says {key_quant_type} but quant_type is {entries['quant_type']!r}")
    return entries


def _require(entries: dict[str, Any], name: str) -> Any:
    if name not in entries:
        raise ValueError(f"{name}: missing from the quantization state")
    return entries[name]


def _tensor(entries: dict[str, Any], name: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
    value = _require(entries, name)
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor, got {type(value).__name__}")
    if value.dtype != dtype:
        raise ValueError(f"{name}: expected dtype {dtype}, got {value.dtype}")
    if value.dim() != 1 or value.numel() != numel:
        raise ValueError(f"{name}: expected a 1-D tensor of {numel} values, got shape {tuple(value.shape)}")
    return value


def _parse_dtype(entries: dict[str, Any], name: str, allowed: tuple[str, ...]) -> torch.dtype:
    value = _require(entries, name)
    if value not in allowed:
        raise ValueError(f"{name}: expected one of {allowed}, got {value!r}")
    return _DTYPES[value]
