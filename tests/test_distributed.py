"""Multi-process training through torchrun on CPU (gloo, two processes): DDP and FSDP2 give
the LoRA weights of a single-process run on the same global batch, and leave the packed 4-bit
base bytes and their quantization statistics unchanged.

Two launches: `torchrun -m fastlora train` (the command line, DDP), and this file as a worker
(`torchrun tests/test_distributed.py OUT MODEL DATA`) that trains with DDP, then FSDP2, then
resumes the FSDP2 run from its checkpoint, checking the in-memory model after each.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

HERE = Path(__file__).resolve()
# fp32: the runs are compared within 1e-5, closer than bf16 autocast (what `auto` picks on a
# CPU with native bf16) keeps two summation orders.
COMMON = dict(max_steps=4, batch_size=2, max_length=32, lora_r=4, lora_alpha=8, lora_dropout=0.0, eval_steps=2,
              save_steps=2, save_total_limit=0, seed=11, progress=False, precision="fp32")
TIMEOUT = 300

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def _cli_args(opts: dict) -> list[str]:
    args = []
    for key, value in opts.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + key.replace("_", "-"))
        else:
            args += [flag, str(value)]
    return args


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, cwd=cwd, env=env)


def _tail(proc: subprocess.CompletedProcess) -> str:
    return (proc.stdout + proc.stderr)[-4000:]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from fastlora.train import modeling
    from test_train import save_tiny_llama

    root = tmp_path_factory.mktemp("dist")
    model = save_tiny_llama(root / "model")
    data = root / "tasks.jsonl"
    data.write_text("\n".join(modeling.default_data_path().read_text().splitlines()[:80]) + "\n")
    return root, model, data


@pytest.fixture(scope="module")
def single(setup):
    """The single-process run on the same global batch (2 processes x 2 rows = 4 rows)."""
    import fastlora

    root, model, data = setup
    torch.set_num_threads(1)
    out = root / "single"
    fastlora.train(model=str(model), data=str(data), output_dir=str(out), distributed="none",
                   **dict(COMMON, batch_size=4))
    return out


@pytest.fixture(scope="module")
def worker(setup):
    root, model, data = setup
    out = root / "worker"
    out.mkdir()
    proc = _torchrun([str(HERE), str(out), str(model), str(data)], cwd=HERE.parent)
    results = {}
    for name in ("ddp", "fsdp", "fsdp_resume"):
        path = out / f"{name}.json"
        if path.exists():
            results[name] = json.loads(path.read_text())
    return out, proc, results


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _assert_same_run(a: Path, b: Path, tol: float = 1e-5) -> None:
    from test_train import assert_same_adapter, assert_same_metrics

    assert_same_metrics(_metrics(a), _metrics(b), tol=tol)
    assert_same_adapter(a / "adapter", b / "adapter", tol=tol)


def test_torchrun_cli_ddp_matches_single_process(setup, single):
    root, model, data = setup
    out = root / "cli-ddp"
    proc = _torchrun(["-m", "fastlora", "train", "--model", str(model), "--data", str(data), "--output-dir", str(out),
                      *_cli_args(COMMON)], cwd=root)
    assert proc.returncode == 0, _tail(proc)
    assert "ddp x2" in proc.stderr
    _assert_same_run(out, single)
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert (state["world_size"], state["global_batch"], state["samples_seen"]) == (2, 4, 16)
    assert sorted(p.name for p in (out / "checkpoint-4").glob("rng_state_*.safetensors")) == [
        "rng_state_0.safetensors", "rng_state_1.safetensors"]


def test_ddp_reduces_only_lora_and_keeps_the_base(worker, single):
    out, proc, results = worker
    assert "ddp" in results, _tail(proc)
    r = results["ddp"]
    assert r["base_unchanged"] and r["stats_unchanged"], r
    # DDP's reducer holds the LoRA weights only: the frozen 4-bit base is never all-reduced.
    assert r["ddp_param_tensors"] == r["lora_tensors"] == 28
    assert r["ddp_param_bytes"] == r["lora_bytes"]
    _assert_same_run(out / "ddp", single)


def test_fsdp2_shards_the_4bit_model_and_matches(worker, single):
    out, proc, results = worker
    assert "fsdp" in results, _tail(proc)
    r = results["fsdp"]
    assert r["base_unchanged"] and r["stats_unchanged"], r
    # The packed uint8 weights are sharded (half per rank), their statistics kept whole.
    assert r["packed_sharded"] and r["local_packed_bytes"] * 2 == r["full_packed_bytes"], r
    assert r["stats_are_buffers"], r
    _assert_same_run(out / "fsdp", single)


def test_fsdp2_resumes_to_the_same_result(worker):
    out, proc, results = worker
    assert "fsdp_resume" in results and proc.returncode == 0, _tail(proc)
    _assert_same_run(out / "fsdp_resume", out / "fsdp")


# -- the worker (run by torchrun) -----------------------------------------------------------


def _reference(model_dir: str) -> dict[str, dict[str, torch.Tensor]]:
    """Packed bytes and statistics of every 4-bit layer as a fresh `prepare_model` makes them."""
    from transformers import AutoModelForCausalLM

    import fastlora
    from fastlora.model import lora_layers

    model = fastlora.prepare_model(AutoModelForCausalLM.from_pretrained(model_dir), r=4, lora_alpha=8)
    return {name: {k: t.clone() for k, t in layer.base_layer._quant_tensors().items()}
            for name, layer in lora_layers(model).items()}


def _check(model, reference: dict, mode: str) -> dict:
    from torch.distributed.tensor import DTensor

    from fastlora.model import lora_layers

    layers = lora_layers(model)
    base_ok = stats_ok = sharded = buffers = True
    local = full = 0
    for name, layer in layers.items():
        base = layer.base_layer
        weight = base.weight
        if isinstance(weight, DTensor):
            local += weight.to_local().numel()
            weight = weight.full_tensor()
        else:
            sharded = False
            local += weight.numel()
        full += weight.numel()
        base_ok &= torch.equal(weight, reference[name]["weight"])
        for key, value in reference[name].items():
            if key != "weight":
                stats_ok &= torch.equal(base._buffers[key], value)
                buffers &= not isinstance(base._buffers[key], DTensor)
    lora = [p for layer in layers.values() for p in (layer.lora_A.weight, layer.lora_B.weight)]
    return {"base_unchanged": bool(base_ok), "stats_unchanged": bool(stats_ok), "packed_sharded": sharded,
            "local_packed_bytes": local, "full_packed_bytes": full, "stats_are_buffers": buffers,
            "lora_tensors": len(lora), "lora_bytes": sum(p.numel() * p.element_size() for p in lora)}


def _worker(out: Path, model_dir: str, data: str) -> None:
    import fastlora

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    reference = _reference(model_dir)
    common = dict(COMMON, model=model_dir, data=data)

    def write(name: str, result: dict) -> None:
        if rank == 0:
            (out / f"{name}.json").write_text(json.dumps(result))

    ddp = fastlora.train(output_dir=str(out / "ddp"), distributed="ddp", **common)
    result = _check(ddp.model, reference, "ddp")
    logging = ddp.wrapped_model._get_ddp_logging_data()
    result.update(ddp_param_tensors=logging.get("num_parameter_tensors"),
                  ddp_param_bytes=logging.get("total_parameter_size_bytes"))
    write("ddp", result)

    fsdp = fastlora.train(output_dir=str(out / "fsdp"), distributed="fsdp", **common)
    write("fsdp", _check(fsdp.model, reference, "fsdp"))

    resumed = out / "fsdp_resume"
    if rank == 0:
        resumed.mkdir()
        shutil.copytree(out / "fsdp" / "checkpoint-2", resumed / "checkpoint-2")
        lines = (out / "fsdp" / "metrics.jsonl").read_text().splitlines()
        (resumed / "metrics.jsonl").write_text("\n".join(lines[:3]) + "\n")  # as if cut after step 3
    dist.barrier()
    again = fastlora.train(output_dir=str(resumed), distributed="fsdp", resume=True, **common)
    write("fsdp_resume", _check(again.model, reference, "fsdp"))
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), sys.argv[2], sys.argv[3])
