"""benches/gpu_bench.py: its CPU dry run (tiny shapes, Triton's interpreter) runs every
section without an error, so the GPU run does not fail on a typo."""

import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benches" / "gpu_bench.py"


def test_gpu_bench_dry_run_exercises_every_section(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "FASTLORA_BACKEND"}
    result = subprocess.run(
        [sys.executable, str(BENCH), "--dry-run", "--results-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    (path,) = tmp_path.glob("gpu-*.json")
    report = json.loads(path.read_text())
    assert report["dry_run"] and not report["errors"]
    assert report["checks"] and all(check["ok"] for check in report["checks"])
    sections = {row["section"] for row in report["timings"]}
    assert sections == {"bandwidth", "dequantize", "matmul x@W.T", "matmul dy@W", "host overhead", "lora layer fwd+bwd",
                        "sweep dequantize", "sweep gemv", "decode"}
    # Every row went to the JSONL as it was measured, and the sweep wrote the interpreter's table.
    logged = [json.loads(line) for line in path.with_suffix(".jsonl").read_text().splitlines()]
    assert [row for row in logged if row.pop("kind") == "timing"] == report["timings"]
    table = json.loads((tmp_path / "configs" / "interpreter.json").read_text())
    assert set(table["kernels"]["gemv"]) == {"40x128x1", "40x128x4"}
    assert set(table["kernels"]["dequantize"]) == {"5120"}
    impls = {row["impl"] for row in report["timings"]}
    assert {"bitsandbytes.matmul_4bit", "bitsandbytes + torch LoRA", "dense cuBLAS"} <= impls
    decoded = {row["impl"] for row in report["timings"] if row["section"] == "decode"}
    assert decoded == {f"{impl} {mode}" for impl in ("fastlora", "bitsandbytes + peft", "dense + LoRA")
                       for mode in ("eager", "graph-captured (static cache)")}
