import torch

import common


def test_batched_greedy_equals_one_prompt_at_a_time(toy):
    """Left padding must not shift completions: prompts of different lengths, batched or alone."""
    model, tokenizer = toy
    examples = common.load_examples("toy", "test")[:6]
    prompts = [common.chat_prompt(tokenizer, common.student_prompt(e["question"])) for e in examples]
    assert len({len(p) for p in prompts}) > 1
    batched = common.generate(model, tokenizer, prompts, max_new_tokens=40)
    for i, prompt in enumerate(prompts):
        alone = common.generate(model, tokenizer, [prompt], max_new_tokens=40)
        assert alone["texts"][0] == batched["texts"][i]
        n = int(alone["completion_mask"].sum())
        assert torch.equal(alone["completion_ids"][0, :n], batched["completion_ids"][i, :n])


def test_completion_mask_ends_at_the_first_eos_inclusive(toy):
    model, tokenizer = toy
    prompts = [common.chat_prompt(tokenizer, common.student_prompt(e["question"]))
               for e in common.load_examples("toy", "test")[:8]]
    torch.manual_seed(0)
    out = common.generate(model, tokenizer, prompts, max_new_tokens=64, temperature=1.0,
                          top_p=0.95, top_k=20, num_samples=2)
    ids, mask = out["completion_ids"], out["completion_mask"]
    assert ids.shape[0] == 16 and out["prompt_ids"].shape[0] == 16
    assert torch.equal(out["prompt_ids"][0], out["prompt_ids"][1])  # samples of a prompt adjacent
    assert out["num_generated_tokens"] == int(mask.sum())
    for row in range(16):
        n = int(mask[row].sum())
        assert mask[row, :n].all() and not mask[row, n:].any()  # one contiguous run from the start
        eos_positions = (ids[row, :n] == tokenizer.eos_token_id).nonzero().flatten().tolist()
        assert eos_positions in ([n - 1], [])  # EOS is the last masked token, or none was made
        assert (ids[row, n:] == tokenizer.pad_token_id).all()


def test_pack_rows_trains_eos_even_when_pad_equals_eos():
    eos = pad = 2
    input_ids, attention_mask, completion_mask = common.pack_rows(
        [[5, 6, 7], [5]], [[8, 9, eos], [8, eos]], pad_id=pad, device="cpu")
    assert input_ids.tolist() == [[5, 6, 7, 8, 9, eos], [5, 8, eos, pad, pad, pad]]
    assert attention_mask.tolist() == [[1] * 6, [1, 1, 1, 0, 0, 0]]
    # targets are input_ids[:, 1:]: the completion (EOS included) and nothing else
    assert completion_mask.tolist() == [[0, 0, 1, 1, 1], [1, 1, 0, 0, 0]]
    targets = input_ids[:, 1:]
    assert targets[completion_mask.bool()].tolist() == [8, 9, eos, 8, eos]


def test_token_logprobs_match_a_log_softmax(toy):
    model, tokenizer = toy
    input_ids = torch.tensor([[3, 4, 5, 6, 7]])
    attention_mask = torch.ones_like(input_ids)
    logprobs = common.token_logprobs(model, input_ids, attention_mask)
    with torch.no_grad():
        reference = model(input_ids).logits.log_softmax(-1)
    expected = torch.stack([reference[0, t, input_ids[0, t + 1]] for t in range(4)])
    assert torch.allclose(logprobs[0].detach(), expected, atol=1e-5)


def test_evaluate_counts_correct_answers(toy):
    model, tokenizer = toy
    examples = common.load_examples("toy", "test")[:20]
    result = common.evaluate(model, tokenizer, examples, max_new_tokens=64, batch_size=7)
    prompts = [common.chat_prompt(tokenizer, common.student_prompt(e["question"])) for e in examples]
    texts = common.generate(model, tokenizer, prompts, 64)["texts"]
    assert result["n"] == 20
    assert result["accuracy"] == sum(common.is_correct(t, e["answer"]) for t, e in zip(texts, examples)) / 20
