"""`fastlora quantize`: a model's weights as a bitsandbytes-format 4-bit checkpoint.

The selected `nn.Linear` layers are stored as bitsandbytes' `Linear4bit` state dict stores them
(`<module>.weight` packed bytes, `.weight.absmax`, `.weight.quant_map`, `.weight.nested_absmax`,
`.weight.nested_quant_map`, `.weight.quant_state.bitsandbytes__<nf4|fp4>`), every other tensor
as it is, beside a `config.json` with a bitsandbytes `quantization_config` (what Hugging Face
4-bit checkpoints carry) and the tokenizer. `fastlora.from_pretrained` reads one back, as
`fastlora train --model <dir>` does; so do transformers + bitsandbytes.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..model import ALL_LINEAR
from ..nn import Linear4bit
from .errors import TrainError


def quantize_to_dir(model_name: str | None, output_dir: str | os.PathLike, target_modules: str = ALL_LINEAR,
                    quant_type: str = "nf4", blocksize: int = 64, compress_statistics: bool = True,
                    dtype: torch.dtype | None = None) -> Path:
    """Loads `model_name` (a directory, a Hub id, None for the embedded model) through
    `fastlora.from_pretrained`, which quantizes it one weight at a time, and writes it with
    `save_pretrained` (safetensors shards, `config.json` with bitsandbytes' quantization
    config) plus the tokenizer to `output_dir`, atomically: a temporary directory renamed into
    place."""
    from .modeling import (
        build_embedded,
        check_target_modules,
        embedded_model_dir,
        load_model,
        load_tokenizer,
        parse_target_modules,
    )

    out = Path(output_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise TrainError(f"{out}: exists and is not an empty directory")
    target = parse_target_modules(target_modules)
    options = dict(quant_type=quant_type, blocksize=blocksize, compress_statistics=compress_statistics,
                   target_modules=target)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        if model_name is None:  # the embedded model has no weights file: written first, then read like any
            source = tmp / "embedded"
            build_embedded(dtype or torch.float32).save_pretrained(source)
            load_tokenizer(embedded_model_dir()).save_pretrained(source)
            model, tokenizer, _ = load_model(source, dtype or torch.float32, options)
            shutil.rmtree(source)
        else:
            model, tokenizer, _ = load_model(model_name, dtype or torch.float32, options)
        check_target_modules(model, target)
        if not any(isinstance(m, Linear4bit) for m in model.modules()):
            raise TrainError(f"--target-modules {target_modules}: selects no linear layer to quantize")
        model.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
