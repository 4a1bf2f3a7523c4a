import json
import math

import pytest
import torch

import common
import engine
import grpo
from lora import load_lora


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    # group 1: mean 0.25, unbiased std sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5; group 2: all equal
    scaled = grpo.group_advantages(rewards, group_size=4, scale=True)
    expected = torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0]) / torch.tensor([0.5] * 4 + [0.0] * 4).add(1e-4)
    assert torch.allclose(scaled, expected)
    plain = grpo.group_advantages(rewards, group_size=4, scale=False)
    assert plain.tolist() == [0.75, -0.25, -0.25, -0.25, 0.0, 0.0, 0.0, 0.0]
    assert grpo.group_advantages(torch.zeros(6), 3).abs().sum() == 0


def test_cold_start_amplification_by_hand():
    successes = torch.tensor([1, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0])  # success rates 1/4, 1/2, 0
    factor = grpo.cold_start_amplification(successes, group_size=4, q=0.5)
    expected = [2.0] * 4 + [2 ** 0.5] * 4 + [1.0] * 4  # (1/4)^-0.5, (1/2)^-0.5; no success: 1
    assert torch.allclose(factor, torch.tensor(expected))
    assert grpo.cold_start_amplification(successes, 4, q=0.0).tolist() == [1.0] * 12  # plain GRPO


def test_garl_scales_each_problems_advantages_by_its_success_rate(tmp_path, monkeypatch):
    rewards_seen, advantages_seen = [], []
    real_advantages, real_loss = grpo.group_advantages, grpo.policy_loss

    def record_rewards(rewards, *args, **kwargs):
        rewards_seen.append(rewards.clone())
        return real_advantages(rewards, *args, **kwargs)

    def record_advantages(logp, old_logp, advantages, *args):
        advantages_seen[-1].append(advantages.clone())
        return real_loss(logp, old_logp, advantages, *args)
    monkeypatch.setattr(grpo, "group_advantages", record_rewards)
    monkeypatch.setattr(grpo, "policy_loss", record_advantages)
    quick = ["--steps", "1", "--batch-size", "4", "--eval-n", "0", "--max-new-tokens", "32",
             "--micro-batch-size", "64"]  # one micro-batch: the step's advantages in one tensor
    for name, q in [("plain", "0"), ("garl", "0.5")]:
        advantages_seen.append([])
        grpo.main(quick + ["--garl-q", q, "--out", str(tmp_path / name)])
    assert torch.equal(rewards_seen[0], rewards_seen[1])  # the same rollouts
    (plain,), (garl,) = advantages_seen
    rates = [float(rewards_seen[0][i // 8 * 8:i // 8 * 8 + 8].mean()) for i in range(32)]
    trained = [i for i in range(32) if rates[i] not in (0.0, 1.0)]  # rows with A != 0 are trained
    assert trained and not torch.allclose(garl, plain)  # some group was amplified
    expected = torch.tensor([float(plain[j]) * rates[i] ** -0.5 for j, i in enumerate(trained)])
    assert torch.allclose(garl, expected)


def test_sft_probability_by_hand():
    assert grpo.sft_probability(0.3, 0.3, grad_norm=2.0, first_grad_norm=2.0) == 0.5  # the start
    # A gradient half the first one, NLL log(2) below the initial: odds 1/2 * 1/2 = 1/4, P = 1/5.
    assert grpo.sft_probability(0.3 - math.log(2), 0.3, 1.0, 2.0) == pytest.approx(0.2)
    # Drifted: NLL log(3) above the initial, same gradient norm: odds 3, P = 3/4.
    assert grpo.sft_probability(0.3 + math.log(3), 0.3, 2.0, 2.0) == pytest.approx(0.75)


@pytest.mark.parametrize("mix", ["fixed", "adaptive"])
def test_sft_warmup_then_a_seeded_choice_of_sft_or_grpo_each_step(tmp_path, mix):
    import random
    out = tmp_path / mix
    grpo.main(["--steps", "6", "--batch-size", "4", "--eval-n", "0", "--max-new-tokens", "32",
               "--sft-warmup-steps", "2", "--sft-mix", mix, "--out", str(out)])  # fixed: P 0.5
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["update"] for row in rows[:2]] == ["sft", "sft"]  # the warm-up
    assert rows[1]["generated_tokens"] == 0 and "reward" not in rows[0]  # nothing sampled
    first = rows[0]["sft_grad_norm"]
    for step, row in enumerate(rows[2:], start=2):
        if mix == "fixed":  # the SFT pass runs only for SFT steps
            assert row["sft_probability"] == 0.5 and ("sft_loss" in row) == (row["update"] == "sft")
        else:
            odds = row["sft_grad_norm"] / first * math.exp(row["sft_loss"] - row["sft_initial_loss"])
            assert row["sft_probability"] == pytest.approx(odds / (1 + odds))
        draw = random.Random(f"sft-or-grpo 0 {step}").random()
        assert row["update"] == ("sft" if draw < row["sft_probability"] else "grpo")
        assert ("reward" in row) == (row["update"] == "grpo")
    assert rows[-1]["generated_tokens"] > 0


def test_a_grpo_step_of_the_adaptive_mix_is_a_plain_grpo_step(tmp_path):
    # Without a warm-up the first step measures the SFT gradient (P = 1/2) and its seeded draw,
    # 0.80, picks GRPO: the measured gradient must not leak into the update, nor the SFT pass
    # change the rollouts.
    quick = ["--steps", "1", "--batch-size", "8", "--num-generations", "2", "--eval-n", "0",
             "--max-new-tokens", "32"]  # groups of 2: some with equal rewards
    grpo.main(quick + ["--out", str(tmp_path / "plain")])
    grpo.main(quick + ["--sft-mix", "adaptive", "--out", str(tmp_path / "mix")])
    plain, mix = (json.loads((tmp_path / name / "metrics.jsonl").read_text())
                  for name in ("plain", "mix"))
    assert mix["update"] == "grpo" and mix["sft_probability"] == 0.5
    assert mix["sft_loss"] == pytest.approx(mix["sft_initial_loss"])  # LoRA's B = 0: the initial model
    for key in ["reward", "generated_tokens", "grad_norm"]:
        assert mix[key] == plain[key], key


def slow_policy_loss(logp, old_logp, advantages, mask, ref_logp, beta, eps_low, eps_high,
                     loss_type, max_len):
    """The formula, one token at a time."""
    N, T = logp.shape
    per_completion, total, count = [], 0.0, 0
    for i in range(N):
        terms = []
        for t in range(T):
            if mask[i, t]:
                rho = torch.exp(logp[i, t] - old_logp[i, t])
                clipped = min(max(rho, 1 - eps_low), 1 + eps_high)
                term = -min(rho * advantages[i], clipped * advantages[i])
                if beta:
                    d = ref_logp[i, t] - logp[i, t]
                    term = term + beta * (torch.exp(d) - d - 1)
                terms.append(term)
        per_completion.append(sum(terms) / len(terms))
        total += sum(terms)
        count += len(terms)
    if loss_type == "grpo":
        return sum(per_completion) / N
    if loss_type == "dr_grpo":
        return total / (N * max_len)
    return total / count


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_policy_loss_matches_the_formula(loss_type, beta):
    torch.manual_seed(0)
    N, T = 4, 6
    logp = -torch.rand(N, T) * 3
    old_logp = logp + torch.randn(N, T) * 0.5  # ratios well outside [0.8, 1.2] on both sides
    ratio = torch.exp(logp - old_logp)
    assert (ratio < 0.8).any() and (ratio > 1.28).any()
    ref_logp = logp + torch.randn(N, T) * 0.3
    advantages = torch.tensor([1.0, -1.0, 0.5, -2.0])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
    normaliser = grpo.loss_normaliser(loss_type, N, int(mask.sum()), 8)
    got = grpo.policy_loss(logp, old_logp, advantages, mask, normaliser, ref_logp, beta, 0.2, 0.28,
                           loss_type)
    expected = slow_policy_loss(logp, old_logp, advantages, mask, ref_logp, beta, 0.2, 0.28,
                                loss_type, 8)
    assert got.item() == pytest.approx(float(expected), rel=1e-5)


def test_on_policy_gradient_is_reinforce_with_group_baseline():
    torch.manual_seed(1)
    N, T, G = 6, 5, 3
    logp = (-torch.rand(N, T) * 2).requires_grad_()
    mask = (torch.rand(N, T) > 0.3).long()
    mask[:, 0] = 1
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0])
    advantages = grpo.group_advantages(rewards, G)
    loss = grpo.policy_loss(logp, logp.detach(), advantages, mask, normaliser=N)
    assert abs(loss.item()) < 1e-6  # the value is ~0 ...
    (gradient,) = torch.autograd.grad(loss, logp)
    reinforce = -(advantages[:, None] * logp * mask / mask.sum(1, keepdim=True)).sum() / N
    (expected,) = torch.autograd.grad(reinforce, logp)
    assert gradient.abs().sum() > 0 and torch.allclose(gradient, expected)  # ... the gradient is not


def test_masked_positions_change_nothing():
    torch.manual_seed(2)
    logp, old_logp = -torch.rand(2, 4), -torch.rand(2, 4)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    a = grpo.policy_loss(logp, old_logp, torch.tensor([1.0, -1.0]), mask, 5, loss_type="dapo")
    logp[0, 3], old_logp[1, 3] = -50.0, 3.0
    b = grpo.policy_loss(logp, old_logp, torch.tensor([1.0, -1.0]), mask, 5, loss_type="dapo")
    assert a == b


def test_reward_is_correctness_plus_the_format_bonus():
    correct = torch.tensor([True, False, False])
    readable = torch.tensor([True, True, False])  # the third has no final answer at all
    rewards = grpo.reward(correct, readable, format_reward=0.0097)
    assert rewards.tolist() == [torch.tensor(1.0097).item(), torch.tensor(0.0097).item(), 0.0]
    assert grpo.reward(correct, readable).tolist() == [1.0, 0.0, 0.0]


def heldout_reward(model, tokenizer, examples):
    """Mean reward of 8 samples at temperature 0.7 for each example, from a fixed seed: runs of two
    models share their random numbers, so the difference is mostly the models' and not noise."""
    torch.manual_seed(0)
    prompts = [common.chat_prompt(tokenizer, common.student_message(e)) for e in examples]
    texts = engine.generate(model, tokenizer, prompts, 64, temperature=0.7, num_samples=8)["texts"]
    return float(common.judge(texts, examples, 8).float().mean())  # grpo.py's reward, no format bonus


def test_short_toy_run_raises_the_held_out_reward(tmp_path, toy):
    base, tokenizer = toy
    examples = common.load_examples("toy", "test")[:64]
    before = heldout_reward(base, tokenizer, examples)
    out = tmp_path / "grpo"
    grpo.main(["--steps", "20", "--schedule", "constant", "--eval-n", "8", "--out", str(out)])
    trained, _ = common.load_model("toy")
    load_lora(trained, common.latest_checkpoint(out))
    after = heldout_reward(trained, tokenizer, examples)
    print(f"held-out mean reward {before:.3f} -> {after:.3f}")
    assert after > before + 0.02
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["generated_tokens"] == rows[-1]["generated_tokens"] > 0
    assert {"zero_std_fraction", "clip_fraction", "completion_length"} <= set(rows[0])


def test_each_of_mu_updates_steps_with_the_whole_gradient(tmp_path, monkeypatch):
    """--num-iterations 2: the first update, where pi_old is still pi, is the update of
    --num-iterations 1, so its gradient norm (before clipping) is the same, not half of it."""
    norms, real_step = [], common.optimizer_step

    def record(*args):
        norms.append(real_step(*args))
        return norms[-1]
    monkeypatch.setattr(common, "optimizer_step", record)
    quick = ["--steps", "1", "--batch-size", "4", "--eval-n", "4", "--max-new-tokens", "32"]
    grpo.main(quick + ["--num-iterations", "2", "--out", str(tmp_path / "mu2")])
    grpo.main(quick + ["--out", str(tmp_path / "mu1")])
    assert len(norms) == 3 and norms[0] > 0
    assert norms[0] == pytest.approx(norms[2], rel=1e-5)


def test_rows_with_zero_advantage_are_skipped_without_changing_the_gradient(tmp_path, monkeypatch):
    """With beta = 0 the rows of groups whose rewards are all equal (advantage 0) are not run through
    the model; the gradient equals that of training on every row (here: a beta so small that every
    row is trained, with the same rollouts)."""
    norms, trained_rows = [], []
    real_step, real_logprobs = common.optimizer_step, engine.token_logprobs

    def record_step(*args):
        norms.append(real_step(*args))
        return norms[-1]

    def record_rows(model, batch, *args, **kwargs):
        trained_rows[-1] += batch["completion_ids"].shape[0]
        return real_logprobs(model, batch, *args, **kwargs)
    real_reward = grpo.reward

    def first_group_unrewarded(*args):  # so at least one group has equal rewards, whatever is drawn
        rewards = real_reward(*args)
        rewards[:8] = 0
        return rewards
    monkeypatch.setattr(common, "optimizer_step", record_step)
    monkeypatch.setattr(engine, "token_logprobs", record_rows)
    monkeypatch.setattr(grpo, "reward", first_group_unrewarded)
    quick = ["--steps", "1", "--batch-size", "4", "--eval-n", "4", "--max-new-tokens", "32"]
    for name, beta in [("skipping", "0"), ("every-row", "1e-12")]:
        trained_rows.append(0)
        grpo.main(quick + ["--beta", beta, "--out", str(tmp_path / name)])
    metrics = json.loads((tmp_path / "skipping" / "metrics.jsonl").read_text().splitlines()[0])
    skipped_groups = round(metrics["zero_std_fraction"] * 4)
    assert skipped_groups > 0 and norms[0] > 0  # the case is tested: some groups have A = 0
    assert trained_rows[0] == (4 - skipped_groups) * 8
    assert trained_rows[1] == 2 * 4 * 8  # every row, with the reference model's log-probs too
    assert norms[0] == pytest.approx(norms[1], rel=1e-5)


@pytest.mark.parametrize("argv, message", [
    (["--beta", "0.04", "--full"], "--beta > 0 needs a reference model"),
    (["--temperature", "0"], "--temperature 0.0: must be positive"),
    (["--sft-mix", "adaptive", "--full"], "--sft-mix adaptive compares with the initial model"),
    (["--sft-warmup-steps", "2", "--num-iterations", "2"], "need --num-iterations 1"),
    (["--sft-probability", "0.3"], "--sft-probability is the chance of --sft-mix fixed"),
    (["--sft-mix", "fixed", "--sft-probability", "1.5"], "--sft-probability 1.5: must be in"),
    (["--garl-q", "1"], "--garl-q 1.0: must be in \\[0, 1\\)"),
    (["--chunk-size", "0"], "--chunk-size 0: must be at least 1"),
    (["--micro-batch-size", "-1"], "--micro-batch-size -1: must be at least 0"),
    (["--eval-k", "4", "--eval-temperature", "0"], "--eval-temperature 0.0: must be positive"),
])
def test_bad_combinations_fail_in_one_line_before_the_model_loads(argv, message, monkeypatch):
    monkeypatch.setattr(common, "load_model", lambda *args, **kwargs: pytest.fail("loaded"))
    with pytest.raises(common.InputError, match=message):
        grpo.main(argv + ["--out", "unused"])


def test_the_log_shows_the_gap_between_sampler_and_trainer_logprobs(tmp_path):
    """pi_old is the training pass's log-probability (detached); the sampler drew the tokens with
    its own. On a CPU in float32 the two agree up to rounding, and the log says so each step."""
    grpo.main(["--steps", "1", "--batch-size", "4", "--num-generations", "4", "--eval-n", "0",
               "--max-new-tokens", "24", "--temperature", "0.9", "--top-k", "5",
               "--out", str(tmp_path)])
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert 0 <= row["logprob_gap_mean"] <= row["logprob_gap_max"] < 1e-4


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_micro_batches_add_up_to_the_steps_loss_and_gradient(tmp_path, loss_type):
    """Every micro-batch's loss is divided by the whole step's normaliser (`loss_normaliser`), so
    a step cut into micro-batches of 5 rows has the loss and gradient of the step in one batch."""
    quick = ["--steps", "1", "--batch-size", "4", "--eval-n", "0", "--max-new-tokens", "32",
             "--loss-type", loss_type, "--num-iterations", "2"]  # mu 2: a loss far from 0
    rows = {}
    for size in ("32", "5"):
        grpo.main(quick + ["--micro-batch-size", size, "--out", str(tmp_path / size)])
        rows[size] = json.loads((tmp_path / size / "metrics.jsonl").read_text())
    assert rows["32"]["grad_norm"] > 0 and rows["32"]["reward"] == rows["5"]["reward"]
    assert rows["5"]["grad_norm"] == pytest.approx(rows["32"]["grad_norm"], rel=1e-4)
    assert rows["5"]["loss"] == pytest.approx(rows["32"]["loss"], rel=1e-4, abs=1e-7)


def test_skip_zero_std_takes_the_mean_over_the_groups_with_a_spread(tmp_path):
    """Rows of a group with equal rewards have no gradient; --skip-zero-std leaves them out of the
    mean too, so the same gradient is divided by fewer completions (loss type grpo)."""
    quick = ["--steps", "1", "--batch-size", "8", "--num-generations", "2", "--eval-n", "0",
             "--max-new-tokens", "32"]  # groups of 2: some with equal rewards
    grpo.main(quick + ["--out", str(tmp_path / "plain")])
    grpo.main(quick + ["--skip-zero-std", "--out", str(tmp_path / "skip")])
    plain, skip = (json.loads((tmp_path / name / "metrics.jsonl").read_text())
                   for name in ("plain", "skip"))
    assert 0 < plain["zero_std_fraction"] < 1 and plain["reward"] == skip["reward"]
    assert skip["grad_norm"] == pytest.approx(plain["grad_norm"] / (1 - plain["zero_std_fraction"]),
                                              rel=1e-4)


def test_the_second_of_mu_updates_compares_with_the_policy_that_sampled(tmp_path):
    """pi_old is recorded before the first update (`fixed_logprobs`): once that update has moved the
    weights, the second one's ratios differ from 1 and some are clipped, and the loss, 0 on-policy
    (each group's advantages sum to 0), is not 0. Were pi_old the policy itself, both stay 0."""
    grpo.main(["--steps", "1", "--batch-size", "4", "--eval-n", "0", "--max-new-tokens", "32",
               "--lr", "1e-2", "--num-iterations", "2", "--out", str(tmp_path)])
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert row["clip_fraction"] > 0.01 and abs(row["loss"]) > 1e-3
