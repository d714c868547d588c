"""`fastlora.peft`: PEFT's LoRA over fastlora's 4-bit layers, on tiny models built from configs
(no downloads). The fused op against PEFT's general path and a float64 reference, adapter
switching, save/load, merging, `prepare_model_for_kbit_training`, "all-linear", and training
against `fastlora.prepare_model`."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import warnings
from collections import OrderedDict

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import fastlora  # noqa: E402
from fastlora.model import find_target_modules  # noqa: E402
from fastlora.nn import Linear4bit  # noqa: E402
from fastlora.peft import LoraLinear4bit, register  # noqa: E402
from fastlora.plan import WeightPlan  # noqa: E402

LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PREFIX = "base_model.model."


def llama(dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=32)
    return LlamaForCausalLM(config).to(dtype).eval()


def quantize(model: nn.Module, **kwargs) -> nn.Module:
    """Every `nn.Linear` but `lm_head` as a `fastlora.Linear4bit`, in place."""
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and name != "lm_head":
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, Linear4bit.from_linear(module, **kwargs))
    return model


def lora_config(**kwargs) -> peft.LoraConfig:
    return peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": list(LLAMA_LINEARS), **kwargs})


def randomize_lora(model: nn.Module, gen: torch.Generator, adapter: str = "") -> None:
    """Random A and B (B is zero after the default init), so adapters change the output."""
    for name, param in model.named_parameters():
        if ("lora_A" in name or "lora_B" in name) and f".{adapter}" in name:
            with torch.no_grad():
                param.copy_(torch.randn(param.shape, generator=gen) * (0.1 if "lora_A" in name else 0.05))


def peft_model(base: nn.Module, gen: torch.Generator, **kwargs) -> peft.PeftModel:
    model = peft.get_peft_model(base, register(lora_config(**kwargs))).eval()
    randomize_lora(model, gen)
    return model


def tokens(gen: torch.Generator, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, 128, (batch, 9), generator=gen)


def run(model: nn.Module, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


def lora_layers(model: nn.Module) -> dict[str, LoraLinear4bit]:
    return {n.removeprefix(PREFIX): m for n, m in model.named_modules() if isinstance(m, LoraLinear4bit)}


def packed_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The bytes of every `Linear4bit`'s state (packed weight and quantization statistics)."""
    return {f"{n}.{k}": v.detach().clone().reshape(-1).view(torch.uint8)
            for n, m in model.named_modules() if isinstance(m, Linear4bit)
            for k, v in m.state_dict().items() if isinstance(v, torch.Tensor) and k != "bias"}


def reference_logits(dense: nn.Module, model: peft.PeftModel, ids: torch.Tensor, adapters: list[str]) -> torch.Tensor:
    """Logits in float64 of `dense` (the model before quantizing) with each LoRA layer's weight
    replaced by its dequantized 4-bit weight plus the `adapters`' `scaling * B @ A`."""
    ref = copy.deepcopy(dense).double()
    for name, layer in lora_layers(model).items():
        weight = layer.get_base_layer().dequantize().double()
        for a in adapters:
            weight += layer.scaling[a] * layer.lora_B[a].weight.double() @ layer.lora_A[a].weight.double()
        with torch.no_grad():
            ref.get_submodule(name).weight.copy_(weight)
    return run(ref, ids)


@pytest.fixture
def fused_calls(monkeypatch) -> list[int]:
    """Counts the fused 4-bit + LoRA calls (one per layer and forward): the op, or the one-step
    decoding call where that gives the output."""
    calls = []
    fused, decode = WeightPlan.lora_linear, WeightPlan.decode

    def counted(self, *args):
        calls.append(1)
        return fused(self, *args)

    def counted_decode(self, x, bias, lora=None):
        y = decode(self, x, bias, lora)
        if y is not None and lora is not None:
            calls.append(1)
        return y

    monkeypatch.setattr(WeightPlan, "lora_linear", counted)
    monkeypatch.setattr(WeightPlan, "decode", counted_decode)
    return calls


# ---------------------------------------------------------------------------------------------
# register
# ---------------------------------------------------------------------------------------------


def test_register_maps_fastlora_layers_and_twice_is_harmless(gen):
    config = lora_config()
    assert register(config) is config
    assert register(config) is config
    assert config._custom_modules == {Linear4bit: LoraLinear4bit}
    base = quantize(llama())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.get_peft_model(base, config)
    assert not [w for w in caught if "Unsupported layer type" in str(w.message)]
    layers = lora_layers(model)
    assert len(layers) == 2 * len(LLAMA_LINEARS)
    assert all(type(m.base_layer) is Linear4bit for m in layers.values())
    assert type(model.base_model.model.lm_head) is nn.Linear
    trainable = sorted(n.removeprefix(PREFIX) for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(f"{n}.lora_{p}.default.weight" for n in layers for p in "AB")


def test_registering_needs_peft_and_importing_fastlora_does_not_import_it():
    script = (
        "import sys\n"
        "import fastlora\n"
        "assert 'peft' not in sys.modules, 'import fastlora imported peft'\n"
        "sys.modules['peft'] = None  # as if peft were not installed\n"
        "try:\n"
        "    import fastlora.peft\n"
        "except ImportError as exc:\n"
        "    assert 'pip install peft' in str(exc), exc\n"
        "else:\n"
        "    raise AssertionError('fastlora.peft imported without peft')\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)


@pytest.mark.parametrize(
    "config,error,match",
    [
        (None, TypeError, "config must be a peft.LoraConfig, got NoneType"),
        ({"r": 4}, TypeError, "config must be a peft.LoraConfig, got dict"),
        (peft.IA3Config(target_modules=["q_proj"], feedforward_modules=[]), TypeError, "got IA3Config"),
        (peft.AdaLoraConfig(total_step=10, target_modules=["q_proj"]), ValueError, "LoRA config, got AdaLoraConfig"),
        (lora_config(use_dora=True), ValueError, "config.use_dora=True"),
        (lora_config(init_lora_weights="pissa"), ValueError, "config.init_lora_weights='pissa'"),
        (lora_config(target_modules="all-linear"), ValueError, r"pass the model: fastlora\.peft\.register\(config"),
    ],
)
def test_register_rejects_configs_it_cannot_run(config, error, match):
    with pytest.raises(error, match=match):
        register(config)


def test_an_adapter_added_with_an_unsupported_config_raises(gen):
    model = peft_model(quantize(llama()), gen)
    with pytest.raises(ValueError, match="config.use_dora=True"):
        model.add_adapter("dora", lora_config(use_dora=True))
    assert all("dora" not in m.lora_A for m in lora_layers(model).values())


# ---------------------------------------------------------------------------------------------
# The fused path and PEFT's general path
# ---------------------------------------------------------------------------------------------


def test_fused_path_matches_peft_general_path_and_a_float64_reference(gen, fused_calls):
    dense = llama()
    model = peft_model(quantize(copy.deepcopy(dense)), gen)
    ids = tokens(gen)
    fused = run(model, ids)
    assert len(fused_calls) == 2 * len(LLAMA_LINEARS)
    # `adapter_names=` runs PEFT's general path (base layer, then the adapter in torch), here
    # with the same adapter for every row.
    general = run(model, ids, adapter_names=["default"] * len(ids))
    assert len(fused_calls) == 2 * len(LLAMA_LINEARS)
    torch.testing.assert_close(fused, general, rtol=1e-5, atol=1e-5)
    ref = reference_logits(dense, model, ids, ["default"])
    torch.testing.assert_close(fused.double(), ref, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(ref, reference_logits(dense, model, ids, []), atol=1e-2)  # the adapter matters


def tiny_model(bias: bool, compute_dtype: torch.dtype | None) -> nn.Sequential:
    return nn.Sequential(OrderedDict(
        proj=Linear4bit.from_linear(nn.Linear(64, 48, bias=bias), compute_dtype=compute_dtype), act=nn.GELU(),
    ))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("compute_dtype,x_dtype", [(None, torch.float32), (torch.bfloat16, torch.float32),
                                                   (None, torch.bfloat16)])
def test_layer_forward_and_gradients_match_peft_and_the_formula(bias, compute_dtype, x_dtype, gen, fused_calls):
    model = peft.get_peft_model(tiny_model(bias, compute_dtype), register(lora_config(target_modules=["proj"])))
    randomize_lora(model, gen)
    layer = model.base_model.model.proj
    base = layer.base_layer
    x = torch.randn(3, 5, 64, generator=gen).to(x_dtype).requires_grad_()
    y = layer(x)
    assert len(fused_calls) == 1 and y.dtype == x_dtype
    g = torch.randn(y.shape, generator=gen)
    (y.float() * g).sum().backward()

    with torch.no_grad():
        general = peft.tuners.lora.Linear.forward(layer, x)
    tol = 1e-5 if compute_dtype is None and x_dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y, general, rtol=tol, atol=tol)

    A = layer.lora_A["default"].weight.detach().double().requires_grad_()
    B = layer.lora_B["default"].weight.detach().double().requires_grad_()
    x64 = x.detach().double().requires_grad_()
    ref = x64 @ base.dequantize().double().t() + layer.scaling["default"] * (x64 @ A.t()) @ B.t()
    if bias:
        ref = ref + base.bias.double()
    (ref * g.double()).sum().backward()
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol)
    for got, want in ((x.grad, x64.grad), (layer.lora_A["default"].weight.grad, A.grad),
                      (layer.lora_B["default"].weight.grad, B.grad)):
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * want.abs().max().item())


def test_a_bias_on_lora_b_takes_peft_path_and_merges(gen, fused_calls):
    model = peft.get_peft_model(tiny_model(True, None), register(lora_config(target_modules=["proj"], lora_bias=True)))
    randomize_lora(model, gen)
    layer = model.base_model.model.proj.eval()
    with torch.no_grad():
        layer.lora_B["default"].bias.copy_(torch.randn(48, generator=gen))
    x = torch.randn(4, 64, generator=gen)
    with torch.no_grad():
        y = layer(x)
        assert not fused_calls
        lora = layer.lora_B["default"](layer.lora_A["default"](x)) * layer.scaling["default"]
        torch.testing.assert_close(y, layer.base_layer(x) + lora, rtol=1e-5, atol=1e-5)
        layer.merge()
        torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)


def test_fused_path_applies_the_adapters_dropout_as_peft_does(gen, fused_calls):
    model = peft.get_peft_model(tiny_model(True, None), register(lora_config(target_modules=["proj"],
                                                                             lora_dropout=0.5)))
    randomize_lora(model, gen)
    layer = model.base_model.model.proj.train()
    x = torch.randn(4, 64, generator=gen)
    with torch.no_grad():
        torch.manual_seed(1)
        fused = layer(x)
        torch.manual_seed(1)
        general = peft.tuners.lora.Linear.forward(layer, x)
        undropped = layer.eval()(x)
    assert len(fused_calls) == 2
    torch.testing.assert_close(fused, general, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(fused, undropped, atol=1e-3)


def test_compiled_layer_matches_eager(gen):
    torch._dynamo.reset()
    model = peft.get_peft_model(tiny_model(True, None), register(lora_config(target_modules=["proj"])))
    randomize_lora(model, gen)
    layer = model.base_model.model.proj
    params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    x = torch.randn(2, 7, 64, generator=gen)
    results = []
    for forward in (layer, torch.compile(layer, backend="aot_eager", fullgraph=True)):
        y = forward(x)
        y.square().sum().backward()
        results.append([y.detach()] + [p.grad.clone() for p in params])
        for p in params:
            p.grad = None
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------
# Several adapters, mixed batches, disabled adapters
# ---------------------------------------------------------------------------------------------


def two_adapter_model(dense: nn.Module, gen: torch.Generator) -> peft.PeftModel:
    model = peft_model(quantize(copy.deepcopy(dense)), gen)
    model.add_adapter("other", lora_config(r=2, lora_alpha=6))
    randomize_lora(model, gen, "other")
    return model.eval()


def test_several_active_adapters_take_peft_path(gen, fused_calls):
    dense = llama()
    model = two_adapter_model(dense, gen)
    ids = tokens(gen)
    model.base_model.set_adapter(["default", "other"])
    both = run(model, ids)
    assert not fused_calls
    torch.testing.assert_close(both.double(), reference_logits(dense, model, ids, ["default", "other"]),
                               rtol=1e-4, atol=1e-4)
    model.set_adapter("other")
    other = run(model, ids)
    assert len(fused_calls) == 2 * len(LLAMA_LINEARS)
    torch.testing.assert_close(other.double(), reference_logits(dense, model, ids, ["other"]), rtol=1e-4, atol=1e-4)


def test_mixed_batch_and_disabled_adapters_give_each_rows_own_output(gen, fused_calls):
    base = quantize(llama())
    ids = tokens(gen, batch=3)
    plain = run(base, ids)
    model = peft_model(base, gen)
    model.add_adapter("other", lora_config(r=2, lora_alpha=6))
    randomize_lora(model, gen, "other")
    model.eval()
    expected = {}
    for adapter in ("default", "other"):
        model.set_adapter(adapter)
        expected[adapter] = run(model, ids)
    calls = len(fused_calls)
    with model.disable_adapter():
        expected["__base__"] = run(model, ids)
    assert torch.equal(expected["__base__"], plain)
    names = ["other", "__base__", "default"]
    mixed = run(model, ids, adapter_names=names)
    assert len(fused_calls) == calls  # neither disabled adapters nor mixed batches fuse
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], expected[name][row], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(expected["default"], expected["other"], atol=1e-3)


# ---------------------------------------------------------------------------------------------
# save_pretrained / from_pretrained
# ---------------------------------------------------------------------------------------------


def test_save_and_load_round_trip_gives_identical_logits(gen, tmp_path):
    base = quantize(llama())
    fresh = copy.deepcopy(base)
    model = peft_model(base, gen)
    ids = tokens(gen)
    expected = run(model, ids)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert sorted(saved["target_modules"]) == sorted(LLAMA_LINEARS)
    assert not any("custom" in key for key in saved)
    with pytest.raises(ValueError, match="is not supported"):  # PEFT alone has no layer for Linear4bit
        peft.PeftModel.from_pretrained(copy.deepcopy(fresh), tmp_path)

    config = register(peft.LoraConfig.from_pretrained(tmp_path))
    loaded = peft.PeftModel.from_pretrained(fresh, tmp_path, config=config).eval()
    assert lora_layers(loaded).keys() == lora_layers(model).keys()
    assert torch.equal(run(loaded, ids), expected)
    assert not any(p.requires_grad for p in loaded.parameters())


# ---------------------------------------------------------------------------------------------
# prepare_model_for_kbit_training
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepare_model_for_kbit_training_leaves_the_packed_bytes_alone(dtype, gen):
    base = quantize(llama(dtype))
    before = packed_state(base)
    ids = tokens(gen)
    logits = run(base, ids)
    prepared = peft.prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    after = packed_state(prepared)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    model = peft.get_peft_model(prepared, register(lora_config())).eval()
    out = run(model, ids)  # a fresh adapter: the base model's output
    if dtype == torch.float32:
        assert torch.equal(out, logits)
    else:  # the norms and embeddings now run in fp32
        assert torch.linalg.norm(out.float() - logits.float()) <= 3e-2 * torch.linalg.norm(logits.float())


def test_a_float_quant_storage_cast_by_prepare_model_for_kbit_training_is_a_clear_error(gen):
    """PEFT casts every bf16 parameter not of a class named Params4bit to fp32; the packed
    words of a bf16 quant_storage include NaN bit patterns, which the cast canonicalizes."""
    prepared = peft.prepare_model_for_kbit_training(quantize(llama(torch.bfloat16), quant_storage=torch.bfloat16),
                                                    use_gradient_checkpointing=False)
    with pytest.raises(ValueError, match="cast the packed weight"):
        run(prepared, tokens(gen))


# ---------------------------------------------------------------------------------------------
# Training: get_peft_model against prepare_model
# ---------------------------------------------------------------------------------------------


def test_get_peft_model_trains_to_the_same_loss_as_prepare_model(gen):
    dense = llama()
    ours = fastlora.prepare_model(copy.deepcopy(dense), r=4, lora_alpha=8, target_modules=list(LLAMA_LINEARS))
    theirs = peft.get_peft_model(quantize(copy.deepcopy(dense)), register(lora_config()))
    randomize_lora(ours, gen)
    ours_params = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    theirs_params = {n: p for n, p in theirs.named_parameters() if p.requires_grad}
    assert len(ours_params) == len(theirs_params) == 4 * len(LLAMA_LINEARS)
    pairs = []
    for name, p in ours_params.items():
        q = theirs_params[PREFIX + name.replace(".weight", ".default.weight")]
        with torch.no_grad():
            q.copy_(p)
        pairs.append((p, q))
    for name, layer in lora_layers(theirs).items():
        assert torch.equal(layer.base_layer.weight, ours.get_submodule(name).base_layer.weight)

    ids = tokens(gen)  # one batch: the loss must fall
    losses = {}
    for key, model in (("ours", ours), ("theirs", theirs)):
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses[key] = []
        for _ in range(4):
            loss = model(input_ids=ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[key].append(loss.item())
    assert losses["ours"][-1] < losses["ours"][0]  # it trains
    torch.testing.assert_close(torch.tensor(losses["theirs"]), torch.tensor(losses["ours"]), rtol=1e-5, atol=1e-6)
    for p, q in pairs:
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Merging
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compute_dtype", [None, torch.bfloat16])
def test_merge_gives_dense_layers_with_the_same_outputs_and_unmerge_restores_the_4bit_ones(compute_dtype, gen):
    model = peft_model(quantize(llama(), compute_dtype=compute_dtype), gen)
    ids = tokens(gen)
    before = run(model, ids)
    bytes_before = packed_state(model)
    quantized = {n: m.base_layer for n, m in lora_layers(model).items()}

    def close(got: torch.Tensor) -> None:
        if compute_dtype is None:
            torch.testing.assert_close(got, before, rtol=1e-5, atol=1e-5)
        else:  # bf16 products in the 4-bit layers, fp32 ones in the merged
            assert torch.linalg.norm(got - before) <= 2e-2 * torch.linalg.norm(before)

    model.merge_adapter()
    assert all(type(m.base_layer) is nn.Linear and m.base_layer.weight.dtype == torch.float32
               for m in lora_layers(model).values())
    assert not packed_state(model)
    close(run(model, ids))
    model.unmerge_adapter()
    assert {n: m.base_layer for n, m in lora_layers(model).items()} == quantized
    after = packed_state(model)
    assert after.keys() == bytes_before.keys() and all(torch.equal(after[k], bytes_before[k]) for k in after)
    assert torch.equal(run(model, ids), before)

    merged = model.merge_and_unload()
    assert not any(isinstance(m, (Linear4bit, peft.tuners.lora.LoraLayer)) for m in merged.modules())
    assert type(merged.model.layers[0].self_attn.q_proj) is nn.Linear
    close(run(merged, ids))


def test_a_failed_safe_merge_leaves_the_4bit_layer_in_place(gen):
    model = peft_model(quantize(llama()), gen)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    quantized = layer.base_layer
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaNs detected"):
        layer.merge(safe_merge=True)
    assert layer.base_layer is quantized and not layer.merged


# ---------------------------------------------------------------------------------------------
# target_modules="all-linear"
# ---------------------------------------------------------------------------------------------


def test_all_linear_needs_the_model_and_then_finds_every_4bit_layer_but_the_head(gen):
    dense = llama()
    base = quantize(copy.deepcopy(dense))
    # PEFT alone sees no linear layer but the (excluded) head.
    with pytest.raises(ValueError, match="No `target_modules`"):
        peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules="all-linear"))
    # One layer left dense: PEFT's own choice is kept, and gets PEFT's own layer.
    dense_name = "model.layers.1.mlp.down_proj"
    parent, _, child = dense_name.rpartition(".")
    setattr(base.get_submodule(parent), child, copy.deepcopy(dense.get_submodule(dense_name)))
    config = register(lora_config(target_modules="all-linear"), base)
    assert config.target_modules == set(find_target_modules(dense, "all-linear"))
    model = peft.get_peft_model(base, config)
    layers = lora_layers(model)
    assert set(layers) == set(config.target_modules) - {dense_name}
    assert type(model.base_model.model.get_submodule(dense_name)) is peft.tuners.lora.Linear
    assert type(model.base_model.model.lm_head) is nn.Linear
    # On a model that has PEFT layers already, "all-linear" takes them, not their bases.
    again = register(lora_config(target_modules="all-linear"), model.base_model.model)
    assert again.target_modules == config.target_modules
    model.add_adapter("second", again)
    assert all(set(m.lora_A) == {"default", "second"} for m in lora_layers(model).values())
    assert lora_layers(model).keys() == layers.keys()
    with pytest.raises(ValueError, match="matches no"):
        register(lora_config(target_modules="all-linear"), nn.Sequential(nn.ReLU()))

