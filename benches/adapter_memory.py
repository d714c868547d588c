"""What an extra adapter costs in memory: a 4-bit Llama of the SmolLM-135M shape with one
LoRA adapter (r=16 on all seven projections), then the same adapter file loaded again under
31 more names, 32 in all. Reports the process's anonymous resident memory (RssAnon) after
each step against the bytes of the adapters' weights.

    python benches/adapter_memory.py [--adapters 32] [--layers 30] [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import tempfile
from pathlib import Path

import torch

import fastlora
from fastlora.bench import SMOLLM_135M, _cpu_name
from fastlora.model import lora_modules
from fastlora.train import modeling


def rss_anon_mib() -> float:
    gc.collect()
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:")) / 1024


def adapter_mib(model: torch.nn.Module, name: str) -> float:
    return sum(p.numel() * p.element_size() for layer in lora_modules(model).values() if name in layer.adapters
               for p in (layer.adapters[name].lora_A.weight, layer.adapters[name].lora_B.weight)) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", type=int, default=32)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.adapters < 3:
        parser.error("--adapters must be at least 3 (one, a second for the first load's costs, and the rest)")

    transformers = modeling._hf()
    config = transformers.AutoConfig.from_pretrained(str(modeling.embedded_model_dir()))
    for key, value in dict(SMOLLM_135M, num_hidden_layers=args.layers, head_dim=64).items():
        setattr(config, key, value)
    model = transformers.AutoModelForCausalLM.from_config(config, **modeling.dtype_kwarg(torch.float32)).eval()
    fastlora.prepare_model(model, r=args.r, lora_alpha=2 * args.r, adapter_name="a0")
    one = rss_anon_mib()
    with tempfile.TemporaryDirectory() as tmp:
        directory = fastlora.save_adapter(model, Path(tmp) / "adapter")
        fastlora.load_adapter(model, directory, adapter_name="a1")  # the first load's one-time costs
        two = rss_anon_mib()
        for i in range(2, args.adapters):
            fastlora.load_adapter(model, directory, adapter_name=f"a{i}")
    many = rss_anon_mib()
    weights = adapter_mib(model, "a0")
    per_adapter = (many - two) / (args.adapters - 2)
    result = {
        "cpu": _cpu_name(), "python": platform.python_version(), "torch": torch.__version__,
        "layers": args.layers, "r": args.r, "adapters": args.adapters, "adapter_weights_mib": round(weights, 2),
        "rss_anon_mib_one_adapter": round(one, 1), "rss_anon_mib_all": round(many, 1),
        "mib_per_extra_adapter": round(per_adapter, 2),
    }
    print(f"one adapter: {one:.0f} MiB anonymous; {args.adapters} adapters: {many:.0f} MiB")
    print(f"each extra adapter: {per_adapter:.2f} MiB; its weights: {weights:.2f} MiB "
          f"({per_adapter / weights:.2f}x)")
    if args.json:
        tmp = args.json + ".tmp"
        Path(tmp).write_text(json.dumps(result, indent=2))
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
