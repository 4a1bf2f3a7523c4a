"""grpo.py: Group Relative Policy Optimization (GRPO) with a verifiable reward, LoRA by default.

GRPO (Shao et al. 2024, DeepSeekMath, arXiv 2402.03300) is PPO without a value network. Per step:
sample G completions for each prompt from the current policy, reward each one 1 if its final answer
equals the reference and 0 otherwise, and use the group as its own baseline:

    A_i = (r_i - mean(r)) / (std(r) + eps)          the same advantage for every token of o_i

then maximise the clipped surrogate over completion tokens, rho_t = pi(o_t) / pi_old(o_t):

    L = -agg[ min(rho_t * A_i, clip(rho_t, 1 - eps_low, 1 + eps_high) * A_i) - beta * KL_t ]

This is GRPO as the OPSD paper (arXiv 2601.18734) ran it as its RL baseline (beta 0, one policy
update per rollout batch and the "grpo" aggregation, as TRL's defaults then), with the well-known
corrections as switches, each one call in `main()`:
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
So watch the reward and the gradient norm, not the loss. log pi is the textbook
log_softmax(logits / T)[o_t] (`common.textbook_logprobs`); `engine.token_logprobs` computes the
same a chunk of positions at a time.

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

# The shared flags' defaults that GRPO changes (the OPSD paper's GRPO baseline), and the built-in
# toy's settings: only with --model toy, and only for flags not given on the command line.
DEFAULTS = {"lr": 2e-5}
TOY_SETTINGS = {"steps": 60, "batch_size": 16, "lr": 5e-4, "lora_r": 16, "lora_alpha": 32,
                "temperature": 0.7, "max_new_tokens": 64, "eval_batch_size": 256,
                "eval_temperature": 0.7, "micro_batch_size": 0, "gradient_checkpointing": False}


# ----------------------------------------------------------------------------------------------
# GRPO's formulas


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


def k3_kl(logp, ref_logp):
    """Per-token KL(pi || pi_ref) estimate, k3 = exp(ref - logp) - (ref - logp) - 1 >= 0.

    Unbiased for samples from pi and lower variance than log(pi/pi_ref):
    http://joschu.net/blog/kl-approx.html
    """
    log_ratio = ref_logp - logp
    return torch.exp(log_ratio) - log_ratio - 1


def policy_loss(logp, old_logp, advantages, mask, normaliser, ref_logp=None, beta=0.0,
                eps_low=0.2, eps_high=0.2, loss_type="grpo"):
    """Clipped GRPO surrogate, to minimise (DeepSeekMath eq. 3; Dr. GRPO and DAPO aggregations).

    logp, old_logp, ref_logp, mask: [N, T] (mask 1 on completion tokens); advantages: [N].
        rho_t  = exp(logp_t - old_logp_t)
        l_t    = -min(rho_t * A, clip(rho_t, 1 - eps_low, 1 + eps_high) * A) + beta * k3_t
    aggregated over the step's completions o_i as
        grpo:    (1/N) sum_i (1/|o_i|) sum_t l_i,t          per-completion mean, then mean
        dr_grpo: sum_i,t l_i,t / (N * max_completion_len)   constant normaliser
        dapo:    sum_i,t l_i,t / sum_i |o_i|                token mean over the batch
    These rows may be a micro-batch of the step: `normaliser` is the step's (`loss_normaliser`),
    so the micro-batches' losses and gradients add up to the step's.
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
        return ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / normaliser
    if loss_type in ("dr_grpo", "dapo"):
        return (per_token * mask).sum() / normaliser
    raise ValueError(f"unknown loss_type {loss_type!r}")


def loss_normaliser(loss_type, num_completions, num_tokens, max_completion_len):
    """What `policy_loss` divides the step's sum by: the step's completions N (grpo), N times
    --max-new-tokens (dr_grpo) or its completion tokens (dapo); at least 1."""
    normaliser = {"grpo": num_completions, "dr_grpo": num_completions * max_completion_len,
                  "dapo": num_tokens}[loss_type]
    return max(1, normaliser)


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


# ----------------------------------------------------------------------------------------------
# The algorithm


def main(argv=None):
    args = parse_args(argv)
    run = common.start_run(args)
    model, group_size = run.model, args.num_generations
    while run.step < args.steps:
        examples = common.next_batch(run)
        mixing, sft_tokens = sft_mix_step(run, examples)  # --sft-warmup-steps, --sft-mix
        if mixing.get("update") == "sft":
            continue  # an SFT step on the reference solutions, taken and logged by sft_mix_step

        # 1. Rollouts: G samples per prompt from the current policy, one batched call.
        prompts = common.student_prompts(run.tokenizer, examples)
        rollouts = common.sample_rollouts(run, model, prompts, group_size)

        # 2. Rewards and group-relative advantages; the loss's normaliser counts the whole step.
        rewards, advantages = rewards_and_advantages(rollouts, examples, args)  # [N], [N]
        kept = kept_rows(args, rewards)  # every row, unless --skip-zero-std drops some
        kept_tokens = common.global_sum(sum(len(rollouts["completions"][i]) for i in kept))
        normaliser = loss_normaliser(args.loss_type, common.global_sum(len(kept)), kept_tokens,
                                     args.max_new_tokens)

        # 3. The training batches: prompt + completion, each prompt run once for its rows.
        batches = common.training_batches(rollouts["prompts"], rollouts["completions"],
                                          rows_to_train(args, kept, advantages),
                                          args.micro_batch_size, run.tokenizer, model.device)
        old_logps, ref_logps = fixed_logprobs(run, batches)  # pi_old (mu > 1), pi_ref (beta > 0)

        # 4. mu policy updates on the same rollouts, each with the whole step's gradient.
        totals, gap = dict.fromkeys(["loss", "clipped", "kl", "entropy", "tokens"], 0.0), ([], [])
        for iteration in range(args.num_iterations):
            for b, (indices, batch) in enumerate(batches):
                logp, entropy = engine.token_logprobs(model, batch, args.temperature,
                                                      args.chunk_size, entropy=True)  # [B, T]
                old_logp = old_logps[b] if old_logps else logp.detach()  # mu = 1: rho = 1
                ref_logp = ref_logps[b] if ref_logps else None
                loss = policy_loss(logp, old_logp, advantages[indices].to(model.device),
                                   batch["completion_mask"], normaliser, ref_logp, args.beta,
                                   args.epsilon_low, args.epsilon_high, args.loss_type)
                loss.backward()  # the micro-batches' gradients add up to the step's
                add_monitors(totals, loss, logp, entropy, old_logp, ref_logp, batch, args)
                if iteration == 0:  # the policy that sampled: the sampler/trainer gap
                    common.add_logprob_gap(gap, rollouts, indices,
                                           logp[batch["completion_mask"].bool()])
            grad_norm = common.optimizer_step(run)

        train_tokens = sum(common.batch_tokens(batch) for _, batch in batches) * args.num_iterations
        metrics, stalled = step_metrics(args, rollouts, rewards, kept_tokens, totals, gap)
        common.end_step(run, {**mixing, **metrics, "grad_norm": grad_norm},
                        train_tokens + sft_tokens, stalled)
    common.finish_run(run)


# ----------------------------------------------------------------------------------------------
# The variants and the step's bookkeeping


def kept_rows(args, rewards):
    """The rows of the step's loss: every row, or with --skip-zero-std those of groups whose
    rewards differ (equal rewards: advantage 0 and no gradient, so they only dilute the mean)."""
    if not args.skip_zero_std:
        return list(range(len(rewards)))
    spread = rewards.view(-1, args.num_generations).std(dim=1) > 0  # [prompts]
    return spread.repeat_interleave(args.num_generations).nonzero().flatten().tolist()


def rows_to_train(args, kept, advantages):
    """The kept rows whose forward and backward passes run. With beta = 0 a row whose advantage is
    0 has a zero gradient (its surrogate is 0 whatever the ratio), so it is skipped; the normaliser
    still counts it, so the gradient is the same. If that leaves no row the kept rows are trained
    anyway: AdamW must see a zero gradient, not none."""
    if args.beta > 0:
        return kept
    return [i for i in kept if advantages[i] != 0] or kept


def fixed_logprobs(run, batches):
    """The log-probabilities that stay fixed through a step's updates, without gradient, [B, T]
    per batch: pi_old's when the rollouts are reused (--num-iterations > 1; with 1, pi_old is the
    policy itself, detached, in the loop) and the reference model's when --beta > 0 (LoRA off: the
    base model is the reference, no second copy). Each list is empty when it is not needed. All are
    log-probabilities of the policy that sampled: softmax(logits / temperature), as in TRL (at
    temperature 1 instead, E[grad log pi] over the samples is not 0: a bias)."""
    args, model = run.args, run.model
    old_logps, ref_logps = [], []
    with torch.no_grad():
        for _, batch in batches:
            if args.num_iterations > 1:
                old_logps.append(engine.token_logprobs(model, batch, args.temperature,
                                                       args.chunk_size))
            if args.beta > 0:
                with lora_disabled(model):
                    ref_logps.append(engine.token_logprobs(model, batch, args.temperature,
                                                           args.chunk_size))
    return old_logps, ref_logps


def add_monitors(totals, loss, logp, entropy, old_logp, ref_logp, batch, args):
    """Add a micro-batch's loss (a mean over the --num-iterations updates), clipped tokens, k3 KL
    sum and the policy's entropy summed over its tokens to the step's totals."""
    totals["loss"] += loss.item() / args.num_iterations
    with torch.no_grad():
        mask = batch["completion_mask"].bool()
        totals["entropy"] += float(entropy[mask].sum())
        totals["tokens"] += int(mask.sum())
        ratio = torch.exp(logp - old_logp)[mask]
        totals["clipped"] += float(((ratio < 1 - args.epsilon_low) |
                                    (ratio > 1 + args.epsilon_high)).sum())
        if ref_logp is not None:
            totals["kl"] += float(k3_kl(logp, ref_logp)[mask].sum())


def step_metrics(args, rollouts, rewards, kept_tokens, totals, gap):
    """The step's log, and why nothing trains when every group's rewards are equal (else None):
    the mean reward, its spread within groups (their mean standard deviation: advantages need it)
    and the share of groups without any, the completions' length and truncated share, the policy's
    entropy (over the trained rows: with beta 0, the groups with a spread), the clipped share of
    the kept tokens (and the KL to the reference), the gap, the loss."""
    group_size = args.num_generations
    scored_tokens = max(1, kept_tokens * args.num_iterations)  # kept_tokens: of all ranks
    group_std = rewards.view(-1, group_size).std(dim=1)  # [prompts]
    metrics = {"reward": common.global_mean(rewards.mean().item()),
               "reward_std": common.global_mean(group_std.mean().item()),
               "zero_std_fraction": common.global_mean((group_std == 0).float().mean().item()),
               **common.rollout_health(rollouts),
               "entropy": common.global_sum(totals["entropy"]) /
               max(1, common.global_sum(totals["tokens"])),
               "clip_fraction": common.global_sum(totals["clipped"]) / scored_tokens,
               **({"kl": common.global_sum(totals["kl"]) / scored_tokens} if args.beta > 0 else {}),
               **common.logprob_gap(*gap), "loss": common.global_sum(totals["loss"])}
    stalled = None if metrics["zero_std_fraction"] < 1 or args.beta > 0 else (
        "every group's rewards are equal (all right or all wrong), so every advantage is 0: give "
        "problems this model solves sometimes, or raise --num-generations or --temperature, or "
        "add --format-reward")
    return metrics, stalled


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
    if it is, the step itself. The first --sft-warmup-steps steps are SFT; after them each step is
    SFT with --sft-probability (fixed) or `sft_probability` (adaptive, which needs the SFT gradient
    and the initial model's NLL at every step, so a GRPO step measures them too, then discards the
    gradient). The draw is the same on every rank and on resume: seeded by the seed and the step.
    Returns (metrics for the log, with "update": "sft" or "grpo"; this rank's training tokens);
    ({}, 0) without a mix.
    """
    args, model, step = run.args, run.model, run.step
    if step >= args.sft_warmup_steps and args.sft_mix == "none":
        return {}, 0
    warmup = step < args.sft_warmup_steps
    adaptive = not warmup and args.sft_mix == "adaptive"
    draw = random.Random(f"sft-or-grpo {args.seed} {step}").random()
    probability = 1.0 if warmup else None if adaptive else args.sft_probability
    metrics, train_tokens = {}, 0
    if adaptive or draw < probability:  # the SFT gradient is needed: compute it
        rows = [sft.encode(run.tokenizer, example, args.max_new_tokens) for example in examples]
        nll, train_tokens = sft.sft_gradient(run, rows)
        grad_norm = sum(float(p.grad.norm()) ** 2 for p in model.parameters() if p.grad is not None)
        grad_norm = common.global_mean(grad_norm ** 0.5)  # under torchrun: the ranks' mean
        run.state.setdefault("first_sft_grad_norm", grad_norm)  # kept in checkpoints
        metrics = {"sft_loss": nll, "sft_grad_norm": grad_norm}
        if adaptive:
            initial_nll, initial_tokens = initial_model_nll(run, rows)
            train_tokens += initial_tokens
            probability = sft_probability(nll, initial_nll, grad_norm,
                                          run.state["first_sft_grad_norm"])
            metrics["sft_initial_loss"] = initial_nll
    metrics = {"update": "sft" if draw < probability else "grpo", "sft_probability": probability,
               **metrics}
    if metrics["update"] == "sft":
        grad_norm = common.optimizer_step(run)
        common.end_step(run, {**metrics, "grad_norm": grad_norm}, train_tokens)
    else:
        run.optimizer.zero_grad(set_to_none=True)  # an SFT gradient was only measured
    return metrics, train_tokens


def initial_model_nll(run, rows):
    """sft.py's loss on the reference rows under the initial model (LoRA off), without gradient:
    (the NLL summed over ranks, this rank's training tokens)."""
    nll, train_tokens = 0.0, 0
    num_target_tokens = common.global_sum(sum(len(completion) for _, completion in rows))
    with torch.no_grad(), lora_disabled(run.model):
        for batch in sft.sft_batches(rows, run.args.micro_batch_size, run.tokenizer,
                                     run.model.device):
            logprobs = engine.token_logprobs(run.model, batch, chunk_size=run.args.chunk_size)
            nll += sft.sft_loss(logprobs, batch["completion_mask"], num_target_tokens).item()
            train_tokens += common.batch_tokens(batch)
    return common.global_sum(nll), train_tokens


# ----------------------------------------------------------------------------------------------
# The command line


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
    args = common.parse_args(parser, argv, DEFAULTS, TOY_SETTINGS, ranges={
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
    args.method, args.updates_per_step = "grpo", args.num_iterations
    args.out = args.out or "out/grpo"
    args.micro_batch_size = args.micro_batch_size or args.batch_size * args.num_generations
    return args


if __name__ == "__main__":
    common.run_cli(main)
