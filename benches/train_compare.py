"""QLoRA training, fastlora against transformers + peft + bitsandbytes, on the same model,
data, batches, LoRA initialization, optimizer and loop.

    python benches/train_compare.py                      # the tiny model, a few minutes on CPU
    python benches/train_compare.py --model-size 100m    # a ~100M-parameter Llama
    python benches/train_compare.py --model-size 100m --precision bf16   # both under bf16 autocast
    python benches/train_compare.py --device cuda --model-size 1b --batch-size 8 --max-length 512

Both stacks start from one randomly initialized Llama (fixed seed). fastlora prepares it with
`fastlora.prepare_model`; the other stack replaces its linear layers by
`bitsandbytes.nn.Linear4bit` (NF4, double quantization, quantized on the training device)
and wraps it with `peft.get_peft_model`, then copies fastlora's initial LoRA weights so both
start identical. With `--device cuda` both train as `fastlora train` does on a GPU (bf16
model and 4-bit compute, bf16 autocast) and peak GPU memory is recorded too.
The training loop is fastlora's `Trainer.train_step` for both (same sampler, micro-batches,
token-mean loss, AdamW, warmup + cosine, clipping), so only the model's forward and backward
differ. Gradient checkpointing is each stack's default: Hugging Face's full recompute for
transformers + peft + bitsandbytes, `fastlora train`'s `--checkpoint-policy auto` for
fastlora (selective on CPU: the 4-bit layers' outputs are kept, not recomputed; full on GPU).
`--checkpoint-policy full` makes fastlora recompute everything too (like for like).
Each stack runs in its own process, so its peak resident memory (Linux VmHWM, reset when
training starts) is its own; the two processes take turns, one step each, so both see the
same machine load.

Prints step time, tokens per second, peak memory and both loss curves; writes
`benches/results/train_compare-<size>[-cuda|-bf16].json`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SIZES = {
    # name: (hidden, intermediate, layers, heads, key-value heads)
    "tiny": (256, 704, 4, 4, 4),  # the embedded model's shape
    "small": (512, 1408, 8, 8, 8),
    "100m": (768, 2304, 12, 12, 12),
    "1b": (2048, 5632, 22, 32, 4),  # TinyLlama-1.1B's shape (with the shipped byte-level vocabulary)
}


def _config(size: str):
    from transformers import AutoConfig

    from fastlora.train import modeling

    config = AutoConfig.from_pretrained(str(modeling.embedded_model_dir()))
    hidden, inter, layers, heads, kv_heads = SIZES[size]
    config.hidden_size, config.intermediate_size = hidden, inter
    config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads = layers, heads, kv_heads
    config.head_dim = hidden // heads
    config.use_cache = False
    return config


def _base_model(size: str):
    import torch
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(_config(size), dtype=torch.float32)


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise OSError(key)


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _lora_init(model, r: int, alpha: float, seed: int, compute_dtype=None) -> dict:
    """fastlora's initial LoRA weights for this model and seed ({module: (A, B)})."""
    import torch

    import fastlora
    from fastlora.model import lora_layers

    torch.manual_seed(seed)
    prepared = fastlora.prepare_model(model, r=r, lora_alpha=alpha, lora_dropout=0.0, compute_dtype=compute_dtype)
    return prepared, {n: (layer.lora_A.weight.detach().clone(), layer.lora_B.weight.detach().clone())
                      for n, layer in lora_layers(prepared).items()}


def run_stack(stack: str, args: argparse.Namespace) -> dict:
    """Trains one stack in this process and returns its measurements. Driven by the parent
    (`_drive`): after setup it prints a ready line, then runs one step per "step" line read
    from stdin, printing each step's record, so the parent can interleave two stacks' steps."""
    import torch

    import fastlora  # noqa: F401  (the custom ops)
    from fastlora.bench import bitsandbytes_peft_model
    from fastlora.train import TrainConfig, Trainer, data, modeling
    from fastlora.train.distributed import DistInfo
    from fastlora.train.trainer import checkpoint_policy, enable_gradient_checkpointing

    if args.threads:
        torch.set_num_threads(args.threads)
    import gc

    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    # On a GPU both stacks train as `fastlora train` does there: a bf16 model, 4-bit layers
    # computing in bf16, bf16 autocast.
    compute_dtype = torch.bfloat16 if on_gpu else torch.float32

    # Both processes first build fastlora's initial LoRA weights (then free that model), so
    # both stacks start from the same adapters and the same process history.
    throwaway, init = _lora_init(_base_model(args.model_size), args.lora_r, args.lora_alpha, args.seed)
    del throwaway
    gc.collect()
    rss_start = _status_kib("VmRSS")
    model = _base_model(args.model_size).to(compute_dtype)
    params = sum(p.numel() for p in model.parameters())
    if stack == "fastlora":
        model, again = _lora_init(model, args.lora_r, args.lora_alpha, args.seed, compute_dtype)
        assert all(torch.equal(again[k][0], init[k][0]) for k in init)
        model.to(device)
    else:
        model = bitsandbytes_peft_model(model, args.lora_r, args.lora_alpha, init, compute_dtype, device)
    tokenizer = modeling.load_tokenizer(modeling.embedded_model_dir())
    dataset = data.load_dataset(modeling.default_data_path(), tokenizer, args.max_length, True, 0.0, args.seed)
    policy = checkpoint_policy(args.checkpoint_policy, device) if stack == "fastlora" else "full"
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(model, policy=policy)
    cfg = TrainConfig(max_steps=args.steps, batch_size=args.batch_size, lr=args.lr, lora_r=args.lora_r,
                      lora_alpha=args.lora_alpha, lora_dropout=0.0, max_length=args.max_length, seed=args.seed)
    # On a CPU the model stays fp32; `--precision bf16` trains both under bf16 autocast, as
    # `fastlora train --precision bf16` (and `auto` on a CPU with native bf16) does.
    autocast = compute_dtype if on_gpu else (torch.bfloat16 if args.precision == "bf16" else None)
    trainer = Trainer(model, dataset, cfg, DistInfo("none", device=device), autocast)
    gc.collect()
    rss_ready = _status_kib("VmRSS")
    _reset_peak()
    if on_gpu:
        torch.cuda.synchronize(device)
        gpu_ready = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    records = []
    print(json.dumps({"ready": stack}), flush=True)
    for step in range(args.steps):
        if sys.stdin.readline().strip() != "step":
            raise SystemExit(f"{stack}: the parent stopped before step {step + 1}")
        records.append(trainer.train_step(step * trainer.global_batch))
        print(f"{stack} step {step + 1}/{args.steps}: loss {records[-1]['loss']:.4f} "
              f"{records[-1]['step_time_s']:.3f}s", file=sys.stderr, flush=True)
        print(json.dumps({"step": step + 1}), flush=True)
    peak = _status_kib("VmHWM")
    gpu = {}
    if on_gpu:
        gpu = {"device": torch.cuda.get_device_name(device),
               "gpu_memory_after_setup_mib": gpu_ready / 2**20,
               "peak_gpu_memory_training_mib": torch.cuda.max_memory_allocated(device) / 2**20}
    timed = [r["step_time_s"] for r in records[args.warmup:]] or [r["step_time_s"] for r in records]
    tokens = [r["tokens"] for r in records[args.warmup:]] or [r["tokens"] for r in records]
    return {
        "stack": stack,
        "checkpointing": policy if args.gradient_checkpointing else "off",
        "parameters": params,
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "step_time_s_median": statistics.median(timed),
        "step_time_s": [r["step_time_s"] for r in records],
        "tokens_per_sec": statistics.median(tokens) / statistics.median(timed),  # robust to a busy machine's outliers
        "losses": [r["loss"] for r in records],
        "grad_norms": [r["grad_norm"] for r in records],
        "rss_after_setup_mib": (rss_ready - rss_start) / 1024,
        "peak_rss_training_mib": peak / 1024,
        "peak_growth_training_mib": (peak - rss_ready) / 1024,
        **gpu,
    }


def _machine() -> dict:
    import torch

    import fastlora
    from fastlora.bench import _cpu_name

    return {"date": time.strftime("%Y-%m-%d %H:%M"), "cpu": _cpu_name(), "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "simd": fastlora.simd_level(), "torch": torch.__version__,
            "python": platform.python_version(), "load_average_start": os.getloadavg()}


def _next_json(proc: subprocess.Popen) -> dict | None:
    """The child's next JSON line on stdout (other output skipped); None if it ended."""
    for line in proc.stdout:
        if line.startswith("{"):
            return json.loads(line)
    return None


def _drive(child_args: list[str], steps: int) -> dict | None:
    """Runs both stacks, each in its own process (its own peak memory), stepping them in
    turn: one steps while the other waits on its stdin, idle, and the order alternates every
    step, so a shared machine's load drifts onto both stacks alike. Returns each stack's
    measurements, or None if one failed."""
    stacks = ("fastlora", "bitsandbytes")
    procs = {stack: subprocess.Popen([sys.executable, __file__, *child_args, "--stack", stack], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True) for stack in stacks}
    try:
        ok = all(_next_json(procs[stack]) == {"ready": stack} for stack in stacks)
        for step in range(steps if ok else 0):
            for stack in stacks if step % 2 == 0 else stacks[::-1]:
                try:
                    procs[stack].stdin.write("step\n")
                    procs[stack].stdin.flush()
                except BrokenPipeError:  # the child died: reported below by its exit code
                    ok = False
                    break
                if _next_json(procs[stack]) != {"step": step + 1}:
                    ok = False
                    break
            if not ok:
                break
        results = {stack: _next_json(procs[stack]) for stack in stacks} if ok else {}
    finally:
        for proc in procs.values():
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.close()
    failed = [stack for stack, proc in procs.items() if proc.wait() != 0 or not results.get(stack)]
    if failed:
        print(f"{', '.join(failed)} failed", file=sys.stderr)
        return None
    return results


def main(argv: list[str] | None = None) -> int:
    from fastlora.train.trainer import CHECKPOINT_POLICIES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model-size", choices=sorted(SIZES), default="tiny", help="Llama shape (see SIZES)")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per stack")
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of the timings")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per step")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per row")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--lora-alpha", type=float, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: both stacks on the GPU in bf16 (needs bitsandbytes' CUDA build)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="on CPU: fp32, or bf16 autocast for both stacks (the GPU always trains in bf16)")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--checkpoint-policy", choices=CHECKPOINT_POLICIES, default="auto",
                        help="fastlora's gradient checkpointing (transformers+peft+bitsandbytes: always full)")
    parser.add_argument("--json", default=None, help="output file (default: benches/results/train_compare-SIZE.json)")
    parser.add_argument("--stack", choices=("fastlora", "bitsandbytes"), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: torch sees no CUDA device")
    if args.stack:  # a child process: one stack, JSON on stdout
        print(json.dumps(run_stack(args.stack, args)))
        return 0
    info = _machine()
    print(f"train_compare {args.model_size}: {args.steps} steps of {args.batch_size}x{args.max_length} tokens, "
          f"LoRA r={args.lora_r}, {info['cpu']}, {info['threads']} threads, load average {info['load_average_start']}",
          flush=True)
    results = _drive(list(argv if argv is not None else sys.argv[1:]), args.steps)
    if results is None:
        return 1
    info["load_average_end"] = os.getloadavg()
    ours, theirs = results["fastlora"], results["bitsandbytes"]
    diffs = [abs(a - b) for a, b in zip(ours["losses"], theirs["losses"], strict=False)]
    summary = {
        "speedup_step_time": theirs["step_time_s_median"] / ours["step_time_s_median"],
        "peak_rss_training_ratio": ours["peak_rss_training_mib"] / theirs["peak_rss_training_mib"],
        **({"peak_gpu_memory_training_ratio": ours["peak_gpu_memory_training_mib"]
            / theirs["peak_gpu_memory_training_mib"]} if args.device == "cuda" else {}),
        "max_abs_loss_diff": max(diffs),
        "final_losses": [ours["losses"][-1], theirs["losses"][-1]],
    }
    print(f"\nmodel: {ours['parameters'] / 1e6:.1f}M parameters, {ours['trainable'] / 1e6:.2f}M trainable "
          f"(bitsandbytes+peft: {theirs['trainable'] / 1e6:.2f}M)")
    print("| stack | step time (median) | tokens/s (median) | RSS after setup | peak RSS while training "
          "| growth in training |")
    print("|---|---|---|---|---|---|")
    for r in (ours, theirs):
        print(f"| {r['stack']} ({r['checkpointing']} checkpointing) | {r['step_time_s_median'] * 1e3:.0f} ms "
              f"| {r['tokens_per_sec']:.0f} | "
              f"{r['rss_after_setup_mib']:.0f} MiB | {r['peak_rss_training_mib']:.0f} MiB | "
              f"{r['peak_growth_training_mib']:.0f} MiB |")
    if args.device == "cuda":
        print(f"\n{ours['device']}: peak GPU memory while training {ours['peak_gpu_memory_training_mib']:.0f} MiB "
              f"(fastlora) vs {theirs['peak_gpu_memory_training_mib']:.0f} MiB (bitsandbytes+peft), "
              f"{summary['peak_gpu_memory_training_ratio']:.2f}x")
    print(f"\nfastlora: {summary['speedup_step_time']:.2f}x faster per step, "
          f"{summary['peak_rss_training_ratio']:.2f}x the peak memory; losses differ by at most "
          f"{summary['max_abs_loss_diff']:.2e}")
    print("\n| step | fastlora loss | bitsandbytes+peft loss | difference |")
    print("|---|---|---|---|")
    for i, (a, b) in enumerate(zip(ours["losses"], theirs["losses"], strict=False), 1):
        print(f"| {i} | {a:.5f} | {b:.5f} | {a - b:+.2e} |")
    suffix = "-cuda" if args.device == "cuda" else "-bf16" if args.precision == "bf16" else ""
    path = Path(args.json) if args.json else RESULTS / f"train_compare-{args.model_size}{suffix}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"machine": info, "args": {k: v for k, v in vars(args).items() if k != "stack"},
                               "summary": summary, "results": results}, indent=2) + "\n")
    os.replace(tmp, path)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
