"""Model-level API on tiny Hugging Face models built from configs (no downloads):
`prepare_model`, `save_adapter`/`load_adapter` against peft in both directions,
`merge_and_unload`, and adapters or arguments that do not fit."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

import fastlora
import fastlora.adapter
from fastlora.nn import Linear4bit, LoraLinear

LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def llama(tie: bool = False) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                         tie_word_embeddings=tie)
    return LlamaForCausalLM(config).eval()


def bert() -> BertForSequenceClassification:
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=32, num_labels=3)
    return BertForSequenceClassification(config).eval()


def tokens(gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 64, (2, 7), generator=gen)


def run(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def randomize_lora(model: nn.Module, gen: torch.Generator) -> None:
    """Random A and B (B is zero after the default init), so adapters change the output; the
    update B @ A is about as large as the base weights (std 0.02)."""
    for name, param in model.named_parameters():
        if "lora_A" in name or "lora_B" in name:
            with torch.no_grad():
                param.copy_(torch.randn(param.shape, generator=gen) * (0.1 if "lora_A" in name else 0.05))


def dequantized_base(base: nn.Module, prepared: nn.Module) -> nn.Module:
    """A copy of the original model whose targeted linear weights are fastlora's dequantized ones."""
    dense = copy.deepcopy(base)
    for name, layer in prepared.named_modules():
        if isinstance(layer, LoraLinear) and isinstance(layer.base_layer, Linear4bit):
            with torch.no_grad():
                dense.get_submodule(name).weight.copy_(layer.base_layer.dequantize())
    return dense


def snapshot(model: nn.Module) -> dict:
    """Module types, every state-dict tensor's bytes and every parameter's requires_grad."""
    out = {"types": [(n, type(m).__name__) for n, m in model.named_modules()]}
    out.update({k: v.detach().clone().reshape(-1).view(torch.uint8) for k, v in model.state_dict().items()})
    out.update({f"{k}.requires_grad": p.requires_grad for k, p in model.named_parameters()})
    out["has_config"] = hasattr(model, "fastlora_config")
    return out


def assert_unchanged(before: dict, model: nn.Module) -> None:
    after = snapshot(model)
    assert before.keys() == after.keys()
    for key, value in before.items():
        same = torch.equal(value, after[key]) if isinstance(value, torch.Tensor) else value == after[key]
        assert same, f"{key} changed"


def dir_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


# ---------------------------------------------------------------------------------------------
# prepare_model
# ---------------------------------------------------------------------------------------------


def test_prepare_llama_all_linear_skips_the_head_and_freezes_all_but_lora(gen):
    base = llama()
    model = fastlora.prepare_model(copy.deepcopy(base), r=4, lora_alpha=8)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}
    assert len(layers) == 2 * len(LLAMA_LINEARS)
    assert all(isinstance(m.base_layer, Linear4bit) for m in layers.values())
    assert type(model.lm_head) is nn.Linear
    assert not any(type(m) is nn.Linear for n, m in model.named_modules() if ".lora_" not in n and n != "lm_head")
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(f"{n}.lora_{p}.weight" for n in layers for p in "AB")
    assert model.fastlora_config["target_modules"] == list(layers)
    # PEFT's "all-linear" picks the same layers.
    ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    peft_names = {n.removeprefix("base_model.model.") for n, m in ref.named_modules()
                  if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert peft_names == set(layers)

    # A fresh adapter leaves the output of the (dequantized) base unchanged.
    ids = tokens(gen)
    torch.testing.assert_close(run(model, ids), run(dequantized_base(base, model), ids), rtol=1e-5, atol=1e-5)
    # Training reaches the adapters only.
    model.train()
    model(input_ids=ids).logits.square().mean().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)


def test_prepare_with_a_tied_head_and_a_target_list(gen):
    base = llama(tie=True)
    model = fastlora.prepare_model(copy.deepcopy(base), r=2, target_modules=["q_proj", "self_attn.v_proj"],
                                   quantize=False)
    names = sorted(n for n, m in model.named_modules() if isinstance(m, LoraLinear))
    assert names == sorted(f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj"))
    assert all(type(m.base_layer) is nn.Linear for n, m in model.named_modules() if isinstance(m, LoraLinear))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = tokens(gen)
    assert torch.equal(run(model, ids), run(base, ids))


def test_prepare_bert(gen):
    base = bert()
    model = fastlora.prepare_model(copy.deepcopy(base), r=4, target_modules=["query", "value", "dense"],
                                   compute_dtype=torch.bfloat16, quant_type="fp4", blocksize=32)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}
    assert "bert.pooler.dense" in layers and "bert.encoder.layer.1.attention.self.value" in layers
    assert "classifier" not in layers and type(model.classifier) is nn.Linear
    assert all(m.base_layer.quant_type == "fp4" and m.base_layer.blocksize == 32 for m in layers.values())
    ids = tokens(gen)
    out = run(model, ids)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, run(dequantized_base(base, model), ids), rtol=3e-2, atol=3e-2)
    # "all-linear" on a model without an output embedding takes every linear layer.
    every = fastlora.prepare_model(copy.deepcopy(base), r=2)
    assert sum(isinstance(m, LoraLinear) for m in every.modules()) == sum(
        type(m) is nn.Linear for m in base.modules())


def test_prepare_plain_torch_model_skips_a_module_named_lm_head(gen):
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(32, 32))
    model.add_module("act", nn.ReLU())
    model.add_module("lm_head", nn.Linear(32, 16))
    fastlora.prepare_model(model, r=2)
    assert isinstance(model.proj, LoraLinear) and type(model.lm_head) is nn.Linear
    model(torch.randn(3, 32, generator=gen)).sum().backward()


def test_prepare_leaves_multihead_attention_projections_alone(gen):
    """nn.MultiheadAttention reads out_proj.weight directly: "all-linear" skips it, naming it raises."""
    layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, batch_first=True, dropout=0.0)
    before = snapshot(layer)
    with pytest.raises(ValueError, match=r"self_attn\.out_proj.*MultiheadAttention"):
        fastlora.prepare_model(layer, target_modules=["out_proj", "linear1"])
    assert_unchanged(before, layer)
    x = torch.randn(2, 5, 32, generator=gen)
    with torch.no_grad():
        expected = layer(x)
    fastlora.prepare_model(layer, r=2, quantize=False)
    assert type(layer.self_attn.out_proj) is not LoraLinear
    assert isinstance(layer.linear1, LoraLinear) and isinstance(layer.linear2, LoraLinear)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"r": 0}, ValueError, "r must"),
        ({"r": 4.5}, ValueError, "r must"),
        ({"lora_alpha": 0}, ValueError, "lora_alpha"),
        ({"lora_alpha": float("nan")}, ValueError, "lora_alpha"),
        ({"lora_dropout": 1.5}, ValueError, "lora_dropout"),
        ({"init_lora_weights": "olora"}, ValueError, "init_lora_weights"),
        ({"target_modules": ["no_such_layer"]}, ValueError, "matches no"),
        ({"target_modules": "embed_tokens"}, ValueError, "matches no"),
        ({"target_modules": 7}, ValueError, "target_modules"),
        ({"target_modules": ["q_proj", ""]}, ValueError, "target_modules"),
        ({"quant_type": "int4"}, ValueError, "quant_type"),
        ({"blocksize": 100}, ValueError, "blocksize"),
        ({"compute_dtype": torch.float64}, ValueError, "compute_dtype"),
    ],
)
def test_prepare_rejects_bad_arguments_and_leaves_the_model_as_it_was(kwargs, error, match):
    model = llama()
    before = snapshot(model)
    with pytest.raises(error, match=match):
        fastlora.prepare_model(model, **kwargs)
    assert_unchanged(before, model)


def test_prepare_rejects_a_nan_weight_before_changing_anything():
    model = llama()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("inf")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.down_proj\.weight.*NaN or Inf"):
        fastlora.prepare_model(model)
    assert_unchanged(before, model)


def test_prepare_twice_raises():
    model = fastlora.prepare_model(llama(), r=2)
    before = snapshot(model)
    with pytest.raises(ValueError, match="already"):
        fastlora.prepare_model(model, r=2)
    assert_unchanged(before, model)


# ---------------------------------------------------------------------------------------------
# Adapters against peft
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_rslora", [False, True])
def test_saved_adapter_loads_in_peft_with_the_same_outputs(use_rslora, gen, tmp_path):
    base = llama()
    model = fastlora.prepare_model(copy.deepcopy(base), r=4, lora_alpha=8, lora_dropout=0.1, use_rslora=use_rslora,
                                   quantize=False)
    randomize_lora(model, gen)
    model.eval()
    fastlora.save_adapter(model, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"adapter_config.json", "adapter_model.safetensors",
                                                    "fastlora_config.json"}
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"], config["use_rslora"]) == (4, 8, 0.1, use_rslora)
    assert config["task_type"] == "CAUSAL_LM" and sorted(config["target_modules"]) == sorted(LLAMA_LINEARS)

    ref = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    ids = tokens(gen)
    out = run(model, ids)
    assert (out - run(base, ids)).abs().max() > 1e-2  # the adapter does something
    torch.testing.assert_close(out, run(ref, ids), rtol=1e-6, atol=1e-6)
    # The same keys as peft's own adapter state dict.
    assert set(load_file(tmp_path / "adapter_model.safetensors")) == set(peft.get_peft_model_state_dict(ref))


def test_saved_quantized_adapter_matches_peft_over_the_dequantized_base(gen, tmp_path):
    base = llama()
    model = fastlora.prepare_model(copy.deepcopy(base), r=4, lora_alpha=16, target_modules=["q_proj", "up_proj",
                                                                                           "down_proj"])
    randomize_lora(model, gen)
    fastlora.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "fastlora_config.json").read_text()) == {
        "quant_type": "nf4", "compress_statistics": True, "blocksize": 64, "quantize": True}
    ref = peft.PeftModel.from_pretrained(dequantized_base(base, model), tmp_path).eval()
    ids = tokens(gen)
    torch.testing.assert_close(run(model, ids), run(ref, ids), rtol=1e-5, atol=1e-5)


def test_bert_adapter_round_trips_through_peft(gen, tmp_path):
    base = bert()
    model = fastlora.prepare_model(copy.deepcopy(base), r=4, lora_alpha=4, target_modules=["query", "value"],
                                   quantize=False)
    randomize_lora(model, gen)
    fastlora.save_adapter(model, tmp_path)
    ref = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    ids = tokens(gen)
    torch.testing.assert_close(run(model, ids), run(ref, ids), rtol=1e-6, atol=1e-6)


@pytest.fixture
def peft_adapter(gen, tmp_path):
    """A peft-written adapter with random A and B, and the base model it was made on."""
    base = llama()
    config = peft.LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True,
                             lora_dropout=0.05)
    ref = peft.get_peft_model(copy.deepcopy(base), config)
    randomize_lora(ref, gen)
    ref.save_pretrained(tmp_path / "peft")
    return base, ref.eval(), tmp_path / "peft"


def test_load_adapter_written_by_peft_into_an_unprepared_model(peft_adapter, gen):
    base, ref, directory = peft_adapter
    model = fastlora.load_adapter(copy.deepcopy(base), directory, quantize=False).eval()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}
    assert len(layers) == 6 and all(m.use_rslora and m.r == 4 for m in layers.values())
    ids = tokens(gen)
    torch.testing.assert_close(run(model, ids), run(ref, ids), rtol=1e-6, atol=1e-6)


def test_load_adapter_written_by_peft_into_a_quantized_model(peft_adapter, gen):
    base, _, directory = peft_adapter
    model = fastlora.load_adapter(copy.deepcopy(base), directory, quant_type="fp4").eval()
    assert all(m.base_layer.quant_type == "fp4" for m in model.modules() if isinstance(m, LoraLinear))
    ref = peft.PeftModel.from_pretrained(dequantized_base(base, model), directory).eval()
    ids = tokens(gen)
    torch.testing.assert_close(run(model, ids), run(ref, ids), rtol=1e-5, atol=1e-5)


def test_load_adapter_written_by_peft_into_a_prepared_model(peft_adapter, gen):
    base, ref, directory = peft_adapter
    model = fastlora.prepare_model(copy.deepcopy(base), r=4, lora_alpha=12, use_rslora=True, quantize=False,
                                   target_modules=["q_proj", "v_proj", "down_proj"])
    fastlora.load_adapter(model, directory)
    ids = tokens(gen)
    torch.testing.assert_close(run(model.eval(), ids), run(ref, ids), rtol=1e-6, atol=1e-6)


def test_load_all_linear_adapter_written_by_peft(gen, tmp_path):
    """peft saves "all-linear" expanded to full module names."""
    base = llama()
    ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"))
    randomize_lora(ref, gen)
    ref.save_pretrained(tmp_path)
    model = fastlora.load_adapter(copy.deepcopy(base), tmp_path, quantize=False)
    assert sum(isinstance(m, LoraLinear) for m in model.modules()) == 14
    ids = tokens(gen)
    torch.testing.assert_close(run(model, ids), run(ref.eval(), ids), rtol=1e-6, atol=1e-6)


def test_bf16_model_matches_peft_over_the_dequantized_base(gen, tmp_path):
    base = llama().to(torch.bfloat16)
    model = fastlora.prepare_model(copy.deepcopy(base), r=4, lora_alpha=8, target_modules=["v_proj", "up_proj"])
    assert all(m.base_layer.weight_dtype == torch.bfloat16 and m.lora_A.weight.dtype == torch.float32
               for m in model.modules() if isinstance(m, LoraLinear))
    randomize_lora(model, gen)
    fastlora.save_adapter(model, tmp_path)
    ref = peft.PeftModel.from_pretrained(dequantized_base(base, model), tmp_path).eval()
    ids = tokens(gen)
    out = run(model, ids)
    assert out.dtype == torch.bfloat16
    expected = run(ref, ids).float()
    # bf16 activations on both sides, rounded at different places: compare as a whole.
    assert torch.linalg.norm(out.float() - expected) <= 2e-2 * torch.linalg.norm(expected)


def test_whole_model_state_dict_round_trips_through_safetensors(gen, tmp_path):
    trained = fastlora.prepare_model(llama(), r=4, target_modules=["q_proj", "down_proj"])
    randomize_lora(trained, gen)
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, tmp_path / "model.safetensors")
    fresh = fastlora.prepare_model(llama(), r=4, target_modules=["q_proj", "down_proj"])
    fresh.load_state_dict(load_file(tmp_path / "model.safetensors"))
    ids = tokens(gen)
    assert torch.equal(run(fresh, ids), run(trained, ids))
    assert torch.equal(run(copy.deepcopy(trained), ids), run(trained, ids))


def test_own_adapter_round_trips_with_its_quantization_settings(gen, tmp_path):
    base = llama()
    model = fastlora.prepare_model(copy.deepcopy(base), r=3, lora_alpha=5, quant_type="fp4", blocksize=32,
                                   compress_statistics=False)
    randomize_lora(model, gen)
    fastlora.save_adapter(model, tmp_path)
    loaded = fastlora.load_adapter(copy.deepcopy(base), tmp_path)
    bases = [m.base_layer for m in loaded.modules() if isinstance(m, LoraLinear)]
    assert len(bases) == 14
    assert all((b.quant_type, b.blocksize, b.compress_statistics) == ("fp4", 32, False) for b in bases)
    ids = tokens(gen)
    assert torch.equal(run(loaded, ids), run(model, ids))
    # Into an already prepared model: the adapter weights replace the fresh ones.
    other = fastlora.prepare_model(copy.deepcopy(base), r=3, lora_alpha=5, quant_type="fp4", blocksize=32,
                                   compress_statistics=False)
    fastlora.load_adapter(other, tmp_path)
    assert torch.equal(run(other, ids), run(model, ids))


# ---------------------------------------------------------------------------------------------
# merge_and_unload
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compute_dtype", [None, torch.bfloat16])
def test_merge_and_unload_gives_dense_layers_with_the_same_outputs(compute_dtype, gen):
    model = fastlora.prepare_model(llama(), r=4, lora_alpha=8, compute_dtype=compute_dtype)
    randomize_lora(model, gen)
    ids = tokens(gen)
    before = run(model, ids)
    merged = fastlora.merge_and_unload(model)
    assert merged is model and not hasattr(model, "fastlora_config")
    assert not any(isinstance(m, (LoraLinear, Linear4bit)) for m in model.modules())
    q = model.model.layers[0].self_attn.q_proj
    assert type(q) is nn.Linear and q.weight.dtype == (compute_dtype or torch.float32)
    if compute_dtype is None:
        torch.testing.assert_close(run(model, ids), before, rtol=1e-5, atol=1e-5)
    else:
        # bf16 weights in an fp32 model: cast activations at the merged layers.
        for module in model.modules():
            if type(module) is nn.Linear and module.weight.dtype == torch.bfloat16:
                module.register_forward_pre_hook(lambda m, args: (args[0].to(torch.bfloat16),))
                module.register_forward_hook(lambda m, args, out: out.float())
        after = run(model, ids)
        # bf16 roundings at every layer on both sides, differently placed: compare as a whole.
        assert torch.linalg.norm(after - before) <= 2e-2 * torch.linalg.norm(before)
    with pytest.raises(ValueError, match="no LoRA layers"):
        fastlora.merge_and_unload(model)
    with pytest.raises(ValueError, match="no LoRA layers"):
        fastlora.save_adapter(model, "unused")


def test_merge_and_unload_of_a_dense_base_matches_peft(gen):
    base = llama()
    model = fastlora.prepare_model(copy.deepcopy(base), r=4, lora_alpha=8, quantize=False)
    randomize_lora(model, gen)
    ids = tokens(gen)
    before = run(model, ids)
    fastlora.merge_and_unload(model)
    torch.testing.assert_close(run(model, ids), before, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Adapters that do not fit, and failing saves
# ---------------------------------------------------------------------------------------------


def _rewrite_config(directory: Path, **changes) -> None:
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _rewrite_weights(directory: Path, change) -> None:
    path = directory / "adapter_model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


def _first_key(tensors: dict, part: str = "lora_A") -> str:
    return sorted(k for k in tensors if part in k)[0]


BAD_ADAPTERS = [
    ("truncated weights", lambda d: (d / "adapter_model.safetensors").write_bytes(
        (d / "adapter_model.safetensors").read_bytes()[:-40]), ValueError, r"adapter_model\.safetensors"),
    ("garbage weights", lambda d: (d / "adapter_model.safetensors").write_bytes(b"\x10\x00" + b"x" * 64), ValueError,
     r"adapter_model\.safetensors"),
    ("missing weights", lambda d: (d / "adapter_model.safetensors").unlink(), FileNotFoundError,
     r"adapter_model\.safetensors"),
    ("missing config", lambda d: (d / "adapter_config.json").unlink(), FileNotFoundError, r"adapter_config\.json"),
    ("corrupt config", lambda d: (d / "adapter_config.json").write_text('{"r": 4, "lora_alpha": '), ValueError,
     r"adapter_config\.json.*JSON"),
    ("config not an object", lambda d: (d / "adapter_config.json").write_text("[4, 8]"), ValueError,
     r"adapter_config\.json"),
    ("other peft type", lambda d: _rewrite_config(d, peft_type="IA3"), ValueError, r"adapter_config\.json.*IA3"),
    ("bad r", lambda d: _rewrite_config(d, r=0), ValueError, r"adapter_config\.json.*\br\b"),
    ("bad alpha", lambda d: _rewrite_config(d, lora_alpha="eight"), ValueError, r"adapter_config\.json.*lora_alpha"),
    ("dora", lambda d: _rewrite_config(d, use_dora=True), ValueError, r"DoRA"),
    ("alpha pattern", lambda d: _rewrite_config(d, alpha_pattern={"q_proj": 32}), ValueError, r"alpha_pattern"),
    ("rank mismatch", lambda d: _rewrite_config(d, r=8), ValueError, r"r=8|\(8, 32\)"),
    ("alpha mismatch", lambda d: _rewrite_config(d, lora_alpha=99), ValueError, r"lora_alpha=99|lora_alpha"),
    ("missing key", lambda d: _rewrite_weights(d, lambda t: t.pop(_first_key(t, "lora_B"))), ValueError,
     r"adapter_model\.safetensors.*missing key .*lora_B\.weight"),
    ("extra key", lambda d: _rewrite_weights(d, lambda t: t.update({"base_model.model.extra.lora_A.weight":
                                                                     torch.ones(2, 2)})), ValueError,
     r"adapter_model\.safetensors.*unexpected key base_model\.model\.extra\.lora_A\.weight"),
    ("wrong shape", lambda d: _rewrite_weights(d, lambda t: t.update({_first_key(t): torch.ones(4, 31)})), ValueError,
     r"adapter_model\.safetensors.*lora_A\.weight has shape \(4, 31\)"),
    ("integer tensor", lambda d: _rewrite_weights(d, lambda t: t.update({_first_key(t): torch.ones(4, 32,
                                                                                             dtype=torch.int32)})),
     ValueError, r"lora_A\.weight.*dtype"),
    ("corrupt fastlora config", lambda d: (d / "fastlora_config.json").write_text("{"), ValueError,
     r"fastlora_config\.json"),
]


@pytest.mark.parametrize("prepared", [True, False], ids=["prepared", "unprepared"])
@pytest.mark.parametrize("case,corrupt,error,match", BAD_ADAPTERS, ids=[c[0] for c in BAD_ADAPTERS])
def test_bad_adapter_raises_naming_the_file_and_changes_nothing(case, corrupt, error, match, prepared, gen, tmp_path):
    source = fastlora.prepare_model(llama(), r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    randomize_lora(source, gen)
    fastlora.save_adapter(source, tmp_path)
    corrupt(tmp_path)
    if prepared and case == "corrupt fastlora config":
        pytest.skip("a prepared model does not read the quantization settings")
    if not prepared and case == "alpha mismatch":
        pytest.skip("an unprepared model takes lora_alpha from the config")
    model = llama()
    if prepared:
        fastlora.prepare_model(model, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    before = snapshot(model)
    with pytest.raises(error, match=match):
        fastlora.load_adapter(model, tmp_path)
    assert_unchanged(before, model)


def test_load_adapter_never_unpickles(tmp_path, monkeypatch, gen):
    source = fastlora.prepare_model(llama(), r=2, target_modules=["q_proj"])
    fastlora.save_adapter(source, tmp_path)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_model.safetensors").unlink()
    torch.save(weights, tmp_path / "adapter_model.bin")  # peft's legacy pickle format
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    model = llama()
    before = snapshot(model)
    with pytest.raises(FileNotFoundError, match=r"adapter_model\.safetensors"):
        fastlora.load_adapter(model, tmp_path)
    assert_unchanged(before, model)


def _failing_save_file(tensors, filename, metadata=None):
    Path(filename).write_bytes(b"partial")
    raise OSError("disk full")


def test_failing_save_leaves_the_previous_adapter_and_no_temporary_file(tmp_path, monkeypatch, gen):
    model = fastlora.prepare_model(llama(), r=2, target_modules=["q_proj", "o_proj"])
    randomize_lora(model, gen)
    fastlora.save_adapter(model, tmp_path)
    previous = dir_bytes(tmp_path)
    randomize_lora(model, gen)
    monkeypatch.setattr(fastlora.adapter, "save_file", _failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        fastlora.save_adapter(model, tmp_path)
    assert dir_bytes(tmp_path) == previous

    # A failure on a later file (the JSON config) also leaves every previous file as it was.
    monkeypatch.undo()

    def failing_dumps(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(fastlora.adapter.json, "dumps", failing_dumps)
    with pytest.raises(RuntimeError, match="interrupted"):
        fastlora.save_adapter(model, tmp_path)
    monkeypatch.undo()
    assert dir_bytes(tmp_path) == previous

    # Into a new directory: nothing is left behind but the directory.
    monkeypatch.setattr(fastlora.adapter, "save_file", _failing_save_file)
    with pytest.raises(OSError):
        fastlora.save_adapter(model, tmp_path / "new")
    assert os.listdir(tmp_path / "new") == []
    monkeypatch.undo()

    # And a successful save replaces the previous adapter.
    fastlora.save_adapter(model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted(previous) + ["new"]
    reloaded = load_file(tmp_path / "adapter_model.safetensors")
    assert torch.equal(reloaded["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"],
                       model.model.layers[0].self_attn.q_proj.lora_A.weight)


def test_save_adapter_refuses_mixed_ranks(tmp_path):
    model = nn.Sequential(LoraLinear(nn.Linear(8, 8), r=2), LoraLinear(nn.Linear(8, 8), r=4))
    with pytest.raises(ValueError, match="one r"):
        fastlora.save_adapter(model, tmp_path)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Classifier heads trained whole (`modules_to_save`)
# ---------------------------------------------------------------------------------------------


def llama_classifier() -> nn.Module:
    from transformers import LlamaForSequenceClassification

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, num_labels=3,
                         pad_token_id=0)
    return LlamaForSequenceClassification(config).eval()


def randomize_head(model: nn.Module, head: str, gen: torch.Generator) -> None:
    """A head unlike the base model's, as training would leave it."""
    with torch.no_grad():
        for p in model.get_submodule(head).parameters():
            p.add_(torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("make,head", [(llama_classifier, "score"), (bert, "classifier")])
def test_head_trained_with_modules_to_save_reloads_in_peft_and_here(make, head, gen, tmp_path):
    base = make()
    model = fastlora.prepare_model(copy.deepcopy(base), r=4, lora_alpha=8, quantize=False,
                                   modules_to_save=["score", "classifier"])
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n)
    assert trainable and all(n.startswith(head) for n in trainable)
    assert not any(isinstance(m, LoraLinear) and n.startswith(head) for n, m in model.named_modules())
    randomize_lora(model, gen)
    randomize_head(model, head, gen)
    fastlora.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["modules_to_save"] == [head] and config["task_type"] == "SEQ_CLS"
    ids = tokens(gen)
    expected = run(model.eval(), ids)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    torch.testing.assert_close(run(theirs, ids), expected, rtol=1e-6, atol=1e-6)
    again = fastlora.load_adapter(copy.deepcopy(base), tmp_path, quantize=False).eval()
    torch.testing.assert_close(run(again, ids), expected, rtol=1e-6, atol=1e-6)
    assert again.fastlora_config["modules_to_save"] == [head]
    assert all(p.requires_grad for p in again.get_submodule(head).parameters())


def test_head_saved_by_peft_comes_back_here(gen, tmp_path):
    base = llama_classifier()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["score"],
                             task_type="SEQ_CLS")
    ref = peft.get_peft_model(copy.deepcopy(base), config)
    randomize_lora(ref, gen)
    randomize_head(ref.base_model.model.score.modules_to_save["default"], "", gen)
    ref.save_pretrained(tmp_path)
    ids = tokens(gen)
    model = fastlora.load_adapter(copy.deepcopy(base), tmp_path, quantize=False).eval()
    torch.testing.assert_close(run(model, ids), run(ref.eval(), ids), rtol=1e-6, atol=1e-6)
    assert not torch.equal(model.score.weight, base.score.weight)  # the trained head, not the base's
    # Into a model already prepared, quantized: the head is loaded too.
    prepared = fastlora.prepare_model(copy.deepcopy(base), r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    fastlora.load_adapter(prepared, tmp_path)
    assert torch.equal(prepared.score.weight, model.score.weight)


def test_modules_to_save_that_do_not_fit_are_refused(gen, tmp_path):
    with pytest.raises(ValueError, match="matches no module"):
        fastlora.prepare_model(llama_classifier(), modules_to_save=["classifier"], quantize=False)
    with pytest.raises(ValueError, match="must be a list"):
        fastlora.prepare_model(llama_classifier(), modules_to_save="score", quantize=False)
    with pytest.raises(ValueError, match="overlaps the LoRA target"):
        fastlora.prepare_model(llama_classifier(), target_modules=["q_proj", "score"], modules_to_save=["score"],
                               quantize=False)
    quantized_head = llama_classifier()
    quantized_head.score = Linear4bit.from_linear(quantized_head.score)
    before = snapshot(quantized_head)
    with pytest.raises(ValueError, match="score.weight is a 4-bit weight"):
        fastlora.prepare_model(quantized_head, modules_to_save=["score"])
    assert_unchanged(before, quantized_head)
    model = fastlora.prepare_model(llama_classifier(), r=4, quantize=False, modules_to_save=["score"])
    fastlora.save_adapter(model, tmp_path)
    state = load_file(tmp_path / "adapter_model.safetensors")
    state["base_model.model.score.weight"] = torch.randn(5, 32, generator=gen)
    save_file(state, tmp_path / "adapter_model.safetensors")
    fresh = llama_classifier()
    before = snapshot(fresh)
    with pytest.raises(ValueError, match=r"score.weight has shape \(5, 32\)"):
        fastlora.load_adapter(fresh, tmp_path, quantize=False)
    assert_unchanged(before, fresh)
