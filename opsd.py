"""opsd.py: On-Policy Self-Distillation (OPSD), LoRA by default.

OPSD (Zhao et al. 2026, "Self-Distilled Reasoner", arXiv 2601.18734) trains a model with itself as
the teacher. The student sees only the problem x; the teacher is the same weights shown x *and* the
reference solution y* (privileged information). Per step:

  1. the student samples its own completion o ~ p_S(. | x)                      (on-policy)
  2. the teacher scores the same tokens: p_T(. | x, y*, o_<t) at every position t of o
  3. the student minimises the per-token divergence D(p_T || p_S)(. | o_<t) over the whole vocabulary

    L = (1/|o|) sum_t D( p_T(. | x, y*, o_<t),  p_S(. | x, o_<t) )

There is no reward and no answer checking: a dense, per-token signal instead of one bit per sample,
so one rollout per prompt is enough (GRPO needs a group of 8). By default the teacher is the frozen
initial model (LoRA disabled: no second copy), which the paper found more stable than a teacher that
moves with the student (`--teacher current`). D is the generalized JSD of `divergence`; the paper's
final setting is beta = 0, the forward KL(p_T || p_S), with each vocabulary entry of the pointwise
divergence capped at `--clip` 0.05 (its later version).

The student prompt is the one sft.py and grpo.py use; the teacher prompt is `teacher_prompt` below.

Two options from PACED (Xu et al. 2026, arXiv 2603.11178): `--paced` weights each problem by how
close the student is to solving it (`paced_weights`, which needs --num-generations >= 2 and the
answer checker OPSD otherwise does without), and `--forward-then-reverse` trains the first half of
the steps on the forward KL and the second half on the reverse KL (cover the teacher's modes, then
consolidate on them).

    python opsd.py                                                  # built-in toy model and task
    python opsd.py --model Qwen/Qwen3-1.7B --data train.jsonl
"""
import argparse
import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F

import common
import engine
from lora import lora_disabled

# Only for the built-in 1M-parameter toy model, and only for flags not given on the command line.
# clip 0: on the toy, teacher and student disagree sharply on digits and a 0.05 cap reverses the
# gradient of exactly those tokens (see `divergence` and the README): 44.4% -> 47.8% with it,
# 59.8% without (both measured when model.generate did the sampling).
TOY_SETTINGS = {"steps": 150, "batch_size": 32, "lr": 1e-3, "lora_r": 16, "lora_alpha": 32,
                "max_grad_norm": 1.0, "temperature": 0.7, "top_p": 1.0, "top_k": 0, "clip": 0.0}


def teacher_prompt(question, solution):
    """The teacher's view: the problem, the reference solution, then an instruction to solve it anew
    (after the OPSD paper's template). The toy base model was taught to read exactly this text."""
    return (f"{question}\n\nHere is a reference solution:\n{solution}\n\n"
            "After understanding the reference solution, please try to solve this problem using "
            f"your own approach below.\n{common.INSTRUCTIONS[common.answer_style(solution)]}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(parser)
    add = parser.add_argument
    add("--num-generations", type=int, default=1, help="student completions per prompt")
    add("--teacher", choices=["fixed", "current"], default="fixed",
        help="fixed: the initial model (LoRA off); current: the weights being trained")
    add("--loss", choices=["full", "sampled"], default="full",
        help="full: divergence over the vocabulary; sampled: per-token advantage on sampled tokens")
    add("--jsd-beta", type=float, default=0.0,
        help="generalized JSD weight beta: 0 forward KL(teacher||student), 1 reverse KL, 0.5 JSD "
             "(not grpo.py's --beta, a KL penalty)")
    add("--clip", type=float, default=0.05,
        help="cap on each vocabulary entry of the pointwise divergence (0: no cap)")
    add("--paced", action="store_true",
        help="PACED: weight each problem by p^alpha (1 - p)^beta, p = the student's pass rate "
             "over its --num-generations rollouts")
    add("--paced-alpha", type=float, default=None, help="PACED's alpha (with --paced, 1 if not given)")
    add("--paced-beta", type=float, default=None, help="PACED's beta (with --paced, 1 if not given)")
    add("--forward-then-reverse", action="store_true",
        help="PACED's two stages: forward KL (--jsd-beta 0) for the first half of the steps, "
             "reverse KL (1) for the second")
    # The OPSD paper's settings; both logits of the divergence are divided by the temperature.
    parser.set_defaults(lr=5e-6, max_grad_norm=0.1, temperature=1.1, top_p=0.95, top_k=20)
    args = common.parse_args(parser, argv, TOY_SETTINGS, ranges={
        "num_generations": (lambda v: v >= 1, "at least 1"),
        "jsd_beta": (lambda v: 0 <= v <= 1, "in [0, 1]: 0 forward KL, 1 reverse KL"),
        "clip": (lambda v: v >= 0, "at least 0 (0: no cap)"),
        "paced_alpha": (lambda v: v is None or v >= 0, "at least 0"),
        "paced_beta": (lambda v: v is None or v >= 0, "at least 0"),
        "temperature": (lambda v: v > 0, "positive: the student samples its completions and both "
                                         "distributions are softmax(logits / temperature)")})
    if not args.paced and (args.paced_alpha, args.paced_beta) != (None, None):
        raise common.InputError("--paced-alpha and --paced-beta are PACED's: give --paced too")
    if args.paced:
        args.paced_alpha = 1.0 if args.paced_alpha is None else args.paced_alpha
        args.paced_beta = 1.0 if args.paced_beta is None else args.paced_beta
    if args.paced and args.num_generations < 2:
        raise common.InputError("--paced needs --num-generations >= 2: a pass rate of one rollout "
                                "is 0 or 1, whose weight is 0")
    if args.forward_then_reverse and (args.jsd_beta != 0 or args.loss != "full"):
        raise common.InputError("--forward-then-reverse sets the divergence's beta itself: it "
                                "needs --jsd-beta 0 and --loss full")
    args.method = "opsd"
    args.out = args.out or "out/opsd"
    args.micro_batch_size = args.micro_batch_size or args.batch_size * args.num_generations
    return args


def pointwise_divergence(student_logits, teacher_logits, beta, temperature, clip):
    """Per-position divergence summed over the vocabulary: [..., V] logits -> [...].

    With P_T = softmax(teacher / temperature), P_S = softmax(student / temperature):
        beta = 0:      KL(P_T || P_S) = sum_v P_T (log P_T - log P_S)     "forward"
        beta = 1:      KL(P_S || P_T) = sum_v P_S (log P_S - log P_T)     "reverse"
        0 < beta < 1:  M = beta P_T + (1 - beta) P_S
                       JSD_beta = beta KL(P_T || M) + (1 - beta) KL(P_S || M)
    Forward KL is mass-covering (the student must put mass wherever the teacher does), reverse KL
    mode-seeking. JSD_beta tends to 0 as beta -> 0 or 1, so the two endpoints are *defined* as the
    plain KLs above (as in TRL's GKD): the loss is discontinuous there, on purpose.
    clip > 0 caps each vocabulary entry from above before the sum: min(entry_v, clip). An entry is
    negative where the other distribution puts more mass (forward KL: P_S(v) > P_T(v)) and is not
    capped, so with the cap the sum, and the logged loss, can fall slightly below 0.
    """
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if beta == 0:
        entries = log_p_teacher.exp() * (log_p_teacher - log_p_student)
    elif beta == 1:
        entries = log_p_student.exp() * (log_p_student - log_p_teacher)
    else:
        log_mixture = torch.logaddexp(log_p_teacher + math.log(beta),
                                      log_p_student + math.log(1 - beta))  # log M, stably
        entries = (beta * log_p_teacher.exp() * (log_p_teacher - log_mixture)
                   + (1 - beta) * log_p_student.exp() * (log_p_student - log_mixture))
    if clip > 0:
        entries = entries.clamp(max=clip)  # a capped entry passes no gradient (see `divergence`)
    return entries.sum(-1)


def paced_weights(correct, group_size, alpha=1.0, beta=1.0):
    """PACED's weight of each problem, w(p) = p^alpha (1 - p)^beta (Xu et al. 2026, arXiv
    2603.11178): [N] 0/1 correctness of the rollouts, the group_size of a problem adjacent -> [N],
    each rollout weighted by its problem's w.

    p is the student's pass rate over its rollouts of the problem. The paper shows that the
    gradient's signal-to-noise ratio vanishes at both ends: a problem the student always solves
    teaches nothing new, one it never solves gives incoherent gradients (and forgetting). The Beta
    kernel puts the weight at the frontier of its competence; alpha = beta = 1, p (1 - p), is
    the paper's choice, with no hyperparameter. Rows of weight 0 are not trained at all. The loss
    is the weighted mean over the step's tokens (`divergence`): the weights set how the step's
    problems share it, not the step's size (which AdamW mostly normalises away anyway).
    """
    pass_rate = correct.view(-1, group_size).float().mean(dim=1)  # [problems]
    return (pass_rate ** alpha * (1 - pass_rate) ** beta).repeat_interleave(group_size)


def divergence(student, student_hidden, teacher, teacher_hidden, token_weights, beta=0.0,
               temperature=1.0, clip=0.0, chunk_size=128):
    """Token mean over the completion of the full-vocabulary divergence D(P_T || P_S) (OPSD eq. for
    the full-distribution objective, arXiv 2601.18734; generalized JSD of GKD, arXiv 2306.13649):

        L = (1 / sum_t m_t) sum_t m_t D( softmax(z^T_t / T), softmax(z^S_t / T) )

    z^S_t, z^T_t: the student's and the teacher's logits at completion position t, from their final
    hidden states student_hidden, teacher_hidden [N, T, H] (`engine.completion_hidden`; position t
    predicts completion token t) through the output layers of the models `student` and `teacher`.
    token_weights m: [N, T], 1 on completion tokens (EOS included) and 0 elsewhere, or with --paced
    the row's `paced_weights` (a weighted mean). D is `pointwise_divergence` (the formulas, and
    which direction is "forward"). Gradients flow into the student only. The logits exist a chunk
    of positions at a time (`engine.compare_logits_in_chunks`), never as [N, T, V].

    The clip, and why it can hurt: a capped entry j has zero gradient of its own, but through the
    softmax the uncapped entries still push on z_j with d/dz_j = p_S(j) * P_T(uncapped) > 0, i.e.
    the student's logit of a token the teacher strongly prefers goes *down*. On real LLMs few
    entries exceed 0.05; on the toy, whose teacher and student disagree sharply on digits, many do.
    """
    mask = token_weights > 0
    per_position = engine.compare_logits_in_chunks(  # [n]: D at each weighted position
        lambda student_logits, teacher_logits: pointwise_divergence(
            student_logits, teacher_logits, beta, temperature, clip),
        student, student_hidden[mask], teacher, teacher_hidden[mask], chunk_size)
    weights = token_weights[mask].float()
    return (per_position * weights).sum() / weights.sum().clamp(min=1e-8)


def sampled_token_loss(student_logprobs, teacher_logprobs, weights):
    """The paper's cheaper ablation: only the sampled tokens y_t, as a per-token advantage.

        A_t = stopgrad(log p_T(y_t) - log p_S(y_t)),    L = -(1/sum_t m_t) sum_t m_t A_t log p_S(y_t)

    The gradient -A_t grad log p_S(y_t) is a one-sample (REINFORCE) estimate of the gradient of the
    reverse KL(p_S || p_T): tokens the teacher likes more than the student get pushed up.
    student_logprobs, teacher_logprobs, weights m: [n], the completion tokens of the micro-batch
    (m: 1, or with --paced the row's `paced_weights`).
    """
    advantages = (teacher_logprobs - student_logprobs).detach()
    return -(advantages * student_logprobs * weights).sum() / weights.sum().clamp(min=1e-8)


def divergence_beta(args, step):
    """The generalized JSD's beta at a step: --jsd-beta, or with --forward-then-reverse PACED's two
    stages (arXiv 2603.11178): the forward KL (0) for the first half of the steps, the reverse KL
    (1) for the second, to cover the teacher's modes first and consolidate on them after."""
    if args.forward_then_reverse:
        return 1.0 if step >= args.steps // 2 else 0.0
    return args.jsd_beta


def fixed_teacher(args, model):
    """The fixed teacher, the initial model: (teacher, context to score it in). With LoRA the
    student itself with LoRA switched off (no second copy); with --full a frozen copy loaded from
    --model again (not the resumed weights); with --teacher current the student as it is."""
    if args.teacher == "current":
        return model, nullcontext
    if not args.full:
        return model, lora_disabled
    teacher, _ = common.load_model(args.model, args.dtype)
    return teacher.requires_grad_(False), nullcontext


def main(argv=None):
    args = parse_args(argv)
    run = common.start_run(args)
    model, tokenizer, group_size = run.model, run.tokenizer, args.num_generations
    teacher, teacher_context = fixed_teacher(args, model)
    while run.step < args.steps:
        examples = common.next_batch(run)

        # 1. The student samples its own completions from the problem alone.
        rollouts = common.sample_rollouts(run, examples, group_size)

        # 2. The teacher's prompt shows the reference solution; the completion tokens are the same.
        student_prompts = engine.unpadded(rollouts["prompt_ids"], rollouts["prompt_mask"])
        completions = engine.unpadded(rollouts["completion_ids"], rollouts["completion_mask"])
        teacher_texts = [common.chat_prompt(tokenizer, teacher_prompt(e["question"], e["solution"]))
                         for e in examples]
        teacher_ids = tokenizer(teacher_texts, add_special_tokens=False)["input_ids"]
        teacher_prompts = [teacher_ids[i // group_size] for i in range(len(completions))]

        row_weights, metrics = torch.ones(len(completions)), {}  # [N]
        if args.paced:  # PACED: each rollout weighted by its problem's pass rate
            correct = common.judge(rollouts["texts"], examples, group_size)  # [N]
            row_weights = paced_weights(correct, group_size, args.paced_alpha, args.paced_beta)
            metrics = {"pass_rate": common.global_mean(correct.float().mean().item()),
                       "paced_weight": common.global_mean(row_weights.mean().item())}
        # The step's completion tokens, each counted with its weight, on all ranks: the normaliser.
        num_tokens = common.global_sum(float(row_weights @ rollouts["completion_mask"].sum(1).float()))
        beta = divergence_beta(args, run.step)
        trained_rows = row_weights.nonzero().flatten().tolist()  # rows of weight 0: not trained
        loss_sum, train_tokens = 0.0, 0
        for first in range(0, len(trained_rows), args.micro_batch_size):
            rows = trained_rows[first:first + args.micro_batch_size]
            student_batch = engine.pack([student_prompts[i] for i in rows],
                                        [completions[i] for i in rows], tokenizer.pad_token_id,
                                        model.device)
            teacher_batch = engine.pack([teacher_prompts[i] for i in rows],
                                        [completions[i] for i in rows], tokenizer.pad_token_id,
                                        model.device)
            with torch.no_grad(), teacher_context(teacher):  # 3. teacher: no gradient, ever
                teacher_hidden = engine.completion_hidden(teacher, teacher_batch)  # [B, T, H]
            student_hidden = engine.completion_hidden(model, student_batch)  # [B, T, H]
            completion_mask = student_batch["completion_mask"]  # [B, T]
            token_weights = row_weights[rows].to(model.device)[:, None] * completion_mask  # [B, T]
            # 4. The loss on this micro-batch is a (weighted) token mean; weight it by its share of
            # the step's tokens so the step's loss is the token mean over all of them.
            if args.loss == "full":
                loss = divergence(model, student_hidden, teacher, teacher_hidden, token_weights,
                                  beta, args.temperature, args.clip, args.chunk_size)
            else:
                mask = completion_mask.bool()
                targets = student_batch["completion_ids"][mask]
                with torch.no_grad():
                    teacher_logprobs = engine.target_logprobs(
                        teacher, teacher_hidden[mask], targets, args.temperature, args.chunk_size)
                student_logprobs = engine.target_logprobs(
                    model, student_hidden[mask], targets, args.temperature, args.chunk_size)
                loss = sampled_token_loss(student_logprobs, teacher_logprobs, token_weights[mask])
            weight = float(token_weights.sum()) / num_tokens
            (loss * weight).backward()
            loss_sum += loss.item() * weight
            train_tokens += sum(int(batch["prompt_mask"].sum() + batch["completion_mask"].sum())
                                for batch in (student_batch, teacher_batch))
        grad_norm = common.optimizer_step(run)
        common.end_step(run, {
            "loss": common.global_sum(loss_sum), **metrics,
            "completion_length": common.global_mean(
                rollouts["completion_mask"].sum(1).float().mean().item()),
            "grad_norm": grad_norm}, train_tokens)
    common.finish_run(run)


if __name__ == "__main__":
    common.run_cli(main)
