"""Peak memory of loading a sharded 16/32-bit checkpoint as a 4-bit model.

Writes a randomly initialized Llama (fp32, sharded) to a temporary directory, then loads it
in a fresh process per stack and reports the process's peak anonymous resident memory
(RssAnon, sampled every 2 ms) above its baseline after imports, and what it holds after:

* `dense`: `AutoModelForCausalLM.from_pretrained` (no quantization),
* `fastlora`: `fastlora.from_pretrained` (each weight quantized as transformers reads it),
* `bitsandbytes`: `from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit=True))`.

    python benches/load_memory.py [--hidden 1024 --layers 8 --shard-mb 100] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

_PROBE = """
import sys, threading, time, torch
import transformers
import transformers.core_model_loading, transformers.models.llama.modeling_llama  # imports are not the load
{imports}
def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))
# Anonymous memory only: safetensors maps the checkpoint's files, and the pages of them that a
# load reads count in RSS as file-backed (reclaimable page cache), which says nothing of what
# the load allocates. The kernel keeps no high-water mark of it, so a thread samples it.
base = status("RssAnon")
peak = [base]
done = threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], status("RssAnon"))
        time.sleep(0.002)
sampler = threading.Thread(target=sample, daemon=True)
sampler.start()
model = {load}
done.set()
sampler.join()
import ctypes, gc
gc.collect()
ctypes.CDLL(None).malloc_trim(0)  # freed heap memory back to the system: what is left is held
print(max(peak[0], status("RssAnon")) - base, status("RssAnon") - base)
"""

STACKS = {
    "dense": ("", "transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)"),
    "fastlora": ("import fastlora, fastlora.hf", "fastlora.from_pretrained(sys.argv[1], dtype=torch.float32)"),
    "bitsandbytes": (
        "import bitsandbytes, transformers.integrations.bitsandbytes\nfrom transformers import BitsAndBytesConfig",
        "transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32, device_map='cpu', "
        "quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4', "
        "bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32))",
    ),
}


def write_checkpoint(path: Path, hidden: int, layers: int, shard_mb: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 256, vocab_size=8192)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path, max_shard_size=f"{shard_mb}MB")
    shards = sorted(path.glob("*.safetensors"))
    return {"parameters": sum(p.numel() for p in model.parameters()), "shards": len(shards),
            "largest_shard_mib": max(s.stat().st_size for s in shards) / 2**20,
            "checkpoint_mib": sum(s.stat().st_size for s in shards) / 2**20}


def measure(stack: str, path: Path) -> dict | None:
    imports, load = STACKS[stack]
    proc = subprocess.run([sys.executable, "-c", _PROBE.format(imports=imports, load=load), str(path)],
                          capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if proc.returncode != 0:
        print(f"{stack}: failed ({proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode})",
              file=sys.stderr)
        return None
    peak, held = (int(v) / 1024 for v in proc.stdout.split()[-2:])
    return {"peak_mib": peak, "held_mib": held}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--shard-mb", type=int, default=100)
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ckpt"
        info = write_checkpoint(path, args.hidden, args.layers, args.shard_mb)
        results = {stack: measure(stack, path) for stack in STACKS}
    header = (f"load memory: Llama {args.layers}x{args.hidden}, {info['parameters'] / 1e6:.0f}M parameters, fp32 "
              f"checkpoint {info['checkpoint_mib']:.0f} MiB in {info['shards']} shards (largest "
              f"{info['largest_shard_mib']:.0f} MiB); {platform.processor() or platform.machine()}")
    print(header)
    print("| stack | peak anonymous MiB above baseline | held after loading MiB |")
    print("|---|---|---|")
    for stack, r in results.items():
        print(f"| {stack} | {r['peak_mib']:.0f} | {r['held_mib']:.0f} |" if r else f"| {stack} | - | - |")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({"checkpoint": info, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
