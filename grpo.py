"""grpo.py: Group Relative Policy Optimization (GRPO) with a verifiable reward, LoRA by default.

GRPO (Shao et al. 2024, DeepSeekMath, arXiv 2402.03300) is PPO without a value network. Per step:
sample G completions for each prompt from the current policy, reward each one 1 if its final answer
equals the reference and 0 otherwise, and use the group as its own baseline:

    A_i = (r_i - mean(r)) / (std(r) + eps)          the same advantage for every token of o_i

then maximise the clipped surrogate over completion tokens, rho_t = pi(o_t) / pi_old(o_t):

    L = -agg[ min(rho_t * A_i, clip(rho_t, 1 - eps_low, 1 + eps_high) * A_i) - beta * KL_t ]

This is GRPO as the OPSD paper (arXiv 2601.18734) ran it as its RL baseline (beta 0 and one policy
update per rollout batch, as TRL's defaults; the "grpo" aggregation, which TRL 1.16 no longer
defaults to: its default is "dapo"), with the well-known corrections as switches:
- `--scale-rewards none` (Dr. GRPO, arXiv 2503.20783): no division by the group's std, which
  over-weights groups that are almost all right or all wrong.
- `--loss-type` chooses how token terms are averaged (see `policy_loss`): `grpo` divides each
  completion by its own length, so a long wrong answer is penalised less per token than a short one
  and wrong answers drift longer; `dr_grpo` divides by the constant N * max_completion_len; `dapo`
  (arXiv 2503.14476) by the batch's token count. The last two have no length bias.
- `--epsilon-high` above `--epsilon-low` is DAPO's "clip-higher"; `--skip-zero-std` drops groups whose
  rewards are all equal (their advantage is 0, they give no gradient anyway, only dilute the mean).
- `--garl-q` (GARL, arXiv 2604.25907) multiplies each problem's advantages by its group's success
  rate^-q, amplifying the problems the model rarely solves (`cold_start_amplification`).
- `--sft-warmup-steps W --sft-mix fixed|adaptive` mixes in sft.py's loss on the reference
  solutions: W steps of SFT, then at each step SFT or GRPO, at a fixed rate or by a rule in the
  spirit of SASR (arXiv 2505.13026; see `sft_probability`).
With `--num-iterations 1` (default) pi_old is pi itself, detached: rho = 1, the clip never acts and the
loss *value* is ~0 when beta = 0, while its gradient is the REINFORCE gradient with a group baseline.
So watch the reward and the gradient norm, not the loss.

    python grpo.py                                                  # built-in toy model and task
    python grpo.py --model Qwen/Qwen3-1.7B --data train.jsonl --lr 2e-5 --temperature 1.2
"""
import argparse
import math
import random

import torch

import common
import engine
import sft
from lora import lora_disabled

# Only for the built-in 1M-parameter toy model, and only for flags not given on the command line.
# (A prototype with lr 2e-3 and temperature 1.0 collapsed: reward 0 within 75 steps.)
TOY_SETTINGS = {"steps": 60, "batch_size": 16, "lr": 5e-4, "lora_r": 16, "lora_alpha": 32,
                "temperature": 0.7}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(parser)
    add = parser.add_argument
    add("--num-generations", type=int, default=8, help="completions per prompt (group size G)")
    add("--scale-rewards", choices=["group", "none"], default="group",
        help="group: divide each advantage by its group's reward std; none: do not (Dr. GRPO)")
    add("--skip-zero-std", action="store_true", help="drop groups whose rewards are all equal")
    add("--loss-type", choices=["grpo", "dr_grpo", "dapo"], default="grpo",
        help="averaging: grpo, per completion then over completions; dr_grpo, over "
             "completions x --max-new-tokens; dapo, over all tokens of the step")
    add("--num-iterations", type=int, default=1,
        help="optimizer updates per batch of rollouts (mu); --steps counts rollout batches")
    add("--beta", type=float, default=0.0, help="KL penalty to the base model (k3 estimator)")
    add("--epsilon-low", type=float, default=0.2, help="PPO clip: ratio >= 1 - epsilon-low")
    add("--epsilon-high", type=float, default=0.2, help="PPO clip: ratio <= 1 + epsilon-high")
    add("--format-reward", type=float, default=0.0,
        help="extra reward for a completion with a parsable final answer (0: off)")
    add("--sft-warmup-steps", type=int, default=0,
        help="the first N steps are SFT on the reference solutions (sft.py's loss), not GRPO")
    add("--sft-mix", choices=["none", "fixed", "adaptive"], default="none",
        help="after the warm-up, each step SFT or GRPO: fixed, SFT with --sft-probability; "
             "adaptive, the SASR-inspired rule of sft_probability")
    add("--sft-probability", type=float, default=None,
        help="--sft-mix fixed's chance of SFT at each step (with it, 0.5 if not given)")
    add("--garl-q", type=float, default=0.0,
        help="GARL's cold-start amplification: scale each problem's policy gradient by (its "
             "group's success rate)^-q (0: plain GRPO)")
    parser.set_defaults(lr=2e-5)  # the OPSD paper's GRPO baseline
    args = common.parse_args(parser, argv, TOY_SETTINGS, ranges={
        "num_generations": (lambda v: v >= 2, "at least 2: advantages compare a group's rewards"),
        "num_iterations": (lambda v: v >= 1, "at least 1"),
        "beta": (lambda v: v >= 0, "at least 0"),
        "epsilon_low": (lambda v: 0 <= v < 1, "in [0, 1)"),
        "epsilon_high": (lambda v: v >= 0, "at least 0"),
        "garl_q": (lambda v: 0 <= v < 1, "in [0, 1): 0 is plain GRPO"),
        "sft_warmup_steps": (lambda v: v >= 0, "at least 0"),
        "sft_probability": (lambda v: v is None or 0 <= v <= 1, "in [0, 1]"),
        "temperature": (lambda v: v > 0, "positive: GRPO samples its rollouts")})
    if args.beta > 0 and args.full:
        raise common.InputError("--beta > 0 needs a reference model: use LoRA (the base is the "
                                "reference), not --full")
    if args.sft_mix == "adaptive" and args.full:
        raise common.InputError("--sft-mix adaptive compares with the initial model: use LoRA (the "
                                "base is the initial model), not --full")
    if args.sft_probability is not None and args.sft_mix != "fixed":
        raise common.InputError("--sft-probability is the chance of --sft-mix fixed: give that too")
    if args.sft_mix == "fixed" and args.sft_probability is None:
        args.sft_probability = 0.5
    if (args.sft_warmup_steps or args.sft_mix != "none") and args.num_iterations > 1:
        raise common.InputError("--sft-warmup-steps and --sft-mix take one update a step: they "
                                "need --num-iterations 1")
    args.method = "grpo"
    args.out = args.out or "out/grpo"
    args.micro_batch_size = args.micro_batch_size or args.batch_size * args.num_generations
    return args


def group_advantages(rewards, group_size, scale=True, eps=1e-4):
    """A_i = (r_i - mean_group(r)) / (std_group(r) + eps), or r_i - mean_group(r) if not scale.

    rewards [N] with the G completions of a prompt adjacent (N = prompts * G); returns [N].
    std is the unbiased sample std, as in TRL. Groups with equal rewards get A = 0.
    """
    grouped = rewards.view(-1, group_size)  # [prompts, G]
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        advantages = advantages / (grouped.std(dim=1, keepdim=True) + eps)
    return advantages.flatten()


def cold_start_amplification(successes, group_size, q):
    """GARL's per-problem factor p^(-q), p = the group's success rate: [N] 0/1 -> [N].

    "How Fast Should a Model Commit to Supervision?" (arXiv 2604.25907) maximises the Tsallis
    q-logarithm of the success probability P instead of P itself:
        J_q = ln_q(P) = (P^(1-q) - 1) / (1 - q),      grad J_q = P^(-q) * grad P
    q = 0 is plain RL (maximise P); q -> 1 is log P, the likelihood of success. Every problem keeps
    its gradient direction and is amplified by P^(-q): a problem the model rarely solves gets a
    large factor, which is how the paper escapes a "cold start", where plain GRPO learns in
    O(1/p0) time. GARL ("gradient-amplified RL") estimates P by the group's success rate
    (biased by O(q / (G P^(q+1)))). A group with no success gets 1, not infinity (its advantages
    are 0, unless --format-reward spreads them).
    """
    success_rate = successes.view(-1, group_size).float().mean(dim=1)  # [prompts]
    factor = torch.where(success_rate > 0, success_rate.clamp(min=1e-8) ** -q, 1.0)
    return factor.repeat_interleave(group_size)  # [N]


def sft_probability(nll, initial_nll, grad_norm, first_grad_norm):
    """The chance that a step after the SFT warm-up is an SFT step rather than a GRPO step, by
    --sft-mix adaptive's rule (--sft-mix fixed: --sft-probability at every step).

    SASR (Chen et al. 2025, arXiv 2505.13026) warms up with SFT, then chooses between SFT and GRPO
    at each step from the gradient norm and the divergence from the initial model; its exact rule
    is not published. This rule is ours, SASR-inspired. On the step's reference solutions y*:

        r_grad = ||g_SFT|| / ||g_SFT,1||          the SFT gradient's norm, relative to the run's first
        r_div  = exp(NLL(y*) - NLL_initial(y*))   > 1 when the model explains y* worse than at the start
        P(SFT) = r_grad r_div / (1 + r_grad r_div)

    NLL is the token-mean negative log-likelihood of y* under the current and the initial model
    (LoRA off). Both ratios are 1 at the start: P = 1/2. Once the model fits the references (a
    small SFT gradient, a lower NLL) P falls and GRPO takes over; when RL moves the model away
    from them P rises towards 1 and SFT pulls it back. It needs the SFT forward and backward pass
    at every step, GRPO steps included (`sft_mix_step`).
    """
    odds = grad_norm / first_grad_norm * math.exp(nll - initial_nll)
    return odds / (1 + odds)


def sft_mix_step(run, examples):
    """With --sft-warmup-steps / --sft-mix: whether this step is an SFT step on the references, and
    the SFT gradient if it is. The first --sft-warmup-steps steps are SFT; after them each step is
    SFT with --sft-probability (fixed) or `sft_probability` (adaptive, which needs the SFT gradient
    and the initial model's NLL at every step, so a GRPO step measures them too, then discards the
    gradient). The draw is the same on every rank and on resume: seeded by the seed and the step.
    Returns (metrics for the log, with "update": "sft" or "grpo"; this rank's training tokens).
    """
    args, model, step = run.args, run.model, run.step
    warmup = step < args.sft_warmup_steps
    adaptive = not warmup and args.sft_mix == "adaptive"
    draw = random.Random(f"sft-or-grpo {args.seed} {step}").random()
    probability = 1.0 if warmup else None if adaptive else args.sft_probability
    metrics, train_tokens = {}, 0
    if adaptive or draw < probability:  # the SFT gradient is needed: compute it
        rows = [sft.encode(run.tokenizer, example, args.max_new_tokens) for example in examples]
        nll, train_tokens, _ = sft.sft_gradient(model, run.tokenizer.pad_token_id, rows,
                                                args.micro_batch_size, args.chunk_size)
        grad_norm = sum(float(p.grad.norm()) ** 2 for p in model.parameters() if p.grad is not None)
        grad_norm = common.global_mean(grad_norm ** 0.5)  # under torchrun: the ranks' mean
        run.state.setdefault("first_sft_grad_norm", grad_norm)  # kept in checkpoints
        metrics = {"sft_loss": nll, "sft_grad_norm": grad_norm}
        if adaptive:
            with torch.no_grad(), lora_disabled(model):
                initial_nll, initial_tokens, _ = sft.sft_gradient(
                    model, run.tokenizer.pad_token_id, rows, args.micro_batch_size, args.chunk_size)
            train_tokens += initial_tokens
            probability = sft_probability(nll, initial_nll, grad_norm,
                                          run.state["first_sft_grad_norm"])
            metrics["sft_initial_loss"] = initial_nll
    update = "sft" if draw < probability else "grpo"
    if update == "grpo":
        run.optimizer.zero_grad(set_to_none=True)  # an SFT gradient was only measured
    return {"update": update, "sft_probability": probability, **metrics}, train_tokens


def k3_kl(logp, ref_logp):
    """Per-token KL(pi || pi_ref) estimate, k3 = exp(ref - logp) - (ref - logp) - 1 >= 0.

    Unbiased for samples from pi and lower variance than log(pi/pi_ref):
    http://joschu.net/blog/kl-approx.html
    """
    log_ratio = ref_logp - logp
    return torch.exp(log_ratio) - log_ratio - 1


def policy_loss(logp, old_logp, advantages, mask, ref_logp=None, beta=0.0, eps_low=0.2,
                eps_high=0.2, loss_type="grpo", max_completion_len=None):
    """Clipped GRPO surrogate, to minimise (DeepSeekMath eq. 3; Dr. GRPO and DAPO aggregations).

    logp, old_logp, ref_logp, mask: [N, T] (mask 1 on completion tokens); advantages: [N].
        rho_t  = exp(logp_t - old_logp_t)
        l_t    = -min(rho_t * A, clip(rho_t, 1 - eps_low, 1 + eps_high) * A) + beta * k3_t
    aggregated as
        grpo:    (1/N) sum_i (1/|o_i|) sum_t l_i,t          per-completion mean, then mean
        dr_grpo: sum_i,t l_i,t / (N * max_completion_len)   constant normaliser
        dapo:    sum_i,t l_i,t / sum_i |o_i|                token mean over the batch
    """
    mask = mask.float()
    ratio = torch.exp(logp - old_logp)
    advantages = advantages[:, None]
    surrogate = torch.min(ratio * advantages,
                          torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * advantages)
    per_token = -surrogate
    if beta > 0:
        per_token = per_token + beta * k3_kl(logp, ref_logp)
    if loss_type == "grpo":
        return ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    if loss_type == "dr_grpo":
        return (per_token * mask).sum() / (mask.shape[0] * max_completion_len)
    if loss_type == "dapo":
        return (per_token * mask).sum() / mask.sum().clamp(min=1)
    raise ValueError(f"unknown loss_type {loss_type!r}")


def reward(correct, readable, format_reward=0.0):
    """1 if the completion's final answer equals the reference (the OPSD paper's reward), else 0;
    plus `format_reward` when a final answer could be read at all. [N] bool tensors -> [N]."""
    return (correct.double() + format_reward * readable.double()).float()


def rewards_and_advantages(rollouts, examples, args):
    """The step's rewards [N] and advantages [N]: group-relative (`group_advantages`), and with
    --garl-q amplified by each problem's success rate (`cold_start_amplification`)."""
    group_size = args.num_generations
    correct = common.judge(rollouts["texts"], examples, group_size)  # [N]
    readable = torch.tensor([common.extract_answer(text) is not None for text in rollouts["texts"]],
                            device="cpu")  # rewards and advantages: [N] numbers, on the CPU
    rewards = reward(correct, readable, args.format_reward)
    advantages = group_advantages(rewards, group_size, scale=args.scale_rewards == "group")
    if args.garl_q > 0:
        advantages = advantages * cold_start_amplification(correct, group_size, args.garl_q)
    return rewards, advantages


def main(argv=None):
    args = parse_args(argv)
    run = common.start_run(args, updates_per_step=args.num_iterations)
    model, group_size = run.model, args.num_generations
    while run.step < args.steps:
        examples = common.next_batch(run)
        mixing, sft_tokens = {}, 0
        if run.step < args.sft_warmup_steps or args.sft_mix != "none":  # an SFT step, or GRPO
            mixing, sft_tokens = sft_mix_step(run, examples)
            if mixing["update"] == "sft":
                grad_norm = common.optimizer_step(run)
                common.end_step(run, {**mixing, "grad_norm": grad_norm}, sft_tokens)
                continue

        # 1. Rollouts: G samples per prompt from the current policy, one batched call.
        rollouts = common.sample_rollouts(run, examples, group_size)

        # 2. Rewards and group-relative advantages.
        rewards, advantages = rewards_and_advantages(rollouts, examples, args)  # [N], [N]
        zero_std = rewards.view(-1, group_size).std(dim=1) == 0  # [prompts]: A = 0, no gradient
        keep = (~zero_std.repeat_interleave(group_size) if args.skip_zero_std
                else torch.ones_like(rewards, dtype=torch.bool))

        # Rows and tokens of the step on all ranks (under torchrun): the normalisers of the loss.
        num_rows = common.global_sum(int(keep.sum()))
        num_tokens = common.global_sum(int(rollouts["completion_mask"].sum(1)[keep].sum()))
        # With beta = 0 a row whose advantage is 0 has a zero gradient (its surrogate is 0 whatever
        # the ratio), so its forward and backward passes are skipped; the normalisers above still
        # count it, so the gradient is the same. (If that leaves no row, train the kept rows anyway:
        # AdamW must see a zero gradient, not none.)
        trained = keep & (advantages != 0) if args.beta == 0 else keep
        trained = trained if trained.any() else keep

        # 3. Training rows: prompt without its left padding + completion up to its EOS. A micro-
        # batch runs each of its prompts once, for all its rows (`engine.pack`).
        prompt_rows = engine.unpadded(rollouts["prompt_ids"], rollouts["prompt_mask"])
        completion_rows = engine.unpadded(rollouts["completion_ids"], rollouts["completion_mask"])
        rows_trained = trained.nonzero().flatten().tolist()
        micro_batches = [rows_trained[i:i + args.micro_batch_size]
                         for i in range(0, len(rows_trained), args.micro_batch_size)]
        packed = [engine.pack([prompt_rows[i] for i in rows], [completion_rows[i] for i in rows],
                              run.tokenizer.pad_token_id, model.device) for rows in micro_batches]

        # 4. pi_old: recorded once when the rollouts are reused (mu > 1); else logp.detach() below.
        # All log-probs are those of the policy that sampled: softmax(logits / temperature), as in
        # TRL. (At temperature 1 instead, E[grad log pi] over the samples is not 0: a bias.)
        def logprobs(batch):  # [B, T]
            return engine.token_logprobs(model, batch, args.temperature, args.chunk_size)

        old_logps, ref_logps = [], []
        with torch.no_grad():
            for batch in packed:
                if args.num_iterations > 1:
                    old_logps.append(logprobs(batch))
                if args.beta > 0:
                    with lora_disabled(model):  # the reference is the base model: no second copy
                        ref_logps.append(logprobs(batch))

        # 5. mu policy updates on the same rollouts.
        loss_sum, clipped, kl_sum = 0.0, 0.0, 0.0
        sampler_logprobs, trainer_logprobs = [], []  # the first update's: the sampled policy's
        for iteration in range(args.num_iterations):
            for b, (rows, batch) in enumerate(zip(micro_batches, packed)):
                logp, completion_mask = logprobs(batch), batch["completion_mask"]  # [B, T]
                if iteration == 0:
                    mask = completion_mask.bool()
                    sampler_logprobs.append(rollouts["logprobs"][rows, :mask.shape[1]][mask])
                    trainer_logprobs.append(logp.detach()[mask])
                old_logp = old_logps[b] if old_logps else logp.detach()
                ref_logp = ref_logps[b] if ref_logps else None
                loss = policy_loss(logp, old_logp, advantages[rows].to(model.device),
                                   completion_mask, ref_logp, args.beta, args.epsilon_low,
                                   args.epsilon_high, args.loss_type, args.max_new_tokens)
                # Each micro-batch's loss is a mean over its own rows (or tokens); weight it so
                # the step's loss is the mean over all of them.
                weight = (int(completion_mask.sum()) / num_tokens if args.loss_type == "dapo"
                          else len(rows) / num_rows)
                (loss * weight).backward()  # one update per iteration: its full gradient
                loss_sum += loss.item() * weight / args.num_iterations  # logged: the mean over mu
                with torch.no_grad():
                    mask = completion_mask.bool()
                    ratio = torch.exp(logp - old_logp)[mask]
                    clipped += float(((ratio < 1 - args.epsilon_low) |
                                      (ratio > 1 + args.epsilon_high)).sum())
                    if ref_logp is not None:
                        kl_sum += float(k3_kl(logp, ref_logp)[mask].sum())
            # With no kept rows (all groups dropped by --skip-zero-std) there are no gradients:
            # AdamW skips the parameters and only the schedule advances.
            grad_norm = common.optimizer_step(run)

        train_tokens = sum(int(batch["prompt_mask"].sum() + batch["completion_mask"].sum())
                           for batch in packed) * args.num_iterations  # each distinct prompt once
        scored_tokens = max(1, num_tokens * args.num_iterations)
        common.end_step(run, {
            **mixing, "reward": common.global_mean(rewards.mean().item()),
            "zero_std_fraction": common.global_mean(zero_std.float().mean().item()),
            "completion_length": common.global_mean(
                rollouts["completion_mask"].sum(1).float().mean().item()),
            "clip_fraction": common.global_sum(clipped) / scored_tokens,
            **({"kl": common.global_sum(kl_sum) / scored_tokens} if args.beta > 0 else {}),
            **common.logprob_gap(sampler_logprobs, trainer_logprobs),
            "loss": common.global_sum(loss_sum), "grad_norm": grad_norm}, train_tokens + sft_tokens)
    common.finish_run(run)


if __name__ == "__main__":
    common.run_cli(main)
