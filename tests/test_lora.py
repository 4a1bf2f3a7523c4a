import json

import pytest
import torch
from safetensors.torch import load_file

import common
from lora import LoRALinear, apply_lora, load_lora, lora_disabled, save_lora, save_merged


def batch(tokenizer):
    texts = ["Tom has 3 pens.", "Mia has 12 apples. Mia buys 7 more."]
    return tokenizer(texts, return_tensors="pt", padding=True)


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def randomize_lora(model, seed=1):
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in model.named_parameters():
        if ".lora_" in name:
            parameter.data = torch.randn(parameter.shape, generator=generator) * 0.1


def test_zero_init_b_gives_identical_outputs(toy_model):
    model, tokenizer = toy_model
    inputs = batch(tokenizer)
    before = logits(model, inputs)
    apply_lora(model, r=8, alpha=16)
    assert torch.equal(logits(model, inputs), before)
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoRALinear) and layer.scaling == 2.0
    assert torch.count_nonzero(layer.lora_A.weight) > 0 and torch.count_nonzero(layer.lora_B.weight) == 0


def test_all_seven_projections_wrapped_and_only_lora_trainable(toy_model):
    model, tokenizer = toy_model
    apply_lora(model, r=4, alpha=8)
    wrapped = {name.split(".")[-1] for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    randomize_lora(model)
    model(**batch(tokenizer)).logits.sum().backward()
    for name, parameter in model.named_parameters():
        if ".lora_" in name:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        else:
            assert parameter.grad is None, name


@pytest.mark.parametrize("dora", [False, True])
def test_lora_disabled_gives_the_base_model(dora, toy_model):
    model, tokenizer = toy_model
    inputs = batch(tokenizer)
    base = logits(model, inputs)
    apply_lora(model, r=4, alpha=8, dora=dora)
    randomize_lora(model)
    adapted = logits(model, inputs)
    assert not torch.allclose(adapted, base, atol=1e-3)
    with lora_disabled(model):
        assert torch.equal(logits(model, inputs), base)
    assert torch.equal(logits(model, inputs), adapted)


@pytest.mark.parametrize("dora", [False, True])
def test_save_load_round_trip_in_peft_layout(dora, toy_model, toy, tmp_path):
    model, tokenizer = toy_model
    inputs = batch(tokenizer)
    apply_lora(model, r=4, alpha=8, targets=("q_proj", "v_proj"), dora=dora)
    randomize_lora(model)
    expected = logits(model, inputs)
    save_lora(model, tmp_path, base_model="toy")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"] and config["use_dora"] == dora
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.3.self_attn.v_proj.lora_B.weight" in keys
    if dora:  # PEFT's key of DoRA's magnitude
        assert "base_model.model.model.layers.2.self_attn.q_proj.lora_magnitude_vector" in keys
    assert len(keys) == 4 * 2 * (3 if dora else 2)  # layers x (q, v) x (A, B[, magnitude])

    fresh, _ = common.load_model("toy")
    load_lora(fresh, tmp_path)
    assert torch.allclose(logits(fresh, inputs), expected, atol=1e-6)


@pytest.mark.parametrize("dora", [False, True])
def test_save_merged_exports_a_plain_model(dora, toy_model, tmp_path):
    from transformers import AutoModelForCausalLM
    model, tokenizer = toy_model
    inputs = batch(tokenizer)
    apply_lora(model, r=4, alpha=8, dora=dora)
    randomize_lora(model)
    expected = logits(model, inputs)
    save_merged(model, tokenizer, tmp_path)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not any(".lora_" in name or "base_layer" in name for name in exported.state_dict())
    assert torch.allclose(logits(exported, inputs), expected, atol=1e-4)
    assert torch.allclose(logits(model, inputs), expected)  # the LoRA model itself is unchanged


@pytest.mark.parametrize("bias", [False, True])
def test_dora_layer_matches_the_formula_with_the_norm_detached(bias):
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5, bias=bias)
    layer = LoRALinear(base, r=2, alpha=4, dora=True)
    x = torch.randn(3, 6)
    assert torch.allclose(layer(x), base(x), atol=1e-6)  # B = 0 and m = ||W||: the base layer
    for parameter in (layer.lora_B.weight, layer.lora_magnitude_vector):
        parameter.data += torch.randn(parameter.shape) * 0.3
    # W' = m * V / ||V||, V = W + (alpha / r) B A, the norm of each output row treated as a constant.
    direction = base.weight.double() + 2.0 * (layer.lora_B.weight @ layer.lora_A.weight).double()
    norm = direction.norm(dim=1, keepdim=True).detach()
    expected = x.double() @ (layer.lora_magnitude_vector.double()[:, None] * direction / norm).T
    expected = expected + (base.bias.double() if bias else 0)
    out = layer(x)
    assert torch.allclose(out.double(), expected, atol=1e-5)
    weights = torch.randn(3, 5)
    gradients = torch.autograd.grad((out * weights).sum(), [layer.lora_A.weight, layer.lora_B.weight,
                                                             layer.lora_magnitude_vector])
    expected_gradients = torch.autograd.grad((expected * weights.double()).sum(),
                                             [layer.lora_A.weight, layer.lora_B.weight,
                                              layer.lora_magnitude_vector])
    for got, want in zip(gradients, expected_gradients):
        assert torch.allclose(got.double(), want.double(), atol=1e-5)


def test_dora_scale_is_reused_in_decoding_until_a_weight_changes():
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(6, 5), r=2, alpha=4, dora=True)
    x = torch.randn(3, 6)
    with torch.inference_mode():
        assert layer.dora_scale() is layer.dora_scale()  # one pass over W per set of weights
        before = layer(x)
    with torch.no_grad():
        layer.lora_B.weight.add_(0.5)  # an optimizer step, in place
    expected = layer(x)  # computed afresh: autograd on
    with torch.inference_mode():
        after = layer(x)
    assert torch.allclose(after, expected) and not torch.allclose(after, before)


def test_dora_trains_magnitudes_and_directions(tmp_path):
    import sft
    out = tmp_path / "dora"
    sft.main(["--steps", "2", "--batch-size", "4", "--eval-n", "0", "--dora", "--out", str(out)])
    adapter = out / "checkpoint-000002"
    assert json.loads((adapter / "adapter_config.json").read_text())["use_dora"] is True
    model, _ = common.load_model("toy")
    load_lora(model, adapter)
    layer = model.model.layers[0].mlp.down_proj
    base_norm = layer.base_layer.weight.norm(dim=1)
    assert layer.dora and not torch.allclose(layer.lora_magnitude_vector, base_norm)  # m moved
    assert layer.lora_B.weight.abs().sum() > 0
    with pytest.raises(common.InputError, match="--dora adapts LoRA layers"):
        sft.main(["--dora", "--full", "--out", str(tmp_path / "unused")])


def test_bf16_model_with_gradient_checkpointing_trains_lora():
    model, tokenizer = common.load_model("toy", gradient_checkpointing=True)
    model.to(torch.bfloat16)
    apply_lora(model, r=4, alpha=8)
    model.train()
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.lora_A.weight.dtype == torch.float32  # master weights stay float32
    out = model(**batch(tokenizer), use_cache=False).logits
    assert out.dtype == torch.bfloat16
    out.float().pow(2).mean().backward()
    assert layer.lora_B.weight.grad is not None and layer.lora_B.weight.grad.abs().sum() > 0


def test_cached_casts_follow_the_input_dtype_and_forgotten_swaps():
    """While sampling, A and B are cast once to the input's dtype and reused: a call in another
    dtype gets its own casts, and forget_decoding_caches drops them (OPSD's EMA teacher swaps
    weights whose averages then change in place, which no version counter shows)."""
    from lora import LoRALinear, forget_decoding_caches
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(8, 6), r=2, alpha=4)
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 8)
    with torch.inference_mode():
        for dtype in (torch.bfloat16, torch.float16):
            layer.base_layer.to(dtype)
            assert layer(x.to(dtype)).dtype == dtype
        swapped = layer.lora_B.weight.detach().clone()
        saved, layer.lora_B.weight.data = layer.lora_B.weight.data, swapped
        before = layer(x.half())
        swapped.mul_(3)  # in place: the parameter's version counter does not move
        forget_decoding_caches(torch.nn.Sequential(layer))
        after = layer(x.half())
        layer.lora_B.weight.data = saved
    base = layer.base_layer(x.half())
    assert torch.allclose((after - base).float(), 3 * (before - base).float(), rtol=2e-2, atol=2e-2)
