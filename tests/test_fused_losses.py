"""Every loss computed from hidden states a chunk at a time (engine.chunked_output_layer) equals the unfused
computation on the model's own full logits, in value and in gradient: SFT, GRPO, OPSD's divergence
and its sampled-token loss; with LoRA and without, tied and untied output layers, and what Gemma 2,
Granite and Cohere do to their final logits, and an output layer with a bias."""
import pytest
import torch
from transformers import (CohereConfig, CohereForCausalLM, Gemma2Config, Gemma2ForCausalLM,
                          GraniteConfig, GraniteForCausalLM, Qwen3Config, Qwen3ForCausalLM)

import common
import engine
import grpo
import opsd
import sft
from lora import apply_lora, lora_disabled

V = 50


def tiny_model(kind, lora):
    torch.manual_seed(0)
    shape = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    if kind == "gemma2-softcap":  # logits = 2 * tanh(logits / 2): the cap really acts
        model = Gemma2ForCausalLM(Gemma2Config(**shape, final_logit_softcapping=2.0,
                                               attn_implementation="eager"))
    elif kind == "granite-scaled":  # logits / 4
        model = GraniteForCausalLM(GraniteConfig(**shape, logits_scaling=4.0))
    elif kind == "cohere-scaled":  # logits * 3
        model = CohereForCausalLM(CohereConfig(**shape, logit_scale=3.0))
    else:
        model = Qwen3ForCausalLM(Qwen3Config(**shape, tie_word_embeddings=kind == "qwen3-tied"))
    if kind == "qwen3-biased":  # an output layer with a bias (engine.output_logits adds it itself)
        model.lm_head = torch.nn.Linear(32, V, bias=True)
        torch.nn.init.normal_(model.lm_head.bias)
    with torch.no_grad():  # a larger output layer: logits of a few units, far from uniform
        model.get_output_embeddings().weight.mul_(20)
    if lora:
        apply_lora(model, r=4, alpha=8)
        for name, parameter in model.named_parameters():
            if "lora_B" in name:  # nonzero B, so the LoRA path changes the logits
                torch.nn.init.normal_(parameter, std=0.5)
    return model


def rows():
    """Two rows of [prompt | completion], prompts and completions of different lengths: the
    token-id lists and their batch (engine.pack)."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, V, (2, 9), generator=generator).tolist()
    prompts, completions = [ids[0][:3], ids[1][:4]], [ids[0][3:], ids[1][4:6]]
    return prompts, completions, engine.pack(prompts, completions, pad_id=0, device="cpu")


def gradients(model, loss):
    model.zero_grad()
    loss.backward()
    return [p.grad.clone() for p in model.parameters() if p.requires_grad]


def assert_same(model, fused_loss, unfused_loss):
    assert fused_loss().item() == pytest.approx(unfused_loss().item(), rel=1e-5, abs=1e-6)
    for fused, unfused in zip(gradients(model, fused_loss()), gradients(model, unfused_loss())):
        assert (fused - unfused).abs().max() <= 1e-4 * unfused.abs().max()  # float32 sums


MODELS = [("qwen3-tied", False), ("qwen3-tied", True), ("qwen3-untied", False),
          ("qwen3-untied", True), ("gemma2-softcap", False), ("gemma2-softcap", True),
          ("granite-scaled", False), ("cohere-scaled", True), ("qwen3-biased", False)]


@pytest.mark.parametrize("kind,lora", MODELS)
def test_sft_and_grpo_losses_equal_the_unfused_ones(kind, lora):
    model = tiny_model(kind, lora)
    prompts, completions, batch = rows()
    completion_mask = batch["completion_mask"]
    temperature, num_targets = 0.7, int(completion_mask.sum())

    def fused(temperature):
        return engine.token_logprobs(model, batch, temperature, chunk_size=3)  # chunks cut rows

    def unfused(temperature):  # the textbook computation, from the model's full logits
        return common.textbook_logprobs(model, prompts, completions, temperature)

    assert_same(model, lambda: sft.sft_loss(fused(1.0), completion_mask, num_targets),
                lambda: sft.sft_loss(unfused(1.0), completion_mask, num_targets))
    old_logp = unfused(temperature).detach() + 0.1 * torch.randn(completion_mask.shape)  # rho != 1
    advantages = torch.tensor([1.0, -0.5])
    for loss_type in ["grpo", "dapo"]:
        normaliser = grpo.loss_normaliser(loss_type, 2, num_targets, 8)
        assert_same(model,
                    lambda: grpo.policy_loss(fused(temperature), old_logp, advantages,
                                             completion_mask, normaliser, loss_type=loss_type),
                    lambda: grpo.policy_loss(unfused(temperature), old_logp, advantages,
                                             completion_mask, normaliser, loss_type=loss_type))


@pytest.mark.parametrize("kind,lora", MODELS)
@pytest.mark.parametrize("beta,clip", [(0.0, 0.0), (0.5, 0.0), (1.0, 0.0), (0.0, 0.05)])
def test_opsd_divergence_equals_the_unfused_one(kind, lora, beta, clip):
    model = tiny_model(kind, lora)
    teacher = tiny_model("qwen3-untied" if kind == "qwen3-tied" else "qwen3-tied", False) \
        if not lora else model  # LoRA: the teacher is the base (adapters off), as in opsd.py
    teacher_context = lora_disabled if lora else (lambda _: torch.no_grad())
    prompts, completions, student_batch = rows()
    teacher_prompts = [prompt[::-1] + [7] for prompt in prompts]  # another prompt, same completions
    teacher_batch = engine.pack(teacher_prompts, completions, pad_id=0, device="cpu")
    completion_mask = student_batch["completion_mask"]
    temperature, normaliser = 1.1, 7.0  # the step's weight: more than this micro-batch's

    def fused():
        with torch.no_grad(), teacher_context(teacher):
            teacher_hidden = engine.completion_hidden(teacher, teacher_batch)
        return opsd.divergence(model, engine.completion_hidden(model, student_batch),
                               opsd.Teacher(teacher, teacher_context),
                               teacher_hidden, completion_mask, normaliser, beta, temperature,
                               clip, chunk_size=2)[0]

    def unfused():  # the textbook computation, from both models' full logits
        with torch.no_grad(), teacher_context(teacher):
            teacher_logits = common.textbook_logits(teacher, teacher_prompts, completions)
        return opsd.textbook_divergence(common.textbook_logits(model, prompts, completions),
                                        teacher_logits, completion_mask, normaliser, beta,
                                        temperature, clip)

    assert_same(model, fused, unfused)


@pytest.mark.parametrize("kind,lora", MODELS)
def test_opsd_sampled_token_loss_equals_the_unfused_one(kind, lora):
    model = tiny_model(kind, lora)
    prompts, completions, batch = rows()
    mask = batch["completion_mask"].bool()
    targets = batch["completion_ids"][mask]
    teacher_logprobs = -torch.rand(len(targets))

    def fused():
        hidden = engine.completion_hidden(model, batch)[mask]
        return opsd.sampled_token_loss(
            engine.target_logprobs(model, hidden, targets, 1.1, chunk_size=2), teacher_logprobs,
            torch.ones(len(targets)), 7.0)

    def unfused():
        return opsd.sampled_token_loss(
            common.textbook_logprobs(model, prompts, completions, 1.1)[mask], teacher_logprobs,
            torch.ones(len(targets)), 7.0)

    assert_same(model, fused, unfused)


@pytest.mark.parametrize("lora,passes", [(True, 1), (False, 2)])
def test_the_output_layer_sees_only_completion_positions_a_chunk_at_a_time(lora, passes,
                                                                             monkeypatch):
    """The memory claim itself: no output-layer call on more than chunk_size positions, and the
    prompt positions are never sent through it. The speed claim: with a frozen output layer (LoRA)
    the backward pass recomputes nothing; a trained one (full fine-tuning) is passed twice."""
    model = tiny_model("qwen3-untied", lora)
    _, _, batch = rows()
    widths = []
    output_logits = engine.output_logits  # every use of the output layer goes through it

    def recorded(model, hidden):
        widths.append(hidden.shape[:-1])
        return output_logits(model, hidden)
    monkeypatch.setattr(engine, "output_logits", recorded)
    logprobs = engine.token_logprobs(model, batch, chunk_size=3)
    logprobs.sum().backward()
    assert all(len(shape) == 1 and shape[0] <= 3 for shape in widths)
    assert sum(shape[0] for shape in widths) == passes * int(batch["completion_mask"].sum())


@pytest.mark.parametrize("shape", [(7,), (7, 3, 4), (5, 5, 2)])
def test_chunked_gradients_equal_autograd_for_rows_of_any_shape(shape):
    """dL/dx_i = dL/dy_i * dy_i/dx_i for rows of any shape, chunks cutting across them (and a
    square [5, 5, 2], where a product along the wrong axis would still have the right shape)."""
    torch.manual_seed(0)
    x = torch.randn(*shape, requires_grad=True)
    upstream = torch.randn(shape[0])

    def per_row(rows):  # [c, ...] -> [c]
        return (rows.reshape(rows.shape[0], -1) ** 3).sum(-1).sin()

    (engine.chunked_output_layer(per_row, [x], 3, []) * upstream).sum().backward()
    fused, x.grad = x.grad, None
    (per_row(x) * upstream).sum().backward()
    assert torch.allclose(fused, x.grad, atol=1e-6)


def plain_entropy(logits, temperature):  # -sum_v p_v log p_v of softmax(logits / T), [..., V] -> [...]
    log_p = torch.log_softmax(logits.float() / temperature, dim=-1)
    return -(log_p.exp() * log_p).sum(-1)


@pytest.mark.parametrize("kind,lora", MODELS)
def test_the_entropy_read_from_the_chunks_equals_the_plain_computation(kind, lora):
    """The health metric `entropy` (GRPO: token_logprobs; OPSD: divergence's monitored values),
    from the chunked output layer, against the model's full logits; the loss's gradient is the
    same with it as without it."""
    model = tiny_model(kind, lora)
    prompts, completions, batch = rows()
    mask = batch["completion_mask"]
    with torch.no_grad():
        expected = plain_entropy(common.textbook_logits(model, prompts, completions), 0.7) * mask
    logprobs, entropy = engine.token_logprobs(model, batch, 0.7, chunk_size=3, entropy=True)
    assert torch.allclose(entropy, expected, rtol=1e-5, atol=1e-6) and entropy.requires_grad is False
    assert float(expected.max()) > 1e-3  # not 0: a real check
    num_targets = int(mask.sum())
    assert_same(model, lambda: sft.sft_loss(engine.token_logprobs(
                    model, batch, 0.7, chunk_size=3, entropy=True)[0], mask, num_targets),
                lambda: sft.sft_loss(engine.token_logprobs(model, batch, 0.7, chunk_size=3),
                                     mask, num_targets))
    teacher = opsd.Teacher(model, lora_disabled if lora else (lambda _: torch.no_grad()))
    hidden = engine.completion_hidden(model, batch)
    weights = mask * torch.tensor([[1.0], [0.5]])  # PACED-like row weights
    monitored = opsd.divergence(model, hidden, teacher, hidden.detach(), weights, 7.0,
                                temperature=0.7, chunk_size=2)[1]
    assert float(monitored[2]) == pytest.approx(float((expected * weights).sum() / 7.0), rel=1e-5)
