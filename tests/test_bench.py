"""`fastlora bench`: its cases build and run, and the model cases compare like with like."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import oracles
from fastlora import bench


def bitsandbytes_model_is_exact(case: str) -> bool:
    """Whether bitsandbytes dequantizes every weight of a model case's bitsandbytes stack
    exactly on this CPU (the same seeded model the case builds)."""
    hidden, layers, r = bench.QUICK_SHAPES[case][2:]
    models, _ = bench._llama_models(hidden, layers, r, use_cache=False)
    return oracles.model_weights_are_exact(models["bitsandbytes"])


def test_model_step_stacks_start_from_the_same_quantized_model_and_adapters():
    impls = bench.build("model_step", quick=True)
    assert set(impls) == {"fastlora", "bitsandbytes", "dense"}
    losses = {name: run() for name, run in impls.items()}
    assert all(torch.isfinite(loss) for loss in losses.values())
    assert abs(losses["dense"].item() - losses["fastlora"].item()) < 0.05
    if not bitsandbytes_model_is_exact("model_step"):
        return  # no value oracle on this CPU (the test reports it as skipped)
    # fastlora and bitsandbytes + peft quantize to the same bytes and start from the same
    # adapters (LoRA B = 0): their first losses agree to fp32 rounding; the unquantized
    # model's loss differs by the quantization error only.
    torch.testing.assert_close(losses["fastlora"], losses["bitsandbytes"], rtol=1e-5, atol=1e-5)


def test_model_decode_stacks_generate_the_same_tokens():
    impls = bench.build("model_decode", quick=True)
    tokens = {name: run() for name, run in impls.items()}
    if not bitsandbytes_model_is_exact("model_decode"):
        return  # no value oracle on this CPU (the test reports it as skipped)
    # Same quantized bytes and adapters (LoRA B = 0): the same greedy tokens to the end.
    assert torch.equal(tokens["fastlora"], tokens["bitsandbytes"])


def test_mixed_decode_matches_peft_and_differs_from_one_adapter():
    impls = bench.build("decode_mixed", quick=True)
    tokens = {name: run() for name, run in impls.items()}
    # The rows' adapters change the tokens: row 0 is on the single adapter, the others are not.
    assert torch.equal(tokens["fastlora"][0], tokens["one adapter"][0])
    assert not torch.equal(tokens["fastlora"][1:], tokens["one adapter"][1:])
    rows, _, _, layers, vocab, r = bench.QUICK_SHAPES["decode_mixed"]
    if not oracles.model_weights_are_exact(bench.mixed_adapter_models(rows, layers, vocab, r)[1]):
        return  # no value oracle on this CPU (the test reports it as skipped)
    # The same quantized bytes and the same adapter files, loaded by peft: the same tokens.
    assert torch.equal(tokens["fastlora"], tokens["bitsandbytes"])


@pytest.mark.parametrize("case", sorted(bench.CASES))
def test_every_case_times_every_implementation(case):
    times = bench._median_ms(bench.build(case, quick=True), repeats=1)
    peers = set(times) - {"native"}  # host_call also times the native kernel alone
    assert peers in ({"fastlora", "bitsandbytes", "dense"}, {"fastlora", "bitsandbytes", "dense copy"},
                     {"fastlora", "bitsandbytes", "one adapter"})
    assert all(t > 0 for t in times.values())


def test_bench_writes_json_atomically(tmp_path, capsys):
    path = tmp_path / "bench.json"
    bench.run(quick=True, repeats=1, json_path=str(path), cases=["dequantize"])
    report = json.loads(path.read_text())
    assert [case["name"] for case in report["cases"]] == [bench.title("dequantize", True)]
    assert not list(tmp_path.glob("*.tmp"))
    assert "| dequantize" in capsys.readouterr().out


def test_cli_bench_skips_a_case_whose_package_is_missing_and_exits_0():
    # transformers made unimportable: the model cases are skipped with a note, the rest runs.
    code = ("import sys; sys.modules['transformers'] = None; from fastlora.cli import main; "
            "sys.exit(main(['bench', '--quick', '--repeats', '1', '--case', 'dequantize', '--case', 'model_decode']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "note: skipped greedy decode" in proc.stdout
    assert "needs transformers (pip install 'fastlora[bench]')" in proc.stdout
    assert "| dequantize nf4" in proc.stdout


def test_unknown_case_is_rejected():
    with pytest.raises(ValueError, match="unknown case"):
        bench.run(quick=True, cases=["nope"])


def test_train_compare_steps_both_stacks_in_turn(tmp_path):
    """benches/train_compare.py: two processes stepped in turn, the same losses, each stack's
    checkpointing recorded."""
    path = tmp_path / "compare.json"
    script = Path(__file__).resolve().parents[1] / "benches" / "train_compare.py"
    proc = subprocess.run([sys.executable, str(script), "--steps", "2", "--warmup", "0", "--json", str(path)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(path.read_text())
    ours, theirs = report["results"]["fastlora"], report["results"]["bitsandbytes"]
    assert (ours["checkpointing"], theirs["checkpointing"]) == ("selective", "full")
    assert len(ours["losses"]) == len(theirs["losses"]) == 2
    from fastlora.train import modeling

    if oracles.model_weights_are_exact(bench.bitsandbytes_peft_model(modeling.build_embedded(), 8, 16)):
        assert report["summary"]["max_abs_loss_diff"] < 1e-5
    assert all(r["step_time_s_median"] > 0 and r["peak_rss_training_mib"] > 0 for r in (ours, theirs))
