"""Hugging Face entry points on tiny Llama checkpoints written here (no downloads):
`fastlora.from_pretrained` on bitsandbytes 4-bit checkpoints (bitsandbytes unimportable) and
on dense ones, transformers' `quantization_config=FastLoraConfig(...)`, and `save_pretrained`
giving a checkpoint transformers + bitsandbytes load byte for byte."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

transformers = pytest.importorskip("transformers", minversion="5")
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402

import fastlora  # noqa: E402
import fastlora.hf  # noqa: E402
from fastlora import reference  # noqa: E402
from fastlora.hf import FastLoraConfig  # noqa: E402
from fastlora.nn import Linear4bit, LoraLinear  # noqa: E402

SHARD = "40KB"  # several shards for these models, split between a layer's tensors too


def tiny_llama(tie: bool) -> LlamaForCausalLM:
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=96, max_position_embeddings=64, tie_word_embeddings=tie,
                         attention_bias=True, mlp_bias=True)  # biases loaded before and after their weights
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def dense_dir(tmp_path) -> Path:
    path = tmp_path / "dense"
    tiny_llama(tie=True).save_pretrained(path, max_shard_size=SHARD)
    assert (path / "model.safetensors.index.json").exists()
    return path


def bnb_checkpoint(dense: Path, out: Path, quant_type: str = "nf4", double: bool = True,
                   storage: torch.dtype = torch.uint8) -> Path:
    model = AutoModelForCausalLM.from_pretrained(dense, device_map="cpu", quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double,
        bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=storage))
    model.save_pretrained(out, max_shard_size=SHARD)
    return out


def checkpoint_tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


def exact_model(dense: Path, checkpoint: dict[str, torch.Tensor]) -> LlamaForCausalLM:
    """The dense model with each 4-bit weight replaced by the plain-torch dequantization of
    the checkpoint's bytes (fastlora.reference): the exact NF4 round trip."""
    model = LlamaForCausalLM.from_pretrained(dense).eval()
    for name, module in model.named_modules():
        if name + ".weight.absmax" not in checkpoint:
            continue
        stats = {k[len(name) + 8:]: v for k, v in checkpoint.items() if k.startswith(name + ".weight.")}
        state = fastlora.QuantState.from_dict(stats, device="cpu")
        w = reference.dequantize_4bit(checkpoint[name + ".weight"], state.absmax_fp32(), state.blocksize,
                                      state.quant_type, state.shape, torch.float32)
        module.weight.data = w
    return model


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("quant_type,double", [("nf4", True), ("fp4", False)])
def test_bitsandbytes_sharded_checkpoint_loads_without_bitsandbytes(dense_dir, tmp_path, quant_type, double):
    ckpt = bnb_checkpoint(dense_dir, tmp_path / "bnb", quant_type, double)
    assert len(list(ckpt.glob("*.safetensors"))) > 1
    ids = torch.randint(0, 96, (2, 11))
    torch.save(ids, tmp_path / "ids.pt")
    script = f"""
import sys, torch
sys.modules["bitsandbytes"] = None  # import bitsandbytes now raises ImportError
import fastlora
from safetensors.torch import save_file
model = fastlora.from_pretrained({str(ckpt)!r})
ids = torch.load({str(tmp_path / "ids.pt")!r})
with torch.no_grad():
    out = model(ids).logits
save_file({{"logits": out.contiguous(), "packed": model.model.layers[1].mlp.down_proj.weight.detach().clone()}},
          {str(tmp_path / "out.safetensors")!r})
model.num_parameters()  # transformers imports bitsandbytes here for models it thinks are its own
model.save_pretrained({str(tmp_path / "resaved")!r}, max_shard_size="40KB")
assert "bitsandbytes" not in sys.modules or sys.modules["bitsandbytes"] is None
"""
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True)
    with safe_open(str(tmp_path / "out.safetensors"), "pt") as f:
        ours, packed = f.get_tensor("logits"), f.get_tensor("packed")
    stored = checkpoint_tensors(ckpt)
    assert torch.equal(packed, stored["model.layers.1.mlp.down_proj.weight"])
    resaved = checkpoint_tensors(tmp_path / "resaved")
    assert resaved.keys() == stored.keys() and all(torch.equal(resaved[k], stored[k]) for k in stored)
    torch.testing.assert_close(ours, logits(exact_model(dense_dir, stored), ids), rtol=1e-4, atol=1e-4)


def test_bitsandbytes_checkpoint_layers_and_tied_head(dense_dir, tmp_path):
    ckpt = bnb_checkpoint(dense_dir, tmp_path / "bnb")
    model = fastlora.from_pretrained(ckpt)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    assert len(layers) == 14 and all(m.compress_statistics and m.quant_type == "nf4" for m in layers.values())
    assert type(model.lm_head) is nn.Linear  # the head stays dense, as bitsandbytes leaves it
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert all(m.compute_dtype == torch.float32 for m in layers.values())  # bnb_4bit_compute_dtype


def test_dense_checkpoint_is_quantized_while_loading_as_from_linear_would(dense_dir):
    model = fastlora.from_pretrained(dense_dir, quant_type="fp4", compress_statistics=False, blocksize=128)
    dense = LlamaForCausalLM.from_pretrained(dense_dir).eval()
    ids = torch.randint(0, 96, (3, 9))
    expected_model = LlamaForCausalLM.from_pretrained(dense_dir).eval()
    for name, module in dense.named_modules():
        if isinstance(module, nn.Linear) and name != "lm_head":
            ours = model.get_submodule(name)
            reference_layer = Linear4bit.from_linear(module, quant_type="fp4", compress_statistics=False,
                                                     blocksize=128)
            assert isinstance(ours, Linear4bit) and ours.blocksize == 128 and ours.quant_type == "fp4"
            assert torch.equal(ours.weight, reference_layer.weight)
            assert torch.equal(ours.absmax, reference_layer.absmax)
            assert torch.equal(ours.bias, reference_layer.bias) if module.bias is not None else ours.bias is None
            expected_model.get_submodule(name).weight.data = reference_layer.dequantize()
    torch.testing.assert_close(logits(model, ids), logits(expected_model, ids), rtol=1e-4, atol=1e-4)


def test_target_modules_restricts_what_is_quantized(dense_dir):
    model = fastlora.from_pretrained(dense_dir, target_modules=["q_proj", "v_proj"])
    quantized = sorted(n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, Linear4bit))
    assert quantized == ["q_proj", "q_proj", "v_proj", "v_proj"]
    assert type(model.model.layers[0].self_attn.k_proj) is nn.Linear


def test_transformers_entry_point_saves_what_bitsandbytes_loads_byte_for_byte(dense_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(dense_dir, quantization_config=FastLoraConfig(
        compute_dtype=torch.float32))
    assert isinstance(model.model.layers[0].mlp.up_proj, Linear4bit)
    model.save_pretrained(tmp_path / "ours", max_shard_size=SHARD)
    entry = json.loads((tmp_path / "ours" / "config.json").read_text())["quantization_config"]
    assert entry["quant_method"] == "bitsandbytes" and entry["load_in_4bit"] and entry["bnb_4bit_use_double_quant"]
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", device_map="cpu")
    import bitsandbytes as bnb

    assert isinstance(theirs.model.layers[0].mlp.up_proj, bnb.nn.Linear4bit)
    ours_state, their_state = model.state_dict(), theirs.state_dict()
    assert set(ours_state) == set(their_state)
    for key, value in ours_state.items():
        assert torch.equal(value.cpu(), their_state[key].cpu()), key
    # And back into fastlora: the same bytes again.
    again = fastlora.from_pretrained(tmp_path / "ours")
    for key, value in again.state_dict().items():
        assert torch.equal(value, ours_state[key]), key


def test_prepare_model_wraps_loaded_4bit_layers_without_quantizing_again(dense_dir, tmp_path, gen):
    ckpt = bnb_checkpoint(dense_dir, tmp_path / "bnb")
    model = fastlora.from_pretrained(ckpt)
    before = {n: m.weight for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    fastlora.prepare_model(model, r=4, lora_alpha=8)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}
    assert set(layers) == set(before)
    assert all(layers[n].base_layer.weight is w for n, w in before.items())  # the same tensors, not re-quantized
    assert model.fastlora_config["quant_type"] == "nf4" and model.fastlora_config["compress_statistics"]
    ids = torch.randint(0, 96, (2, 8), generator=gen)
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert all(m.lora_A.weight.grad is not None for m in layers.values())
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def test_config_round_trips_and_registering_again_is_harmless():
    config = FastLoraConfig(quant_type="fp4", compress_statistics=False, blocksize=256, compute_dtype="bfloat16")
    assert FastLoraConfig.from_dict(config.fields()).fields() == config.fields()
    entry = config.to_dict()
    assert entry["quant_method"] == "bitsandbytes" and entry["bnb_4bit_compute_dtype"] == "bfloat16"
    back = FastLoraConfig.from_dict(entry)
    assert (back.quant_type, back.compress_statistics, back.blocksize, back.compute_dtype) == (
        "fp4", False, 256, torch.bfloat16)
    importlib.reload(fastlora.hf)
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

    assert AUTO_QUANTIZER_MAPPING["fastlora"].__name__ == "FastLoraHfQuantizer"


def test_bad_configs_are_clear_errors():
    with pytest.raises(ValueError, match="quant_type"):
        FastLoraConfig(quant_type="int4")
    with pytest.raises(ValueError, match="blocksize"):
        FastLoraConfig(blocksize=48)
    with pytest.raises(ValueError, match="compute_dtype"):
        FastLoraConfig(compute_dtype="float64")
    with pytest.raises(ValueError, match="skip_modules"):
        FastLoraConfig(skip_modules="lm_head")
    with pytest.raises(ValueError, match="quant_storage"):
        FastLoraConfig(quant_storage="int8")
    with pytest.raises(TypeError):
        FastLoraConfig(quant_tpye="nf4")  # a misspelt option is not silently ignored
    with pytest.raises(ValueError, match="not a bitsandbytes 4-bit"):
        FastLoraConfig.from_bitsandbytes({"quant_method": "bitsandbytes", "load_in_8bit": True})
    with pytest.raises(ValueError, match="target_modules"):
        fastlora.from_pretrained("unused", target_modules="q_proj")


def test_other_quantization_methods_are_refused(dense_dir):
    config = json.loads((dense_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (dense_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="quantized with 'gptq'"):
        fastlora.from_pretrained(dense_dir)


def _rewrite(ckpt: Path, key: str, change) -> None:
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    file = ckpt / index["weight_map"][key]
    with safe_open(str(file), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    change(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def test_damaged_bitsandbytes_checkpoints_are_clear_errors(dense_dir, tmp_path, caplog):
    ckpt = bnb_checkpoint(dense_dir, tmp_path / "bnb")
    key = "model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__nf4"

    def corrupt(tensors):
        tensors[key] = torch.tensor(list(b"{not json"), dtype=torch.uint8)

    _rewrite(ckpt, key, corrupt)
    # transformers collects what the conversion ops raise into its load report (logged), then
    # raises once for the whole load.
    with caplog.at_level("WARNING"), pytest.raises(RuntimeError, match="conversion"):
        fastlora.from_pretrained(ckpt)
    assert f"{key}: not valid UTF-8 JSON" in caplog.text


def test_a_4bit_weight_of_the_wrong_shape_is_a_clear_error(dense_dir, tmp_path, caplog):
    ckpt = bnb_checkpoint(dense_dir, tmp_path / "bnb")
    config = json.loads((ckpt / "config.json").read_text())
    config["intermediate_size"] = 64  # the file's MLP weights are (128, 64) and (64, 128)
    (ckpt / "config.json").write_text(json.dumps(config))
    with caplog.at_level("WARNING"), pytest.raises(RuntimeError, match="conversion"):
        fastlora.from_pretrained(ckpt)
    assert ("down_proj.weight: the checkpoint's 4-bit weight has shape (64, 128), the model's layer (64, 64)"
            in caplog.text)


def test_a_missing_shard_is_a_clear_error(dense_dir, tmp_path):
    ckpt = bnb_checkpoint(dense_dir, tmp_path / "bnb")
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    missing = sorted(set(index["weight_map"].values()))[-1]
    (ckpt / missing).unlink()
    with pytest.raises(OSError, match=missing):
        fastlora.from_pretrained(ckpt)


def test_a_dense_weight_of_the_wrong_shape_is_a_clear_error(dense_dir, caplog):
    config = json.loads((dense_dir / "config.json").read_text())
    config["intermediate_size"] = 96  # the file's MLP weights are (128, 64) and (64, 128)
    (dense_dir / "config.json").write_text(json.dumps(config))
    with caplog.at_level("WARNING"), pytest.raises(RuntimeError, match="conversion"):
        fastlora.from_pretrained(dense_dir)
    assert "down_proj.weight: the checkpoint's weight has shape (64, 128), the model's layer (64, 96)" in caplog.text


def test_a_classifier_head_stays_dense_and_trains_whole(dense_dir):
    from transformers import AutoModelForSequenceClassification

    model = fastlora.from_pretrained(dense_dir, auto_class=AutoModelForSequenceClassification, num_labels=3)
    assert type(model.score) is nn.Linear and model.score.out_features == 3
    fastlora.prepare_model(model, r=4, modules_to_save=["score"])
    assert model.score.weight.requires_grad


def test_a_float_quant_storage_checkpoint_loads_as_stored(dense_dir, tmp_path, gen):
    ckpt = bnb_checkpoint(dense_dir, tmp_path / "bnb", storage=torch.bfloat16)
    stored = checkpoint_tensors(ckpt)
    assert stored["model.layers.0.mlp.up_proj.weight"].dtype == torch.bfloat16
    model = fastlora.from_pretrained(ckpt)
    layer = model.model.layers[0].mlp.up_proj
    assert layer.quant_storage == torch.bfloat16 and layer.weight.dtype == torch.bfloat16
    assert torch.equal(layer.weight.view(torch.uint8), stored["model.layers.0.mlp.up_proj.weight"].view(torch.uint8))
    ids = torch.randint(0, 96, (2, 7), generator=gen)
    torch.testing.assert_close(logits(model, ids), logits(exact_model(dense_dir, stored), ids), rtol=1e-4, atol=1e-4)
    model.save_pretrained(tmp_path / "again")  # says what it holds
    entry = json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]
    assert entry["bnb_4bit_quant_storage"] == "bfloat16"


def test_a_dense_checkpoint_quantized_into_a_float_storage(dense_dir):
    model = AutoModelForCausalLM.from_pretrained(dense_dir, quantization_config=FastLoraConfig(
        quant_storage="bfloat16"))
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.weight.dtype == torch.bfloat16 and layer.quant_storage == torch.bfloat16
    reference_layer = Linear4bit.from_linear(LlamaForCausalLM.from_pretrained(dense_dir).model.layers[0].self_attn
                                             .q_proj)
    assert torch.equal(layer.weight.view(torch.uint8).reshape(-1), reference_layer.weight.reshape(-1))


def test_an_index_naming_an_absent_tensor_is_a_clear_error(dense_dir, tmp_path, caplog):
    ckpt = bnb_checkpoint(dense_dir, tmp_path / "bnb")
    key = "model.layers.1.mlp.up_proj.weight.absmax"
    _rewrite(ckpt, key, lambda tensors: tensors.pop(key))  # the index still names it
    with caplog.at_level("WARNING"), pytest.raises(RuntimeError, match="conversion"):
        fastlora.from_pretrained(ckpt)
    assert "model.layers.1.mlp.up_proj.weight.absmax" in caplog.text
