import pytest
import torch

import common
import engine
from lora import apply_lora


def test_batched_greedy_equals_one_prompt_at_a_time(toy):
    """Left padding must not shift completions: prompts of different lengths, batched or alone."""
    model, tokenizer = toy
    examples = common.load_examples("toy", "test")[:6]
    prompts = [common.chat_prompt(tokenizer, common.student_prompt(e["question"])) for e in examples]
    assert len({len(p) for p in prompts}) > 1
    batched = engine.generate(model, tokenizer, prompts, max_new_tokens=40)
    for i, prompt in enumerate(prompts):
        alone = engine.generate(model, tokenizer, [prompt], max_new_tokens=40)
        assert alone["texts"][0] == batched["texts"][i]
        assert alone["completions"][0] == batched["completions"][i]
        assert alone["prompts"][0] == batched["prompts"][i]  # without its padding


def test_completion_mask_ends_at_the_first_eos_inclusive(toy):
    model, tokenizer = toy
    prompts = [common.chat_prompt(tokenizer, common.student_prompt(e["question"]))
               for e in common.load_examples("toy", "test")[:8]]
    torch.manual_seed(0)
    out = engine.generate(model, tokenizer, prompts, max_new_tokens=64, temperature=1.0,
                          top_p=0.95, top_k=20, num_samples=2)
    completions = out["completions"]
    assert len(completions) == 16 and len(out["prompts"]) == 16 and len(out["logprobs"]) == 16
    assert out["prompts"][0] == out["prompts"][1]  # samples of a prompt adjacent
    assert out["prompts"][0] == tokenizer(prompts[0], add_special_tokens=False)["input_ids"]
    assert out["num_generated_tokens"] == sum(map(len, completions))
    assert any(len(ids) < 64 for ids in completions)  # some ended before the limit
    for ids, logprobs, finished in zip(completions, out["logprobs"], out["finished"]):
        eos_positions = [t for t, token in enumerate(ids) if token == tokenizer.eos_token_id]
        assert eos_positions == ([len(ids) - 1] if finished else [])  # EOS ends it, or none came
        assert finished or len(ids) == 64  # a completion without EOS was cut at the limit
        assert logprobs.shape == (len(ids),) and (logprobs <= 0).all()


def test_pack_shares_prompts_and_trains_eos_even_when_pad_equals_eos():
    eos = pad = 2
    batch = engine.pack([[5, 6, 7], [5], [5, 6, 7]], [[8, 9, eos], [8, eos], [9, eos]], pad_id=pad,
                        device="cpu")
    assert batch["prompt_ids"].tolist() == [[5, 6, 7], [pad, pad, 5]]  # each prompt once, left padded
    assert batch["prompt_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["prompt_of_row"].tolist() == [0, 1, 0]
    assert batch["completion_ids"].tolist() == [[8, 9, eos], [8, eos, pad], [9, eos, pad]]
    assert batch["completion_mask"].tolist() == [[1, 1, 1], [1, 1, 0], [1, 1, 0]]  # EOS is a target


def rows_and_batch(tokenizer):
    """Prompts of different lengths, each with completions of different lengths, the rows of one
    prompt not adjacent: the rows and their batch."""
    prompts = [tokenizer(common.chat_prompt(tokenizer, common.student_message(e)),
                         add_special_tokens=False)["input_ids"]
               for e in common.load_examples("toy", "test")[:4]]
    prompts = [prompts[0], prompts[1], prompts[3]]
    assert len({len(p) for p in prompts}) == 3
    generator = torch.Generator().manual_seed(0)
    rows = [(prompt, torch.randint(3, 90, (length,), generator=generator).tolist())
            for length in (5, 1, 9) for prompt in prompts]
    return rows, engine.pack([p for p, _ in rows], [c for _, c in rows], tokenizer.pad_token_id, "cpu")


def assert_equal_to_one_pass_per_row(model, rows, batch):
    """completion_hidden's hidden states, and the LoRA gradients of a loss on them, equal those of
    a plain forward pass over each whole [prompt | completion] row (no padding, no cache)."""
    apply_lora(model, r=4, alpha=8)
    torch.manual_seed(0)
    for parameter in model.parameters():
        if parameter.requires_grad:
            torch.nn.init.normal_(parameter, std=0.05)  # B = 0 would make every gradient path alike
    model.train()
    weights = torch.randn(*batch["completion_ids"].shape, model.config.hidden_size)
    mask = batch["completion_mask"].bool()
    shared = engine.completion_hidden(model, batch)  # [N, T, H]
    (shared[mask] * weights[mask]).sum().backward()
    shared_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()

    loss = 0
    for i, (prompt, completion) in enumerate(rows):
        ids = torch.tensor([prompt + completion])
        hidden = model.get_decoder()(input_ids=ids).last_hidden_state[0, len(prompt) - 1:-1]
        assert torch.allclose(shared[i, :len(completion)], hidden, atol=1e-4)
        loss = loss + (hidden * weights[i, :len(completion)]).sum()
    loss.backward()
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            difference = (shared_grads[name] - parameter.grad).abs().max()
            assert difference <= 1e-4 * parameter.grad.abs().max(), name  # float32 sums


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_shared_prompt_passes_equal_one_pass_per_row_and_their_gradients(gradient_checkpointing):
    """completion_hidden computes each prompt once and shares its keys and values with its
    completions, with and without gradient checkpointing (which recomputes the layers in the
    backward pass)."""
    model, tokenizer = common.load_model("toy", gradient_checkpointing=gradient_checkpointing)
    rows, batch = rows_and_batch(tokenizer)
    assert batch["prompt_of_row"].tolist() == [0, 1, 2] * 3
    assert_equal_to_one_pass_per_row(model, rows, batch)


def save_tiny_model(model, folder):
    """A random model with the toy's tokenizer, as a folder common.load_model reads."""
    model.save_pretrained(folder)
    common.load_model("toy")[1].save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("kind", ["sliding-window", "kv-sharing"])
def test_shared_prompt_passes_with_sliding_windows_and_shared_keys(kind, tmp_path):
    """A sliding window of 4 positions, shorter than the rows (Mistral), and layers that read the
    keys and values of an earlier layer (Gemma 4's KV sharing, whose cache layers stay as they
    are), under gradient checkpointing."""
    from transformers import (Gemma4ForCausalLM, Gemma4TextConfig, MistralConfig,
                              MistralForCausalLM)
    shape = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4,
                 pad_token_id=0)
    torch.manual_seed(0)
    if kind == "sliding-window":
        model = MistralForCausalLM(MistralConfig(**shape))
    else:
        model = Gemma4ForCausalLM(Gemma4TextConfig(
            **shape, num_kv_shared_layers=2, hidden_size_per_layer_input=8,
            layer_types=["sliding_attention", "full_attention"] * 2))
    model, _ = common.load_model(save_tiny_model(model, tmp_path), gradient_checkpointing=True)
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 90, (n,), generator=generator).tolist() for n in (9, 6)]
    rows = [(prompts[i % 2], torch.randint(3, 90, (n,), generator=generator).tolist())
            for i, n in enumerate((7, 10, 3, 1))]
    assert_equal_to_one_pass_per_row(model, rows, engine.pack([p for p, _ in rows],
                                                               [c for _, c in rows], 0, "cpu"))


def test_a_model_with_recurrent_layers_is_refused_in_one_line(tmp_path):
    """A KV cache with other state than attention's (LFM2's convolutions) would not be shared
    right: load_model says so before anything runs."""
    from transformers import Lfm2Config, Lfm2ForCausalLM
    model = Lfm2ForCausalLM(Lfm2Config(vocab_size=97, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, layer_types=["conv", "full_attention"]))
    with pytest.raises(common.InputError, match="LinearAttentionLayer layers, and the scripts'"):
        common.load_model(save_tiny_model(model, tmp_path))


def test_token_logprobs_match_a_log_softmax(toy):
    model, tokenizer = toy
    rows, batch = rows_and_batch(tokenizer)
    logprobs = engine.token_logprobs(model, batch, chunk_size=2)  # [N, T]
    for i, (prompt, completion) in enumerate(rows):
        with torch.no_grad():
            reference = model(torch.tensor([prompt + completion])).logits[0].log_softmax(-1)
        expected = reference[len(prompt) - 1:-1].gather(1, torch.tensor(completion)[:, None])[:, 0]
        assert torch.allclose(logprobs[i, :len(completion)].detach(), expected, atol=1e-5)
        assert not logprobs[i, len(completion):].any()  # padding: 0


def test_evaluate_counts_correct_answers(toy):
    model, tokenizer = toy
    examples = common.load_examples("toy", "test")[:20]
    result = common.evaluate(model, tokenizer, examples, max_new_tokens=64, batch_size=7)
    prompts = [common.chat_prompt(tokenizer, common.student_prompt(e["question"])) for e in examples]
    texts = engine.generate(model, tokenizer, prompts, 64)["texts"]
    assert result["n"] == 20
    assert result["accuracy"] == sum(common.is_correct(t, e["answer"]) for t, e in zip(texts, examples)) / 20
    # Cut short, some completions end before their '####' line: format counts those that do not.
    short = common.evaluate(model, tokenizer, examples, max_new_tokens=26, batch_size=7)
    texts = engine.generate(model, tokenizer, prompts, 26)["texts"]
    answered = sum(common.extract_answer(text) is not None for text in texts)
    assert 0 < answered < 20 and short["format"] == answered / 20


def toy_prompts(tokenizer, n):
    return [common.chat_prompt(tokenizer, common.student_message(e))
            for e in common.load_examples("toy", "test")[:n]]


def test_greedy_equals_transformers_generate_token_for_token(toy):
    """Our KV-cache loop (prefill once, finished rows leave the batch) is plain greedy decoding."""
    model, tokenizer = toy
    prompts = toy_prompts(tokenizer, 6)
    ours = engine.generate(model, tokenizer, prompts, max_new_tokens=48)
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    theirs = model.generate(**encoded, do_sample=False, max_new_tokens=48,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    theirs = theirs[:, encoded["input_ids"].shape[1]:]
    for row in range(len(prompts)):
        n = len(ours["completions"][row])
        assert ours["completions"][row] == theirs[row, :n].tolist()
        assert ours["finished"][row] == (theirs[row, n - 1] == tokenizer.eos_token_id)
    # Two samples per prompt share its prefilled cache: greedy, both are the one completion.
    twice = engine.generate(model, tokenizer, prompts, max_new_tokens=48, num_samples=2)
    assert twice["texts"] == [text for text in ours["texts"] for _ in range(2)]


def test_sampling_has_no_hidden_top_k(toy_model):
    """--top-k 0 means no top-k. transformers fills a top_k of None with 50 (or a checkpoint's own):
    with these next-token probabilities over the toy's 97 tokens, the 47 least likely ones, 40% of
    the mass, would never appear."""
    model, tokenizer = toy_model
    vocabulary, hidden = model.lm_head.weight.shape
    model.lm_head = torch.nn.Linear(hidden, vocabulary, bias=True,  # logits = the bias, whatever
                                    device=model.device)
    torch.nn.init.zeros_(model.lm_head.weight)  # the hidden state
    with torch.no_grad():
        model.lm_head.bias.copy_(-torch.linspace(0, 1, vocabulary))  # distinct, slowly falling
    torch.manual_seed(0)
    out = engine.generate(model, tokenizer, toy_prompts(tokenizer, 1), max_new_tokens=1,
                          temperature=1.0, top_k=0, num_samples=4000)
    first = torch.tensor([ids[0] for ids in out["completions"]])
    assert len(set(first.tolist())) == vocabulary  # every token drawn, none cut off
    frequencies = torch.bincount(first, minlength=vocabulary).float() / len(first)
    assert (frequencies - model.lm_head.bias.softmax(0).float()).abs().max() < 0.01


def test_sample_next_token_draws_the_exact_truncated_distribution():
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0]])
    temperature, top_k, top_p = 0.8, 6, 0.9
    # By hand: softmax at the temperature, keep the 6 most likely, then the smallest prefix of them
    # (most likely first) whose mass reaches 0.9, renormalise.
    probs = torch.softmax(logits[0] / temperature, -1)
    probs[6:] = 0
    probs = probs / probs.sum()
    keep = (probs.cumsum(0) - probs) < top_p  # the mass before a token is still short of top_p
    expected = torch.where(keep, probs, torch.zeros_like(probs))
    expected = expected / expected.sum()
    torch.manual_seed(0)
    draws = torch.cat([engine.sample_next_token(logits.expand(1000, -1), temperature, top_p, top_k)[0]
                       for _ in range(40)])
    frequencies = torch.bincount(draws, minlength=8).float() / len(draws)
    assert (frequencies - expected).abs().max() < 0.006
    assert frequencies[~keep].sum() == 0
    tokens, logprobs = engine.sample_next_token(logits, temperature=0.0)
    assert tokens.item() == 0  # greedy: the argmax
    assert logprobs.item() == pytest.approx(torch.log_softmax(logits[0], -1)[0].item())


def test_the_sampler_returns_the_untruncated_logprob_at_its_temperature():
    """The log-probability that comes with a draw is log softmax(logits / temperature) at the drawn
    token, before top-k and top-p: what the trainer computes for it (engine.target_logprobs)."""
    torch.manual_seed(0)
    logits = torch.randn(64, 50) * 3
    tokens, logprobs = engine.sample_next_token(logits, temperature=0.7, top_p=0.8, top_k=10)
    expected = torch.log_softmax(logits / 0.7, -1).gather(1, tokens[:, None]).squeeze(1)
    assert torch.allclose(logprobs, expected, atol=1e-5)


def test_a_diverged_model_stops_sampling_with_an_error(toy_model):
    """NaN or infinite logits (a diverged run) stop the sampler with one clear error, and no token
    drawn from them is V, an id past the vocabulary that would fail later and far away (on CUDA:
    a device-side assert)."""
    for bad in (float("nan"), float("inf"), float("-inf")):
        logits = torch.zeros(2, 8)
        logits[1] = bad
        tokens, logprobs = engine.sample_next_token(logits, temperature=1.0)
        assert tokens.max() < 8 and not logprobs[1].isfinite()
    model, tokenizer = toy_model
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))  # every hidden state, so every logit, is NaN
    with pytest.raises(ValueError, match="NaN or infinity"):
        engine.generate(model, tokenizer, toy_prompts(tokenizer, 2), max_new_tokens=20,
                        temperature=1.0)


def test_generation_stops_at_any_end_token_of_the_generation_config(toy_model):
    """A checkpoint may list several end tokens (Qwen3: <|im_end|> and <|endoftext|>); a completion
    ends at the first of any of them, and its mask ends there, the end token included."""
    model, tokenizer = toy_model
    prompts = toy_prompts(tokenizer, 4)
    plain = engine.generate(model, tokenizer, prompts, max_new_tokens=48)
    equals = tokenizer.convert_tokens_to_ids("=")
    assert all("=" in text for text in plain["texts"])
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, equals]
    cut = engine.generate(model, tokenizer, prompts, max_new_tokens=48)
    for row in range(len(prompts)):
        n = len(cut["completions"][row])
        first_equals = plain["completions"][row].index(equals)
        assert n == first_equals + 1 and cut["finished"][row]
        assert cut["completions"][row] == plain["completions"][row][:n]
        assert cut["texts"][row] == plain["texts"][row][:plain["texts"][row].index("=") + 1]


def test_greedy_ignores_the_checkpoints_generation_settings(toy_model):
    """A checkpoint's generation_config.json (repetition penalty, n-gram blocking, a minimum
    length) must not change decoding: greedy is the plain argmax."""
    model, tokenizer = toy_model
    prompts = toy_prompts(tokenizer, 4)
    plain = engine.generate(model, tokenizer, prompts, max_new_tokens=48)
    model.generation_config.repetition_penalty = 3.0
    model.generation_config.no_repeat_ngram_size = 1
    model.generation_config.min_new_tokens = 40
    assert engine.generate(model, tokenizer, prompts, max_new_tokens=48)["texts"] == plain["texts"]


def test_preallocated_cache_layer_holds_what_transformers_dynamic_layer_holds():
    """Written in place instead of concatenated, through prefill, row repeats, tokens (the buffers
    growing) and rows leaving: the same keys and values, and the same length for the mask."""
    from transformers.cache_utils import DynamicLayer
    torch.manual_seed(0)
    ours, theirs = engine.PreallocatedLayer(max_length=9), DynamicLayer()
    prefill = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)  # [rows, heads, positions, dim]
    steps = [(torch.randn(6, 3, 1, 4), torch.randn(6, 3, 1, 4)),
             (torch.randn(4, 3, 1, 4), torch.randn(4, 3, 1, 4))]
    for layer in (ours, theirs):
        layer.update(*prefill)
        layer.batch_repeat_interleave(3)
        layer.update(*steps[0])
        layer.batch_select_indices(torch.tensor([0, 2, 3, 5]))
        keys, values = layer.update(*steps[1])
    assert torch.equal(ours.keys, theirs.keys) and torch.equal(ours.values, theirs.values)
    assert ours.keys.shape == (4, 3, 7, 4) and ours.get_seq_length() == theirs.get_seq_length() == 7
    assert ours.get_mask_sizes(1) == theirs.get_mask_sizes(1)
    assert ours.key_buffer.shape[2] == 9  # 5 positions at prefill, doubled, capped at max_length


def test_decoding_keeps_flash_attention_for_a_model_without_sdpa():
    """engine.generate decodes through SDPA by switching a Flash Attention 2 model to it, but a
    model class without an SDPA path (Gemma 2) would refuse the switch: it keeps its own."""
    from types import SimpleNamespace
    switched = []
    for supports_sdpa in (True, False):
        model = SimpleNamespace(config=SimpleNamespace(_attn_implementation="flash_attention_2"),
                                _supports_sdpa=supports_sdpa)
        model.set_attn_implementation = lambda name, model=model: (
            switched.append(name), setattr(model.config, "_attn_implementation", name))
        with engine.sdpa_attention(model):
            inside = model.config._attn_implementation
        assert inside == ("sdpa" if supports_sdpa else "flash_attention_2")
        assert model.config._attn_implementation == "flash_attention_2"
    assert switched == ["sdpa", "flash_attention_2"]
