"""Several named adapters over one 4-bit base (`fastlora.named_adapters`): loading beside each
other (fastlora's and peft's files), switching without copying, training the active one,
saving and deleting one, and mixed batches (`fastlora.adapters_per_row`) that must equal each
row run alone with its adapter, in forward calls and in generation. Tiny Llamas from configs."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import fastlora
import fastlora.model
from fastlora.model import _set_submodule, find_target_modules, lora_modules
from fastlora.nn import Linear4bit, LoraLinear

# Three adapters with their own rank, alpha and targets: "b" targets layers "a" does not.
ADAPTERS = {
    "a": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    "b": {"r": 8, "lora_alpha": 32, "target_modules": ["q_proj", "k_proj", "up_proj", "down_proj"]},
    "c": {"r": 2, "lora_alpha": 2, "target_modules": ["o_proj", "gate_proj"], "use_rslora": True},
}


def llama() -> LlamaForCausalLM:
    """One fixed 4-bit base: every linear layer but the head is a `Linear4bit` (as
    `fastlora.from_pretrained` loads it), so each adapter's own model has the same base."""
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).eval()
    for name in find_target_modules(model, "all-linear"):
        _set_submodule(model, name, Linear4bit.from_linear(model.get_submodule(name)))
    return model


def randomize(model: nn.Module, gen: torch.Generator) -> None:
    for name, param in model.named_parameters():
        if "lora_A" in name or "lora_B" in name:
            with torch.no_grad():
                param.copy_(torch.randn(param.shape, generator=gen) * (0.2 if "lora_A" in name else 0.1))


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture
def saved(tmp_path, gen):
    """Each adapter of `ADAPTERS` trained (randomized) alone over the 4-bit base and saved;
    returns {name: (directory, that single-adapter model)}."""
    out = {}
    for name, options in ADAPTERS.items():
        model = fastlora.prepare_model(llama(), **options)
        randomize(model, gen)
        out[name] = (fastlora.save_adapter(model, tmp_path / name), model)
    return out


def loaded(saved, names=("a", "b", "c")) -> nn.Module:
    model = llama()
    for name in names:
        fastlora.load_adapter(model, saved[name][0], adapter_name=name)
    return model


def every_tensor(model: nn.Module) -> dict:
    """Module types, and every adapter's weights (active or not) and the state dict, as bytes."""
    out = {"types": [(n, type(m).__name__) for n, m in model.named_modules()],
           "active": fastlora.active_adapter(model), "adapters": fastlora.list_adapters(model)}
    out.update({k: v.detach().clone().reshape(-1).view(torch.uint8) for k, v in model.state_dict().items()})
    for layer_name, layer in lora_modules(model).items():
        for name, adapter in layer.adapters.items():
            for part in ("lora_A", "lora_B"):
                out[f"{layer_name}.{name}.{part}"] = getattr(adapter, part).weight.detach().clone()
    return out


def assert_same(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for key, value in before.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, after[key]), key
        else:
            assert value == after[key], key


def test_adapters_with_their_own_ranks_and_targets_each_give_their_single_model_output(saved, gen):
    model = loaded(saved)
    assert fastlora.list_adapters(model) == ["a", "b", "c"]
    assert fastlora.active_adapter(model) == "a"  # the first one loaded; added ones wait for set_adapter
    ids = torch.randint(0, 64, (2, 9), generator=gen)
    for name in ("a", "c", "b", "a"):
        fastlora.set_adapter(model, name)
        torch.testing.assert_close(logits(model, ids), logits(saved[name][1], ids), rtol=0, atol=0)
    # Layers the active adapter does not target run their base alone.
    fastlora.set_adapter(model, "a")
    up = model.model.layers[0].mlp.up_proj
    assert isinstance(up, LoraLinear) and up.active_adapter is None and up.lora_A is None
    x = torch.randn(3, 32, generator=gen)
    torch.testing.assert_close(up(x), up.base_layer(x), rtol=0, atol=0)


def test_switching_rebinds_modules_and_the_model_shows_only_the_active_adapter(saved):
    model = loaded(saved)
    q = model.model.layers[1].self_attn.q_proj
    pointers = {name: q.adapters[name].lora_A.weight.data_ptr() for name in ("a", "b")}
    fastlora.set_adapter(model, "b")
    assert q.lora_A.weight.data_ptr() == pointers["b"] and q.lora_A is q.adapters["b"].lora_A
    assert q.adapters["a"].lora_A.weight.data_ptr() == pointers["a"]
    assert q.r == 8 and q.scaling == 32 / 8
    keys = {k for k in model.state_dict() if "lora" in k}
    assert len(keys) == 2 * 2 * len(ADAPTERS["b"]["target_modules"])  # 2 layers, A and B
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == len(keys) and all("lora" in n for n in trainable)
    assert not any(p.requires_grad for p in (q.adapters["a"].lora_A.weight, q.adapters["a"].lora_B.weight))
    assert model.fastlora_config["r"] == 8


def test_training_updates_the_active_adapter_only(saved, gen):
    model = loaded(saved)
    fastlora.set_adapter(model, "b")
    model.train()
    before = every_tensor(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids = torch.randint(0, 64, (2, 9), generator=gen)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    after = every_tensor(model)
    changed = {k for k, v in before.items() if isinstance(v, torch.Tensor) and not torch.equal(v, after[k])}
    assert any(".b.lora_" in k for k in changed) and all("lora_" in k for k in changed)
    assert not any(".a.lora_" in k or ".c.lora_" in k for k in changed)


def test_save_adapter_writes_the_named_adapter_as_loaded(saved, tmp_path):
    model = loaded(saved)
    out = fastlora.save_adapter(model, tmp_path / "again", adapter_name="b")
    want, got = load_file(saved["b"][0] / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (8, 32)
    assert sorted(config["target_modules"]) == sorted(ADAPTERS["b"]["target_modules"])
    assert json.loads((out / "fastlora_config.json").read_text())["quant_type"] == "nf4"


def test_an_adapter_written_by_peft_loads_beside_ours(saved, gen, tmp_path):
    model = loaded(saved, ("a",))
    dense = fastlora.model.dequantize_model(llama())  # peft's base: fastlora's dequantized 4-bit weights
    ref = peft.get_peft_model(dense, peft.LoraConfig(r=6, lora_alpha=12, target_modules=["q_proj", "o_proj"]))
    randomize(ref, gen)
    ref.save_pretrained(tmp_path / "theirs")
    fastlora.load_adapter(model, tmp_path / "theirs", adapter_name="theirs")
    fastlora.set_adapter(model, "theirs")
    ids = torch.randint(0, 64, (2, 9), generator=gen)
    torch.testing.assert_close(logits(model, ids), logits(ref.eval(), ids), rtol=1e-5, atol=1e-5)


def test_delete_adapter_frees_it_and_unwraps_layers_left_without_one(saved, gen):
    model = loaded(saved)
    ids = torch.randint(0, 64, (2, 9), generator=gen)
    fastlora.delete_adapter(model, "a")  # the active one: the first remaining takes over
    assert fastlora.list_adapters(model) == ["b", "c"] and fastlora.active_adapter(model) == "b"
    torch.testing.assert_close(logits(model, ids), logits(saved["b"][1], ids), rtol=0, atol=0)
    assert isinstance(model.model.layers[0].self_attn.v_proj, Linear4bit)  # only "a" was there
    fastlora.delete_adapter(model, "c")
    assert isinstance(model.model.layers[0].self_attn.o_proj, Linear4bit)
    fastlora.delete_adapter(model, "b")
    assert not lora_modules(model) and not hasattr(model, "fastlora_config")
    torch.testing.assert_close(logits(model, ids), logits(llama(), ids), rtol=0, atol=0)


@pytest.mark.parametrize("rows", [["a", "b", None, "c"], ["b", "b", "b"], [None, None], ["c", "a"]])
def test_a_mixed_batch_equals_each_row_alone_with_its_adapter(saved, gen, rows):
    model = loaded(saved)
    ids = torch.randint(0, 64, (len(rows), 9), generator=gen)
    with fastlora.adapters_per_row(model, rows):
        mixed = logits(model, ids)
    for i, name in enumerate(rows):
        alone = saved[name][1] if name is not None else llama()  # None: the base alone
        torch.testing.assert_close(mixed[i:i + 1], logits(alone, ids[i:i + 1]), rtol=1e-5, atol=1e-5)
    assert all(layer.row_adapters is None for layer in lora_modules(model).values())  # the block has ended


def test_mixed_batch_generation_follows_each_row(saved, gen):
    model = loaded(saved)
    rows = ["c", None, "b", "a"]
    ids = torch.randint(0, 64, (len(rows), 6), generator=gen)
    greedy = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False, "pad_token_id": 0}  # no early stop
    beams = {**greedy, "num_beams": 2, "num_return_sequences": 2}  # generate repeats each row twice
    with torch.no_grad(), fastlora.adapters_per_row(model, rows):
        mixed, mixed_beams = model.generate(input_ids=ids, **greedy), model.generate(input_ids=ids, **beams)
    for i, name in enumerate(rows):
        alone = saved[name][1] if name is not None else llama()
        with torch.no_grad():
            assert torch.equal(mixed[i:i + 1], alone.generate(input_ids=ids[i:i + 1], **greedy)), name
            assert torch.equal(mixed_beams[2 * i:2 * i + 2], alone.generate(input_ids=ids[i:i + 1], **beams)), name


def test_inactive_adapters_move_with_the_layer():
    layer = LoraLinear(nn.Linear(16, 8), r=2)
    layer.add_adapter("other", r=3)
    layer.to(torch.float64)
    assert layer.adapters["other"].lora_A.weight.dtype == torch.float64
    twin = copy.deepcopy(layer)
    assert twin.lora_A is twin.adapters["default"].lora_A and twin.adapters["other"].lora_B.weight.shape == (8, 3)


def test_bad_input_raises_and_leaves_the_model_unchanged(saved, gen, tmp_path):
    model = loaded(saved, ("a", "b"))
    before = every_tensor(model)
    for call, error, match in [
        (lambda: fastlora.set_adapter(model, "nope"), ValueError, r"unknown adapter 'nope'.*\['a', 'b'\]"),
        (lambda: fastlora.delete_adapter(model, "nope"), ValueError, "unknown adapter"),
        (lambda: fastlora.save_adapter(model, tmp_path / "x", adapter_name="nope"), ValueError, "unknown adapter"),
        (lambda: fastlora.adapters_per_row(model, ["a", "nope"]).__enter__(), ValueError, "names: unknown adapter"),
        (lambda: fastlora.adapters_per_row(model, "a").__enter__(), ValueError, "names must be"),
        (lambda: fastlora.adapters_per_row(model, []).__enter__(), ValueError, "names must be"),
        (lambda: fastlora.load_adapter(model, saved["c"][0], adapter_name=""), ValueError, "adapter_name"),
        (lambda: fastlora.load_adapter(model, saved["c"][0], adapter_name="c", quant_type="fp4"), TypeError,
         "quant_type"),
        # the file's rank does not fit the adapter of that name
        (lambda: fastlora.load_adapter(model, saved["c"][0], adapter_name="b"), ValueError, "r=8.*r=2"),
    ]:
        with pytest.raises(error, match=match):
            call()
        assert_same(before, every_tensor(model))
    # an adapter whose base shapes do not fit this model
    other = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    fastlora.save_adapter(fastlora.prepare_model(other, r=2, target_modules=["q_proj"]), tmp_path / "wide")
    with pytest.raises(ValueError, match=r"lora_A\.weight has shape \(2, 48\), the model needs \(2, 32\)"):
        fastlora.load_adapter(model, tmp_path / "wide", adapter_name="wide")
    assert_same(before, every_tensor(model))
    # a batch that is not the names' length, and a model in training mode
    with fastlora.adapters_per_row(model, ["a", "b"]):
        with pytest.raises(ValueError, match="names 2 rows, but the model got a batch of 3"):
            logits(model, torch.randint(0, 64, (3, 5), generator=gen))
        with pytest.raises(ValueError, match="inside fastlora.adapters_per_row"):
            fastlora.set_adapter(model, "b")
    model.train()
    with pytest.raises(ValueError, match="model.eval"):
        fastlora.adapters_per_row(model, ["a", "b"]).__enter__()
    model.eval()
    assert_same(before, every_tensor(model))


def test_a_second_adapter_with_modules_to_save_is_refused(saved, tmp_path):
    model = loaded(saved, ("a",))
    head = fastlora.prepare_model(llama(), r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    fastlora.save_adapter(head, tmp_path / "head")
    before = every_tensor(model)
    with pytest.raises(ValueError, match="modules_to_save.*first adapter"):
        fastlora.load_adapter(model, tmp_path / "head", adapter_name="head")
    assert_same(before, every_tensor(model))


def test_merge_and_unload_merges_the_active_adapter(saved, gen):
    model = loaded(saved)
    fastlora.set_adapter(model, "c")
    ids = torch.randint(0, 64, (2, 9), generator=gen)
    want = logits(saved["c"][1], ids)
    merged = fastlora.merge_and_unload(model)
    assert not lora_modules(merged) and not hasattr(merged, "fastlora_adapters")
    # Each LoRA layer became a dense layer holding its dequantized base, plus c's delta where c
    # is: the function of the 4-bit model running c, to fp32 rounding.
    torch.testing.assert_close(logits(merged, ids), want, rtol=1e-4, atol=1e-4)


def dense_llama() -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlamaForCausalLM(config).eval()


def test_a_further_adapter_quantizes_its_new_targets_as_the_base_was(saved, gen, tmp_path):
    """One 4-bit base for every adapter: layers only a later adapter targets become 4-bit with
    the model's settings (the bytes `Linear4bit.from_linear` gives), and the list keeps the
    order the adapters were added in, whatever the modules' order."""
    original = dense_llama()
    model = copy.deepcopy(original)
    fastlora.load_adapter(model, saved["c"][0], adapter_name="c")  # o and gate: later in each layer
    fastlora.load_adapter(model, saved["a"][0], adapter_name="a")
    assert fastlora.list_adapters(model) == ["c", "a"]
    q = model.model.layers[1].self_attn.q_proj
    assert isinstance(q.base_layer, Linear4bit) and q.active_adapter is None
    want = Linear4bit.from_linear(original.model.layers[1].self_attn.q_proj)
    assert torch.equal(q.base_layer.weight, want.weight) and torch.equal(q.base_layer.absmax, want.absmax)
    assert not any(p.requires_grad for p in q.base_layer.parameters())
    fastlora.delete_adapter(model, "c")  # the active one: "a", added next, takes over
    assert fastlora.active_adapter(model) == "a"


def test_modules_trained_whole_train_with_their_adapter_only(saved, tmp_path):
    model = dense_llama()
    head = fastlora.prepare_model(dense_llama(), r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    fastlora.save_adapter(head, tmp_path / "head")
    fastlora.load_adapter(model, tmp_path / "head", adapter_name="head")
    fastlora.load_adapter(model, saved["b"][0], adapter_name="b")
    assert model.lm_head.weight.requires_grad
    fastlora.set_adapter(model, "b")
    assert not model.lm_head.weight.requires_grad
    fastlora.set_adapter(model, "head")
    assert model.lm_head.weight.requires_grad
    # A further adapter may not target a module another trains whole.
    on_head = fastlora.prepare_model(dense_llama(), r=2, target_modules=["lm_head"])
    fastlora.save_adapter(on_head, tmp_path / "on_head")
    before = every_tensor(model)
    with pytest.raises(ValueError, match="lm_head lies in lm_head, which another adapter trains whole"):
        fastlora.load_adapter(model, tmp_path / "on_head", adapter_name="on_head")
    assert_same(before, every_tensor(model))


def test_a_layer_refuses_to_merge_or_switch_inside_a_mixed_batch(saved):
    model = loaded(saved)
    fastlora.set_adapter(model, "b")
    layer = next(iter(lora_modules(model).values()))
    with fastlora.adapters_per_row(model, ["a", "b"]):
        for call in (lambda: layer.set_adapter("a"), lambda: layer.delete_adapter("a")):
            with pytest.raises(ValueError, match="inside fastlora.adapters_per_row"):
                call()
    fastlora.set_adapter(model, "c")  # c is not on q_proj
    with pytest.raises(RuntimeError, match="no active adapter"):
        _ = model.model.layers[0].self_attn.q_proj.r
