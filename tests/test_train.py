"""The QLoRA trainer (`fastlora.train`, `fastlora train`, `fastlora quantize`) on tiny models
built from configs: data handling, the loss's normalization, checkpoints and resuming to the
same result, gradient checkpointing through fastlora's ops, merging, the 4-bit export, and
one-line errors. Nothing is downloaded."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import fastlora
from fastlora.cli import main
from fastlora.model import lora_layers
from fastlora.nn import Linear4bit
from fastlora.train import TrainConfig, TrainError, checkpoint, data, modeling

DETERMINISTIC = ("step", "epoch", "loss", "lr", "grad_norm", "tokens", "loss_tokens", "eval_loss")


@pytest.fixture(autouse=True)
def _one_thread():
    # The steps are tiny: one thread is fastest and immune to a busy machine's oversubscription.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def save_tiny_llama(path: Path, seed: int = 1) -> Path:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=257, eos_token_id=258, pad_token_id=256)
    LlamaForCausalLM(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(modeling.embedded_model_dir()).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def task_file(tmp_path_factory) -> Path:
    """60 short prompt/response pairs (a slice of the shipped set)."""
    path = tmp_path_factory.mktemp("data") / "tasks.jsonl"
    lines = modeling.default_data_path().read_text().splitlines()[:60]
    path.write_text("\n".join(lines) + "\n")
    return path


def options(model: Path, data_file: Path, out: Path, **overrides) -> dict:
    # fp32: runs are compared within 1e-6, closer than bf16 autocast (what `auto` picks on a CPU
    # with native bf16) keeps two summation orders; bf16 has its own tests.
    base = dict(model=str(model), data=str(data_file), output_dir=str(out), max_steps=4, batch_size=2,
                max_length=32, eval_steps=2, save_steps=0, lora_r=4, lora_alpha=8, progress=False, seed=7,
                precision="fp32")
    base.update(overrides)
    return base


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_metrics(a: list[dict], b: list[dict], tol: float = 1e-6) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b, strict=False):
        for key in DETERMINISTIC:
            assert (key in ra) == (key in rb), key
            if key in ra:
                assert ra[key] == pytest.approx(rb[key], rel=tol, abs=tol), (ra["step"], key)


def interrupt_at(step: int, exc: type[BaseException]):
    """A `train` callback raising `exc` after step `step` (an interruption)."""

    def callback(record: dict) -> None:
        if record["step"] == step:
            raise exc

    return callback


def assert_same_adapter(a: Path, b: Path, tol: float = 1e-6) -> None:
    wa, wb = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=tol, atol=tol, msg=key)


# -- assets ---------------------------------------------------------------------------------


def test_shipped_tokenizer_loads_offline_and_is_byte_level():
    tok = AutoTokenizer.from_pretrained(modeling.embedded_model_dir())
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, len(tok)) == (256, 257, 258, 259)
    text = "héllo wörld 🙂 12+30="
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text


def test_embedded_model_is_fixed_and_fits_the_tokenizer():
    a, b = modeling.build_embedded(), modeling.build_embedded()
    assert a.config.vocab_size == 259 and a.config.model_type == "llama"
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=False):
        assert torch.equal(pa, pb), name


def test_shipped_data_set():
    records = data.read_records(modeling.default_data_path())
    assert 300 <= len(records) <= 2000
    assert all(r.prompt and r.response for r in records)


# -- data -----------------------------------------------------------------------------------


@pytest.mark.parametrize("line, message", [
    ('{"text": "ok"', "not valid JSON"),
    ('["text"]', "expected a JSON object"),
    ('{"prompt": "a"}', 'has "prompt" but no "response"'),
    ('{"prompt": "a", "response": 3}', '"response" must be a string'),
    ('{"input": "a"}', "got keys: input"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n\n{"prompt": "p", "response": "r"}\n' + line + "\n")
    with pytest.raises(TrainError, match=message) as err:
        data.read_records(path)
    assert str(err.value).startswith(f"{path}:4: ")


def test_prompt_is_masked_and_eos_is_learned():
    tok = AutoTokenizer.from_pretrained(modeling.embedded_model_dir())
    examples, _ = data.tokenize([data.Record(prompt="1+2=", response="3"), data.Record(text="ab")], tok, 64)
    pr, text = examples
    assert pr.input_ids == [257, *b"1+2=", *b"3", 258]
    assert pr.labels == [-100] * 5 + [ord("3"), 258]
    assert text.input_ids == [257, *b"ab", 258] and text.labels == [-100, *b"ab", 258]
    assert data.loss_tokens([pr, text]) == 2 + 3


def test_long_texts_split_pairs_truncate_and_plain_text(tmp_path):
    tok = AutoTokenizer.from_pretrained(modeling.embedded_model_dir())
    records = [data.Record(text="x" * 50), data.Record(prompt="p" * 8, response="r" * 20),
               data.Record(prompt="q" * 40, response="r")]
    examples, stats = data.tokenize(records, tok, 16)
    assert stats == {"records": 3, "split": 1, "truncated": 2, "dropped": 1}
    assert all(len(e) <= 16 for e in examples)
    assert sum(len(e) for e in examples[:-1]) == 52  # the whole text, in pieces
    listed = tmp_path / "records.json"
    listed.write_text('[{"text": "a"}, {"prompt": "b", "response": "c"}]')
    assert [(r.text, r.prompt) for r in data.read_records(listed)] == [("a", None), (None, "b")]
    listed.write_text('{"text": "a"}')
    with pytest.raises(TrainError, match="expected a JSON list of records"):
        data.read_records(listed)
    text = tmp_path / "corpus.txt"
    text.write_text("first doc\nline two\n\n\nsecond doc\n   \nthird\n")
    assert [r.text for r in data.read_records(text)] == ["first doc\nline two", "second doc", "third"]


def test_split_pack_and_batches_are_deterministic():
    examples = [data.Example(list(range(i, i + 5)), [-100] + list(range(i + 1, i + 5))) for i in range(40)]
    train, held = data.split(examples, 0.1, seed=3)
    assert len(held) == 4 and len(train) == 36 and data.split(examples, 0.1, seed=3)[1] == held
    rows = data.pack(train, 16)
    assert [len(r) for r in rows] == [16] * 11 + [4]
    assert [t for r in rows for t in r.input_ids] == [t for e in train for t in e.input_ids]
    sampler = data.Sampler(len(rows), seed=5)
    order = sampler.indices(0, 3 * len(rows))
    for epoch in range(3):
        assert sorted(order[epoch * len(rows):(epoch + 1) * len(rows)]) == list(range(len(rows)))
    assert data.Sampler(len(rows), seed=5).indices(7, 9) == order[7:16]
    # Every rank's micro-batches tile the global batch exactly once.
    global_rows = list(range(24))
    parts = [mb for rank in range(3) for mb in data.micro_batches(global_rows, 2, rank, 3)]
    assert sorted(i for mb in parts for i in mb) == global_rows and all(len(mb) == 2 for mb in parts)
    batches = [data.eval_batches(7, 2, rank, 3) for rank in range(3)]
    assert len({len(b) for b in batches}) == 1
    assert sorted(i for b in batches for mb in b for i in mb if i is not None) == list(range(7))


def test_collate_pads_right_and_masks():
    batch = data.collate([data.Example([1, 2, 3], [-100, 2, 3]), data.Example([4], [4])], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]


# -- training -------------------------------------------------------------------------------


def test_train_end_to_end(tiny_model, task_file, tmp_path):
    out = tmp_path / "run"
    result = fastlora.train(**options(tiny_model, task_file, out, max_steps=6, save_steps=3, save_total_limit=1,
                                      lr=3e-3))
    records = read_metrics(out)
    assert records == result.metrics and [r["step"] for r in records] == list(range(1, 7))
    for r in records:
        assert {"loss", "lr", "grad_norm", "tokens_per_sec", "peak_memory_mib", "step_time_s"} <= r.keys()
        assert all(torch.isfinite(torch.tensor(float(r[k]))) for k in ("loss", "grad_norm"))
        assert r["peak_memory_mib"] > 0 and r["tokens_per_sec"] > 0
    assert [("eval_loss" in r) for r in records] == [False, True, False, True, False, True]
    assert records[-1]["eval_loss"] < records[1]["eval_loss"]
    # Warmup (round(0.05 * 6) = 0 steps), then cosine from the peak towards zero.
    lrs = [r["lr"] for r in records]
    assert lrs[0] == pytest.approx(3e-3) and all(a > b for a, b in zip(lrs, lrs[1:], strict=False))
    # One checkpoint kept, complete, with no pickle anywhere.
    assert [s for s, _ in checkpoint.list_checkpoints(out)] == [6]
    ckpt = out / "checkpoint-6"
    files = sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file())
    assert files == ["adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                     "adapter/fastlora_config.json", "optimizer.json", "optimizer.safetensors", "rng_state_0.json",
                     "rng_state_0.safetensors", "scheduler.json", "trainer_state.json"]
    assert not list(out.glob(".*"))  # no temporary leftovers
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert (state["step"], state["samples_seen"]) == (6, 12)
    # The final adapter loads into a fresh model and reproduces the trained model's outputs.
    fresh = AutoModelForCausalLM.from_pretrained(tiny_model)
    fastlora.load_adapter(fresh, out / "adapter")
    fresh.eval()  # load_adapter adds LoRA layers (and their dropout) in training mode
    ids = torch.randint(0, 256, (2, 9))
    trained = result.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, trained(input_ids=ids).logits)
    assert any(layer.lora_B.weight.abs().sum() > 0 for layer in lora_layers(trained).values())


def test_resume_continues_to_the_same_result(tiny_model, task_file, tmp_path):
    """Interrupted after step 5 (checkpoints at 2 and 4): resuming redoes step 5 and ends where
    an uninterrupted run ends. Dropout is on, so the random state must be restored too."""
    opts = dict(max_steps=8, save_steps=2, save_total_limit=0, lora_dropout=0.1, grad_accum=2, eval_steps=3)
    full = tmp_path / "full"
    fastlora.train(**options(tiny_model, task_file, full, **opts))

    class Interrupt(Exception):
        pass

    cut = tmp_path / "cut"
    with pytest.raises(Interrupt):
        fastlora.train(**options(tiny_model, task_file, cut, **opts), callback=interrupt_at(5, Interrupt))
    assert len(read_metrics(cut)) == 5 and checkpoint.last_checkpoint(cut).name == "checkpoint-4"
    with pytest.raises(TrainError, match="pass --resume"):
        fastlora.train(**options(tiny_model, task_file, cut, **opts))
    fastlora.train(**options(tiny_model, task_file, cut, resume=True, **opts))
    assert_same_metrics(read_metrics(cut), read_metrics(full))
    assert_same_adapter(cut / "adapter", full / "adapter")
    # From an explicit checkpoint into a new directory, too.
    other = tmp_path / "other"
    fastlora.train(**options(tiny_model, task_file, other, resume=str(full / "checkpoint-6"), **opts))
    assert_same_metrics(read_metrics(other), read_metrics(full)[6:])
    assert_same_adapter(other / "adapter", full / "adapter")


@pytest.mark.parametrize("packing", [True, False])
def test_grad_accum_gives_the_same_steps(tiny_model, task_file, tmp_path, packing):
    """The loss is the token mean of the global batch whatever its split (padding included)."""
    one = tmp_path / "one"
    fastlora.train(**options(tiny_model, task_file, one, batch_size=4, lora_dropout=0.0, packing=packing))
    two = tmp_path / "two"
    fastlora.train(**options(tiny_model, task_file, two, batch_size=1, grad_accum=4, lora_dropout=0.0,
                             packing=packing))
    assert_same_metrics(read_metrics(one), read_metrics(two), tol=1e-5)
    assert_same_adapter(one / "adapter", two / "adapter", tol=1e-5)


@pytest.mark.parametrize("policy", ["full", "selective"])
def test_gradient_checkpointing_gives_the_same_gradients(tiny_model, monkeypatch, policy):
    """Both checkpoint policies rerun each decoder layer in backward and give the gradients of
    an uncheckpointed step; "selective" keeps the 4-bit layers' outputs, so their products
    run once, not twice; "full" reruns every product but each layer's last (`down_proj`,
    whose output no backward reads: its saved tensors are saved ahead of it)."""
    from fastlora.backends import cpu as _cpu
    from fastlora.train.trainer import enable_gradient_checkpointing, token_loss_sum

    forward_products = [0]
    product = _cpu.product

    def counted(x, packed, absmax, n, k, blocksize, quant_type, transposed):
        forward_products[0] += not transposed
        return product(x, packed, absmax, n, k, blocksize, quant_type, transposed)

    monkeypatch.setattr(_cpu, "product", counted)
    ids = torch.randint(0, 256, (2, 12))
    grads, calls, products = [], [], []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_model)
        fastlora.prepare_model(model, r=4, lora_alpha=8, init_lora_weights="gaussian", lora_dropout=0.1)
        for layer in lora_layers(model).values():
            torch.nn.init.normal_(layer.lora_B.weight, std=0.1)
        if checkpointing:
            assert enable_gradient_checkpointing(model, policy=policy)
        model.train()
        count = [0]
        first_layer = next(iter(lora_layers(model).values()))
        first_layer.register_forward_hook(lambda *_, count=count: count.__setitem__(0, count[0] + 1))
        forward_products[0] = 0
        torch.manual_seed(1)  # the same dropout masks in both runs
        token_loss_sum(model(input_ids=ids, use_cache=False).logits, ids).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        calls.append(count[0])
        products.append(forward_products[0])
    assert calls == [1, 2]  # the checkpointed layer ran again in backward
    layers = len(lora_layers(model))  # 14: 2 decoder layers of 7 linear layers
    decoder_layers = model.config.num_hidden_layers
    assert products == [layers, layers if policy == "selective" else 2 * layers - decoder_layers]
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * layers
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match="policy must be"):
        enable_gradient_checkpointing(model, policy="some")


def test_merge_writes_the_merged_dense_model(tiny_model, task_file, tmp_path):
    out = tmp_path / "run"
    result = fastlora.train(**options(tiny_model, task_file, out, max_steps=3, lr=5e-3, merge=True))
    assert result.merged_dir == out / "merged"
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert not lora_layers(merged) and not any(isinstance(m, Linear4bit) for m in merged.modules())
    assert AutoTokenizer.from_pretrained(out / "merged").eos_token_id == 258
    ids = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, result.model.eval()(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)


def test_embedded_default_runs(tmp_path):
    """No model, no data: the shipped tiny Llama on the shipped task set (two short steps)."""
    result = fastlora.train(output_dir=str(tmp_path / "run"), max_steps=2, batch_size=1, max_length=32,
                            progress=False, save_steps=0, eval_fraction=0.01)
    assert result.step == 2 and result.eval_loss is not None
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == modeling.EMBEDDED_NAME
    assert sorted(config["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                        "up_proj", "down_proj"])


# -- quantize -------------------------------------------------------------------------------


def test_quantize_writes_bitsandbytes_format(tiny_model, tmp_path):
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(tiny_model), "--output-dir", str(out)]) == 0
    state = load_file(out / "model.safetensors")
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "bitsandbytes"
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    original = LlamaForCausalLM.from_pretrained(tiny_model)
    linears = [n for n, m in original.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    assert len(linears) == 14
    for name in linears:
        keys = {k[len(name) + 1:] for k in state if k.startswith(name + ".")}
        assert keys == {"weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
                        "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4"}
        packed, ref_state = bnb_functional.quantize_4bit(original.get_submodule(name).weight.detach(),
                                                         blocksize=64, quant_type="nf4", compress_statistics=True)
        assert torch.equal(state[name + ".weight"], packed), name
        ref = ref_state.as_dict(packed=True)
        for key in ("absmax", "quant_map", "nested_absmax", "nested_quant_map"):
            assert torch.equal(state[f"{name}.weight.{key}"], ref[key]), (name, key)
        ours_json = json.loads(bytes(state[name + ".weight.quant_state.bitsandbytes__nf4"].tolist()))
        ref_json = json.loads(bytes(ref["quant_state.bitsandbytes__nf4"].tolist()))
        assert ours_json == ref_json
    # Everything else as it was.
    for key in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert torch.equal(state[key], original.state_dict()[key])

    # `fastlora.from_pretrained` (what `fastlora train --model <dir>` uses) reads it back: the
    # bytes of the model prepared from the original weights.
    expected = fastlora.prepare_model(LlamaForCausalLM.from_pretrained(tiny_model), r=4, quantize=True)
    loaded = fastlora.prepare_model(fastlora.from_pretrained(out), r=4)
    for name, layer in lora_layers(loaded).items():
        assert torch.equal(layer.base_layer.weight, lora_layers(expected)[name].base_layer.weight)
        assert torch.equal(layer.base_layer.absmax, lora_layers(expected)[name].base_layer.absmax)
        lora_layers(expected)[name].lora_A.weight.data.copy_(layer.lora_A.weight)
        torch.nn.init.normal_(layer.lora_B.weight, std=0.1)
        lora_layers(expected)[name].lora_B.weight.data.copy_(layer.lora_B.weight)
    ids = torch.randint(0, 256, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected(input_ids=ids).logits, rtol=1e-5,
                                   atol=1e-5)


def test_train_on_a_quantized_checkpoint(tiny_model, task_file, tmp_path):
    """`fastlora train --model <quantize output>` trains as from the original weights, and
    merges into a dense model."""
    q = tmp_path / "q"
    assert main(["quantize", "--model", str(tiny_model), "--output-dir", str(q)]) == 0
    a, b = tmp_path / "a", tmp_path / "b"
    fastlora.train(**options(tiny_model, task_file, a, max_steps=2, lora_dropout=0.0, lr=1e-2))
    result = fastlora.train(**options(q, task_file, b, max_steps=2, lora_dropout=0.0, lr=1e-2, merge=True))
    assert_same_metrics(read_metrics(a), read_metrics(b))
    assert_same_adapter(a / "adapter", b / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(b / "merged")
    assert not any(isinstance(m, Linear4bit) for m in merged.modules())
    ids = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, result.model.eval()(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)


# -- the command line -----------------------------------------------------------------------


def test_help_shows_defaults(capsys):
    for command in ("train", "quantize", "bench"):
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0
        text = capsys.readouterr().out
        assert "(default:" in text, command
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--model", "--data", "--output-dir", "--max-steps", "--save-steps", "--batch-size", "--grad-accum",
                   "--lr", "--lora-r", "--lora-alpha", "--target-modules", "--max-length", "--seed", "--resume",
                   "--merge", "--distributed"):
        assert option in text
    assert "--max-steps MAX_STEPS optimizer steps (default: 100)" in text


def test_python_dash_m_is_the_same_cli():
    out = subprocess.run([sys.executable, "-m", "fastlora", "train", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "--lora-alpha" in out.stdout


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]


def test_cli_errors_are_one_line(tiny_model, task_file, tmp_path, capsys):
    out = str(tmp_path / "out")
    base = ["train", "--output-dir", out, "--max-steps", "1", "--no-progress", "--max-length", "16"]
    assert main(base + ["--model", str(tmp_path / "missing-model"), "--data", str(task_file)]) == 2
    assert "missing-model: no such model directory" in _error_line(capsys)

    assert main(base + ["--model", str(tiny_model), "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl: no such data file" in _error_line(capsys)

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"text": "b",}\n')
    assert main(base + ["--model", str(tiny_model), "--data", str(bad)]) == 2
    assert f"{bad}:2: not valid JSON" in _error_line(capsys)

    assert main(base + ["--model", str(tiny_model), "--data", str(task_file), "--target-modules", "q_proj,qkv"]) == 2
    line = _error_line(capsys)
    assert "no module named 'qkv'" in line and "q_proj" in line

    assert main(base + ["--model", str(tiny_model), "--data", str(task_file), "--target-modules", "mlp"]) == 2
    assert "'mlp' in LlamaForCausalLM is a LlamaMLP, not an nn.Linear" in _error_line(capsys)

    gpt2 = tmp_path / "gpt2"  # Conv1D layers: no nn.Linear but the output head
    GPT2LMHeadModel(GPT2Config(vocab_size=259, n_positions=32, n_embd=32, n_layer=1, n_head=2)).save_pretrained(gpt2)
    AutoTokenizer.from_pretrained(modeling.embedded_model_dir()).save_pretrained(gpt2)
    assert main(base + ["--model", str(gpt2), "--data", str(task_file)]) == 2
    assert "GPT2LMHeadModel has no nn.Linear layers to adapt" in _error_line(capsys)

    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    assert main(base + ["--model", str(not_a_model), "--data", str(task_file)]) == 2
    assert "no config.json" in _error_line(capsys)

    with pytest.raises(TrainError, match="--checkpoint-policy: expected one of auto, full, selective"):
        fastlora.train(model=str(tiny_model), data=str(task_file), output_dir=out, checkpoint_policy="most")

    assert main(base + ["--model", str(tiny_model), "--data", str(task_file), "--lora-r", "0"]) == 2
    assert "--lora-r must be an integer in [1, inf]" in _error_line(capsys)

    assert main(base + ["--model", str(tiny_model), "--data", str(task_file), "--distributed", "fsdp"]) == 2
    assert "needs torchrun's environment" in _error_line(capsys)

    assert main(base + ["--model", str(tiny_model), "--data", str(task_file), "--resume", str(tmp_path)]) == 2
    assert "not a checkpoint directory" in _error_line(capsys)

    assert main(["quantize", "--model", str(tmp_path / "nope"), "--output-dir", str(tmp_path / "q")]) == 2
    assert "nope: no such model directory" in _error_line(capsys)


def test_cli_quantizes_the_embedded_model_into_what_generate_and_train_read(task_file, tmp_path, capsys):
    q = tmp_path / "q"
    assert main(["quantize", "--output-dir", str(q), "--target-modules", "q_proj,v_proj,up_proj"]) == 0
    loaded = fastlora.from_pretrained(q)
    assert sorted({n.rsplit(".", 1)[-1] for n, m in loaded.named_modules() if isinstance(m, Linear4bit)}) == [
        "q_proj", "up_proj", "v_proj"]
    assert main(["generate", "--model", str(q), "--prompt", "hello", "--max-new-tokens", "3"]) == 0
    result = fastlora.train(**options(q, task_file, tmp_path / "run", max_steps=1, target_modules="v_proj"))
    assert result.step == 1 and math.isfinite(result.loss)


def test_cli_trains(tiny_model, task_file, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["train", "--model", str(tiny_model), "--data", str(task_file), "--output-dir", str(out), "--max-steps", "2",
            "--batch-size", "2", "--max-length", "16", "--lora-r", "2", "--target-modules", "q_proj,v_proj",
            "--no-progress", "--save-steps", "1"]
    assert main(args) == 0
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], sorted(config["target_modules"])) == (2, ["q_proj", "v_proj"])
    assert [s for s, _ in checkpoint.list_checkpoints(out)] == [1, 2]
    assert main(args) == 2  # a previous run is there
    assert "--overwrite" in _error_line(capsys)
    assert main(args + ["--overwrite"]) == 0
    assert len(read_metrics(out)) == 2


def test_config_defaults_match_the_cli():
    from fastlora.cli import _parser

    parsed = vars(_parser().parse_args(["train"]))
    parsed.pop("command")
    assert parsed == {k: v for k, v in vars(TrainConfig()).items()}


def test_a_nonfinite_loss_stops_the_run_before_the_optimizer_step(tiny_model, task_file, tmp_path, monkeypatch):
    """At step 4 the loss turns NaN: the run stops with one line naming the step and the last
    good checkpoint, which is left as it was, and the weights were not stepped."""
    from fastlora.train.trainer import Trainer

    real = Trainer._forward_loss
    calls = [0]

    def poisoned(self, batch):
        calls[0] += 1
        loss = real(self, batch)
        return loss * float("nan") if calls[0] == 4 else loss

    monkeypatch.setattr(Trainer, "_forward_loss", poisoned)
    out = tmp_path / "run"
    seen = []
    with pytest.raises(TrainError) as info:
        fastlora.train(**options(tiny_model, task_file, out, max_steps=6, save_steps=2, save_total_limit=0,
                                 eval_steps=0), callback=seen.append)
    message = str(info.value)
    assert message.startswith("step 4: loss nan") and "\n" not in message
    assert f"the last good checkpoint is {out / 'checkpoint-2'}" in message
    assert [s for s, _ in checkpoint.list_checkpoints(out)] == [2]
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in seen)


def test_a_gradient_norm_spike_is_logged_as_a_warning():
    from fastlora.train.trainer import SpikeWatch

    watch = SpikeWatch(factor=10, warmup=5)
    assert [watch.check(n) for n in (1.0, 1.2, 0.9, 1.1, 1.0)] == [None] * 5  # still warming up
    assert watch.check(30.0) == "gradient norm 30 is 30.0x its running median 1"
    assert watch.check(1.0) is None  # one spike does not move the median
    assert SpikeWatch(factor=0).check(1e9) is None  # off


def test_plot_draws_the_run_and_reads_back(tiny_model, task_file, tmp_path, capsys):
    """`fastlora plot`: a PNG whose panels hold the curves (read back: the loss panel's pixels
    are not all background, and each of the six panels is drawn or blank as it should be)."""
    import matplotlib.image

    out = tmp_path / "run"
    fastlora.train(**options(tiny_model, task_file, out, max_steps=4, eval_steps=2))
    png = tmp_path / "curves.png"
    assert main(["plot", str(out), "-o", str(png)]) == 0
    assert f"wrote {png}" in capsys.readouterr().out
    image = matplotlib.image.imread(png)
    assert image.shape[0] == 8 * 80 and image.shape[1] == 15 * 80  # figsize x dpi
    rgb = image[..., :3]
    h, w = rgb.shape[0] // 2, rgb.shape[1] // 3

    def inked(row, col):  # the share of non-white pixels inside a panel's inner area
        panel = rgb[row * h + h // 5: (row + 1) * h - h // 5, col * w + w // 5: (col + 1) * w - w // 10]
        return float((panel.min(axis=-1) < 0.9).mean())

    assert all(inked(r, c) > 0.002 for r, c in ((0, 0), (0, 1), (0, 2), (1, 0), (1, 1)))
    assert inked(1, 2) == 0.0  # the sixth panel is left empty
    assert not list(tmp_path.glob(".*.tmp"))


def test_plot_errors_are_one_line(tmp_path, capsys, monkeypatch):
    assert main(["plot", str(tmp_path)]) == 2
    assert "no metrics.jsonl" in _error_line(capsys)
    (tmp_path / "metrics.jsonl").write_text("")
    assert main(["plot", str(tmp_path)]) == 2
    assert "metrics.jsonl: no records" in _error_line(capsys)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"loss": 1}\n')
    assert main(["plot", str(tmp_path)]) == 2
    assert "metrics.jsonl:2: not a metrics record" in _error_line(capsys)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["plot", str(tmp_path)]) == 2
    assert "fastlora plot needs matplotlib: pip install 'fastlora[plot]'" in _error_line(capsys)


def test_generate_with_and_without_the_trained_adapter(tmp_path, capsys):
    """On the shipped tiny model and task set: after training, `fastlora generate` with the
    adapter prints other text than the base model (which has learned nothing), streamed to
    stdout, and the adapter's continuation is the trained model's own greedy continuation."""
    from fastlora.train.generate import generate

    out = tmp_path / "run"
    result = fastlora.train(output_dir=str(out), max_steps=30, batch_size=8, max_length=32, lr=1e-2, eval_steps=0,
                            save_steps=0, lora_r=8, lora_alpha=16, lora_dropout=0.0, progress=False, seed=3)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("upper candle:\n40+55=\n")
    base_args = ["generate", "--prompts", str(prompts), "--max-new-tokens", "6"]
    assert main(base_args) == 0
    base_text = capsys.readouterr().out
    assert main(base_args + ["--adapter", str(out / "adapter")]) == 0
    tuned_text = capsys.readouterr().out
    assert tuned_text.count("\n") == base_text.count("\n") == 2 and tuned_text != base_text
    tuned = generate(["upper candle:"], adapter=out / "adapter", max_new_tokens=6, out=io.StringIO())
    tokenizer = result.tokenizer
    ids = tokenizer("upper candle:", return_tensors="pt")
    with torch.no_grad():
        own = result.model.eval().generate(**ids, max_new_tokens=6, do_sample=False,
                                           pad_token_id=tokenizer.pad_token_id)
    assert tuned == [tokenizer.decode(own[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)]


def test_generate_errors_are_one_line(tmp_path, capsys):
    assert main(["generate", "--prompts", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt: no such prompts file" in _error_line(capsys)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    assert main(["generate", "--prompts", str(empty)]) == 2
    assert "empty.txt: no prompts" in _error_line(capsys)
    assert main(["generate", "--prompt", "hi", "--max-new-tokens", "0"]) == 2
    assert "--max-new-tokens must be a positive integer" in _error_line(capsys)
    assert main(["generate", "--prompt", "hi", "--adapter", str(tmp_path)]) == 2
    assert f"--adapter {tmp_path}:" in _error_line(capsys)


def test_named_eval_sets_and_the_base_level_at_step_0(tiny_model, task_file, tmp_path):
    general = tmp_path / "general.txt"
    general.write_text("the quick brown fox jumps over the lazy dog\n\nsome general text for a general eval set\n")
    out = tmp_path / "run"
    result = fastlora.train(**options(tiny_model, task_file, out, max_steps=4, eval_steps=2, lr=3e-3,
                                      eval_data=[f"general={general}", f"tasks={task_file}"]))
    records = read_metrics(out)
    assert records == result.metrics and [r["step"] for r in records] == [0, 1, 2, 3, 4]
    base = records[0]
    assert set(base) == {"step", "eval_loss", "eval_general_loss", "eval_general_ppl", "eval_tasks_loss",
                         "eval_tasks_ppl"}
    for r in records:
        has_eval = r["step"] in (0, 2, 4)
        assert ("eval_general_loss" in r) == has_eval and ("eval_tasks_loss" in r) == has_eval
        if has_eval:
            assert r["eval_general_ppl"] == pytest.approx(math.exp(r["eval_general_loss"]))
    # The task set is the training data: its loss falls from the base level.
    assert records[-1]["eval_tasks_loss"] < base["eval_tasks_loss"]


@pytest.mark.parametrize("spec,message", [
    ("general", "expected NAME=FILE"),
    ("=x.txt", "expected NAME=FILE"),
    ("bad name=x.txt", "expected NAME=FILE"),
    ("general={missing}", "no such eval data file"),
])
def test_eval_data_errors_are_one_line(tiny_model, task_file, tmp_path, spec, message):
    spec = spec.format(missing=tmp_path / "missing.txt")
    with pytest.raises(TrainError, match=message):
        fastlora.train(**options(tiny_model, task_file, tmp_path / "run", eval_data=[spec]))
    twice = [f"a={task_file}", f"a={task_file}"]
    with pytest.raises(TrainError, match="given twice"):
        fastlora.train(**options(tiny_model, task_file, tmp_path / "run2", eval_data=twice))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(TrainError, match="empty.jsonl"):
        fastlora.train(**options(tiny_model, task_file, tmp_path / "run3", eval_data=[f"e={empty}"]))


def test_resume_with_eval_sets_keeps_one_base_record(tiny_model, task_file, tmp_path):
    general = tmp_path / "general.txt"
    general.write_text("plain general text, a few words long\n")
    opts = dict(max_steps=4, save_steps=2, save_total_limit=0, eval_steps=1, eval_data=[f"g={general}"])
    full = tmp_path / "full"
    fastlora.train(**options(tiny_model, task_file, full, **opts))

    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        fastlora.train(**options(tiny_model, task_file, cut, **opts), callback=interrupt_at(3, KeyboardInterrupt))
    fastlora.train(**options(tiny_model, task_file, cut, resume=True, **opts))
    resumed, uninterrupted = read_metrics(cut), read_metrics(full)
    assert [r["step"] for r in resumed] == [r["step"] for r in uninterrupted] == [0, 1, 2, 3, 4]
    for a, b in zip(resumed, uninterrupted, strict=True):
        assert a["eval_g_loss"] == pytest.approx(b["eval_g_loss"], abs=1e-6)


# -- early stopping, data mixing, sample generations, TensorBoard ---------------------------


@pytest.fixture(scope="session")
def four_examples(tmp_path_factory) -> Path:
    """Four prompt/response pairs: three to overfit, one held out (--eval-fraction 0.25)."""
    path = tmp_path_factory.mktemp("four") / "four.jsonl"
    path.write_text("\n".join(modeling.default_data_path().read_text().splitlines()[:4]) + "\n")
    return path


def overfit(model: Path, data_file: Path, out: Path, **overrides) -> dict:
    return options(model, data_file, out, **{**dict(max_steps=40, eval_steps=2, lr=1e-2, lora_r=8, lora_alpha=16,
                                                    lora_dropout=0.0, eval_fraction=0.25, packing=False,
                                                    early_stopping_patience=3), **overrides})


def test_early_stopping_keeps_the_best_adapter(tiny_model, four_examples, tmp_path):
    """Overfitting three examples: the held-out loss stops falling, the run stops after three
    evals without improvement, and adapter/ (and the returned model) hold the best eval's
    adapter, best/; with --no-load-best adapter/ holds the last one."""
    out = tmp_path / "run"
    result = fastlora.train(**overfit(tiny_model, four_examples, out))
    records = read_metrics(out)
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    best_step, best = min(evals, key=lambda e: e[1])
    assert result.stopped_early and result.step < 40 and records[-1]["step"] == result.step
    assert (result.best_step, result.best_score) == (best_step, pytest.approx(best))
    assert [s for s, _ in evals][-3:] == [result.step - 4, result.step - 2, result.step]
    assert all(loss >= best for _, loss in evals[-3:]) and best_step == result.step - 6
    assert json.loads((out / "best" / "best_metric.json").read_text()) == {
        "metric": "eval_loss", "score": pytest.approx(best), "step": best_step}
    assert_same_adapter(out / "adapter", out / "best", tol=0)
    # The returned model is the best one: its held-out loss is the best eval's.
    from fastlora.train.trainer import Trainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    dataset = data.load_dataset(four_examples, tokenizer, 32, False, 0.25, 7)
    info = fastlora.train.distributed.setup("none", "cpu")
    again = Trainer(result.model, dataset, TrainConfig(batch_size=2), info).evaluate()
    assert again == pytest.approx(best, abs=1e-5)

    last = tmp_path / "last"
    fastlora.train(**overfit(tiny_model, four_examples, last, load_best=False))
    assert_same_adapter(last / "best", out / "best")
    with pytest.raises(AssertionError):
        assert_same_adapter(last / "adapter", last / "best")

    # A best adapter damaged before the end: one error naming it, and no adapter/ written.
    def corrupt(record):
        if record["step"] == 6:
            (tmp_path / "bad" / "best" / "adapter_model.safetensors").write_bytes(b"not safetensors")

    with pytest.raises(TrainError, match="best: the best adapter cannot be loaded back"):
        fastlora.train(**overfit(tiny_model, four_examples, tmp_path / "bad", max_steps=6), callback=corrupt)
    assert not (tmp_path / "bad" / "adapter").exists()


_KILL_RUN = """
import os, signal, sys, json
import torch
import fastlora
torch.set_num_threads(1)
def kill_at(record):
    if record["step"] == int(sys.argv[2]):
        os.kill(os.getpid(), signal.SIGKILL)
fastlora.train(**json.loads(sys.argv[1]), callback=kill_at)
"""


def test_killed_and_resumed_run_has_the_same_metrics_best_and_data(tiny_model, four_examples, task_file, tmp_path):
    """A mixed-data run with early stopping, SIGKILLed after a new best at step 5 (checkpoint
    at 4): resuming gives the uninterrupted run's metrics (so its data order), best adapter,
    stopping step and final adapter."""
    opts = overfit(tiny_model, four_examples, tmp_path / "full", eval_steps=1, save_steps=2, save_total_limit=0,
                   data=[f"{four_examples}:3", f"{task_file}:1"], eval_fraction=0.1)
    full = fastlora.train(**opts)
    records = read_metrics(tmp_path / "full")
    assert full.stopped_early
    best_steps = [r["step"] for i, r in enumerate(records)
                  if r["eval_loss"] < min([x["eval_loss"] for x in records[:i]], default=math.inf)]
    kill = next(s for s in best_steps if s % 2 == 1 and s + 1 < full.step)  # a best written after a checkpoint
    cut = {**opts, "output_dir": str(tmp_path / "cut")}
    proc = subprocess.run([sys.executable, "-c", _KILL_RUN, json.dumps(cut), str(kill)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr
    assert json.loads((tmp_path / "cut" / "best" / "best_metric.json").read_text())["step"] == kill
    resumed = fastlora.train(**{**cut, "resume": True})
    assert (resumed.step, resumed.best_step) == (full.step, full.best_step)
    assert_same_metrics(read_metrics(tmp_path / "cut"), records)
    assert_same_adapter(tmp_path / "cut" / "best", tmp_path / "full" / "best")
    assert_same_adapter(tmp_path / "cut" / "adapter", tmp_path / "full" / "adapter")


def test_mixed_sources_are_drawn_by_weight_deterministically():
    sampler = data.MixedSampler([5, 40], [3.0, 1.0], seed=11)
    rows = sampler.indices(0, 1000)
    first = sum(1 for i in rows if i < 5)
    # Binomial(1000, 0.75): mean 750, sd 13.7; 4.5 sd either side.
    assert 750 - 62 <= first <= 750 + 62
    assert rows == data.MixedSampler([5, 40], [3.0, 1.0], seed=11).indices(0, 1000)
    assert rows != data.MixedSampler([5, 40], [3.0, 1.0], seed=12).indices(0, 1000)
    # A function of the position: any window equals the same slice of one long draw, also
    # across the chunks the sources are drawn in (as a resumed run asks for it).
    long = sampler.indices(0, 9000)
    fresh = data.MixedSampler([5, 40], [3.0, 1.0], seed=11)
    assert fresh.indices(8190, 20) == long[8190:8210] and fresh.indices(3, 7) == long[3:10]
    # Each source is visited in its own epochs: every row once before any row twice.
    small = [i for i in long if i < 5]
    assert all(sorted(small[k:k + 5]) == list(range(5)) for k in range(0, 25, 5))
    big = [i - 5 for i in long if i >= 5]
    assert sorted(big[:40]) == list(range(40))
    # Weights are relative; a sampler over one source is the plain one.
    assert data.MixedSampler([5, 40], [0.3, 0.1], seed=11).indices(0, 50) == rows[:50]
    dataset = data.Dataset(train=[None] * 6, eval=[], pad_id=0, source="x")
    assert isinstance(data.sampler_for(dataset, 1), data.Sampler)


def test_data_mixing_end_to_end(tiny_model, task_file, tmp_path, capsys):
    general = tmp_path / "general.txt"
    general.write_text("\n\n".join(f"general text number {i} about nothing in particular" for i in range(30)))
    out = tmp_path / "run"
    result = fastlora.train(**options(tiny_model, task_file, out, data=[f"{task_file}:3", f"{general}:1"],
                                      max_steps=3))
    assert result.step == 3 and len(read_metrics(out)) == 3
    assert f"{task_file} (75%) + {general} (25%)" in capsys.readouterr().err


def test_sample_prompts_are_generated_at_every_eval(tiny_model, task_file, tmp_path):
    from fastlora.train.generate import continue_prompts

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("upper candle:\n40+55=\n")
    out = tmp_path / "run"
    result = fastlora.train(**options(tiny_model, task_file, out, sample_prompts=str(prompts),
                                      sample_max_new_tokens=5, lr=3e-3))
    records = read_metrics(out)
    assert [r["step"] for r in records if "samples" in r] == [0, 2, 4]
    for r in records:
        if "samples" in r:
            assert [s["prompt"] for s in r["samples"]] == ["upper candle:", "40+55="]
    # The last samples are the trained model's own greedy continuations.
    own = continue_prompts(result.model.eval(), result.tokenizer, ["upper candle:", "40+55="], 5)
    assert [s["output"] for s in records[-1]["samples"]] == own


def test_tensorboard_event_files_hold_the_metrics(tiny_model, task_file, tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    out = tmp_path / "run"
    fastlora.train(**options(tiny_model, task_file, out, report_to="tensorboard"))
    events = event_accumulator.EventAccumulator(str(out / "runs"))
    events.Reload()
    records = read_metrics(out)
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [
        (r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in records]
    assert [e.step for e in events.Scalars("eval_loss")] == [2, 4]


def test_progress_bar_shows_tokens_per_second(tiny_model, task_file, tmp_path, capsys):
    fastlora.train(**options(tiny_model, task_file, tmp_path / "run", max_steps=2, progress=True))
    assert "tok/s=" in capsys.readouterr().err


def test_monitoring_errors_are_one_line(tiny_model, task_file, tmp_path, capsys, monkeypatch):
    base = ["train", "--model", str(tiny_model), "--output-dir", str(tmp_path / "out"), "--max-steps", "1",
            "--no-progress", "--max-length", "16"]
    for weight in ("abc", "0", "-1", "nan"):
        assert main(base + ["--data", f"{task_file}:{weight}"]) == 2
        assert f"the weight after ':' must be a positive number, got {weight!r}" in _error_line(capsys)
    assert main(base + ["--data", str(task_file), "--early-stopping-patience", "2", "--early-stopping-metric",
                        "eval_general_loss"]) == 2
    assert "unknown metric 'eval_general_loss'; expected one of eval_loss" in _error_line(capsys)
    assert main(base + ["--data", str(task_file), "--early-stopping-patience", "2", "--eval-fraction", "0"]) == 2
    assert "--early-stopping-metric eval_loss: there is no held-out split" in _error_line(capsys)
    assert main(base + ["--data", str(task_file), "--sample-prompts", str(tmp_path / "none.txt")]) == 2
    assert "none.txt: no such prompts file" in _error_line(capsys)
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    assert main(base + ["--data", str(task_file), "--report-to", "tensorboard"]) == 2
    assert "--report-to tensorboard: the tensorboard package is not installed" in _error_line(capsys)


# -- sequence classification ------------------------------------------------------------------

SENTIMENT = [("what a lovely bright day", "positive"), ("this is wonderful and kind", "positive"),
             ("great work, well done", "positive"), ("i love this song", "positive"),
             ("a terrible awful mess", "negative"), ("this is bad and sad", "negative"),
             ("i hate the cold rain", "negative"), ("what a horrible noise", "negative"),
             ("the sky is grey today", "neutral"), ("the table has four legs", "neutral"),
             ("it is a tuesday", "neutral"), ("the box holds two cups", "neutral")]


@pytest.fixture
def labelled(tmp_path) -> Path:
    path = tmp_path / "labelled.jsonl"
    rows = SENTIMENT * 3
    path.write_text("".join(json.dumps({"text": t, "label": label}) + "\n" for t, label in rows))
    return path


def save_tiny_bert(path: Path) -> Path:
    from transformers import BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(modeling.embedded_model_dir())
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, pad_token_id=tokenizer.eos_token_id)
    torch.manual_seed(3)
    BertModel(config).save_pretrained(path)  # a base checkpoint: the classifier head is new
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_seq_cls_trains_a_classifier_whose_head_reloads_in_peft(kind, tiny_model, labelled, tmp_path):
    model_dir = tiny_model if kind == "llama" else save_tiny_bert(tmp_path / "bert")
    out = tmp_path / "run"
    result = fastlora.train(**options(model_dir, labelled, out, task="seq-cls", max_steps=16, lr=5e-3, eval_steps=8,
                                      eval_fraction=0.25, max_length=16, lora_dropout=0.0, batch_size=8,
                                      merge=True))
    records = read_metrics(out)
    evals = [r for r in records if "eval_loss" in r]
    assert len(evals) == 2 and all(0 <= r["eval_accuracy"] <= 1 and 0 <= r["eval_macro_f1"] <= 1 for r in evals)
    losses = [r["loss"] for r in records]
    if kind == "llama":  # it learns (a random BERT pools its first token, the same bos everywhere: slowly)
        assert sum(losses[-4:]) < sum(losses[:4]) and evals[1]["eval_loss"] < evals[0]["eval_loss"]
    head = "score" if kind == "llama" else "classifier"
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == [head]
    trained = result.model.eval()
    assert trained.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    # The head comes back trained, through PEFT over the dequantized base, and here.
    import peft
    from transformers import AutoModelForSequenceClassification

    ids = torch.randint(0, 200, (3, 9))
    with torch.no_grad():
        ours = trained(input_ids=ids).logits
    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=3,
                                                              pad_token_id=trained.config.pad_token_id)
    for name, layer in lora_layers(trained).items():
        base.get_submodule(name).weight.data = layer.base_layer.dequantize()
    theirs = peft.PeftModel.from_pretrained(base, out / "adapter").eval()
    merged = AutoModelForSequenceClassification.from_pretrained(out / "merged").eval()
    assert not any(isinstance(m, Linear4bit) for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, ours, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(merged(input_ids=ids).logits, ours, rtol=1e-4, atol=1e-4)


def test_seq_cls_accuracy_and_f1_are_those_of_the_predictions(tiny_model, labelled, tmp_path):
    result = fastlora.train(**options(tiny_model, labelled, tmp_path / "run", task="seq-cls", max_steps=2,
                                      eval_fraction=0.5, max_length=16))
    records = read_metrics(tmp_path / "run")
    model = result.model.eval()
    tokenizer = result.tokenizer
    classes = [model.config.id2label[i] for i in range(3)]
    dataset = data.load_dataset(labelled, tokenizer, 16, False, 0.5, 7, classes=classes)
    truth, predicted = [], []
    with torch.no_grad():
        for example in dataset.eval:
            logits = model(input_ids=torch.tensor([example.input_ids])).logits
            truth.append(example.label)
            predicted.append(int(logits.argmax()))
    accuracy = sum(t == p for t, p in zip(truth, predicted, strict=True)) / len(truth)
    f1s = []
    for c in sorted(set(truth) | set(predicted)):
        tp = sum(t == c and p == c for t, p in zip(truth, predicted, strict=True))
        f1s.append(2 * tp / (truth.count(c) + predicted.count(c)))
    assert records[-1]["eval_accuracy"] == pytest.approx(accuracy)
    assert records[-1]["eval_macro_f1"] == pytest.approx(sum(f1s) / len(f1s))


def test_seq_cls_bad_data_is_a_clear_error(tiny_model, tmp_path):
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": "x"}\n')
    with pytest.raises(TrainError, match="mixes integer and named labels"):
        fastlora.train(**options(tiny_model, mixed, tmp_path / "a", task="seq-cls"))
    unlabelled = tmp_path / "unlabelled.jsonl"
    unlabelled.write_text('{"text": "a", "label": 0}\n{"text": "b"}\n')
    with pytest.raises(TrainError, match='record 2 has no "label"'):
        fastlora.train(**options(tiny_model, unlabelled, tmp_path / "b", task="seq-cls"))
    with pytest.raises(TrainError, match="--task"):
        fastlora.train(**options(tiny_model, unlabelled, tmp_path / "c", task="regression"))


def test_early_stopping_follows_a_classifier_metric_upwards():
    from fastlora.train.early_stopping import EarlyStopping, check_metric

    check_metric("eval_macro_f1", ["held"], "seq-cls")
    check_metric("eval_held_accuracy", ["held"], "seq-cls")
    with pytest.raises(TrainError, match="unknown metric 'eval_held_ppl'"):
        check_metric("eval_held_ppl", ["held"], "seq-cls")
    with pytest.raises(TrainError, match="unknown metric 'eval_accuracy'"):
        check_metric("eval_accuracy", [], "causal-lm")
    tracker = EarlyStopping("eval_accuracy", patience=2, min_delta=0.01)
    assert tracker.update(1, {"eval_accuracy": 0.5}) and tracker.best == 0.5
    assert tracker.update(2, {"eval_accuracy": 0.7}) and tracker.best_step == 2
    assert not tracker.update(3, {"eval_accuracy": 0.705})  # within min_delta
    assert not tracker.update(4, {"eval_accuracy": 0.6}) and tracker.should_stop


@pytest.mark.parametrize("native", [True, False])
def test_precision_auto_trains_in_bf16_on_a_cpu_with_native_bf16_and_says_so(monkeypatch, capsys, native):
    from fastlora.train import trainer
    from fastlora.train.distributed import DistInfo

    monkeypatch.setattr(trainer._native, "native_bf16", lambda: native)
    info = DistInfo("none", device=torch.device("cpu"))
    assert trainer._precision(TrainConfig(precision="auto"), info) == (torch.bfloat16 if native else None)
    assert ("--precision auto: bf16 autocast" in capsys.readouterr().err) == native
    assert trainer._precision(TrainConfig(precision="fp32"), info) is None
    assert trainer._precision(TrainConfig(precision="bf16"), info) is torch.bfloat16


def test_bf16_loss_curve_stays_within_bf16_noise_of_fp32(tmp_path):
    """The shipped tiny Llama on the shipped task set, six steps in fp32 and under bf16
    autocast: the same data and initialization, so the curves differ by rounding only."""
    runs = {}
    for precision in ("fp32", "bf16"):
        result = fastlora.train(output_dir=str(tmp_path / precision), max_steps=6, batch_size=2, max_length=48,
                                progress=False, save_steps=0, eval_fraction=0.01, lr=3e-3, precision=precision,
                                seed=3)
        runs[precision] = [r["loss"] for r in result.metrics]
    fp32, bf16 = runs["fp32"], runs["bf16"]
    assert len(fp32) == len(bf16) == 6
    assert fp32 != bf16  # bf16 did run in bf16
    for a, b in zip(fp32, bf16, strict=True):
        assert abs(a - b) <= 0.01 * abs(a), (fp32, bf16)
    assert bf16[-1] < bf16[0]
