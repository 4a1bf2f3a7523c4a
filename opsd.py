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
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

import common
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


def divergence(student_hidden, teacher_hidden, token_weights, student_output, teacher_output,
               student_parameters, beta=0.0, temperature=1.0, clip=0.0, chunk_size=128):
    """Token mean over the completion of the full-vocabulary divergence D(P_T || P_S) (OPSD eq. for
    the full-distribution objective, arXiv 2601.18734; generalized JSD of GKD, arXiv 2306.13649):

        L = (1 / sum_t m_t) sum_t m_t D( softmax(W_T h^T_t / T), softmax(W_S h^S_t / T) )

    student_hidden, teacher_hidden: [N, T, H] final hidden states (`common.completion_hidden`), aligned so
    position t predicts completion token t; token_weights m: [N, T], 1 on completion tokens (EOS
    included) and 0 elsewhere, or with --paced the row's `paced_weights` (a weighted mean).
    student_output, teacher_output: their output layers, hidden -> logits (`common.output_logits`;
    the identity if the inputs are logits already); student_parameters: the parameters of
    student_output, which get their gradient if they train. See `pointwise_divergence` for the formulas and
    which direction is "forward". Gradients flow into the student only.

    Memory: logits exist only for `chunk_size` completion positions at a time, student and teacher
    together (`common.chunked`, the fused linear JSD of Liger-Kernel): never [N, T, V], which with
    Qwen3's V = 151,936 is 620 MB per 1024 positions in float32.

    The clip, and why it can hurt: a capped entry j has zero gradient of its own, but through the
    softmax the uncapped entries still push on z_j with d/dz_j = p_S(j) * P_T(uncapped) > 0, i.e.
    the student's logit of a token the teacher strongly prefers goes *down*. On real LLMs few
    entries exceed 0.05; on the toy, whose teacher and student disagree sharply on digits, many do.
    """
    def chunk_divergence(student_chunk, teacher_chunk):  # [c, H] each -> [c]
        with torch.no_grad():
            teacher_logits = teacher_output(teacher_chunk)  # a target, never trained
        return pointwise_divergence(student_output(student_chunk), teacher_logits, beta,
                                    temperature, clip)
    mask = token_weights > 0
    per_position = common.chunked(chunk_divergence,
                                  [student_hidden[mask], teacher_hidden[mask].detach()],
                                  chunk_size, student_parameters)
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


def main(argv=None):
    args = parse_args(argv)
    model, tokenizer, train_examples, eval_examples, optimizer, scheduler, step, state = \
        common.start_run(args)
    metrics_file = common.open_metrics(args.out, step)
    device = common.device_of(model)
    # The fixed teacher is the initial model: LoRA switched off, or with --full a frozen copy
    # loaded from --model again (not the resumed weights).
    if args.teacher == "fixed" and args.full:
        teacher, _ = common.load_model(args.model, args.dtype)
        teacher.requires_grad_(False)
    else:
        teacher = model
    teacher_context = lora_disabled if (args.teacher == "fixed" and not args.full) else nullcontext
    model.train()
    loop_start, first_step, wall_before = time.time(), step, state["wall_seconds"]
    while step < args.steps:
        step_start = time.time()
        examples = common.next_batch(train_examples, args, state)

        # 1. The student samples its own completions from the problem alone.
        rollouts = common.sample_rollouts(model, tokenizer, examples, args, state)

        # 2. The teacher's prompt shows the reference solution; the completion tokens are the same.
        student_prompts = common.unpadded(rollouts["prompt_ids"], rollouts["prompt_mask"])
        completions = common.unpadded(rollouts["completion_ids"], rollouts["completion_mask"])
        num_rows = len(completions)
        teacher_texts = [common.chat_prompt(tokenizer, teacher_prompt(e["question"], e["solution"]))
                         for e in examples]
        teacher_ids = tokenizer(teacher_texts, add_special_tokens=False)["input_ids"]
        teacher_prompts = [teacher_ids[i // args.num_generations] for i in range(num_rows)]

        # PACED: each rollout weighted by its problem's pass rate; rows of weight 0 not trained.
        row_weights = torch.ones(num_rows)  # [N]
        if args.paced:
            correct = torch.tensor([common.is_correct(text, examples[i // args.num_generations]
                                                      ["answer"])
                                    for i, text in enumerate(rollouts["texts"])])  # [N]
            row_weights = paced_weights(correct, args.num_generations, args.paced_alpha,
                                        args.paced_beta)
        # The step's completion tokens, each counted with its weight, on all ranks: the normaliser.
        num_tokens = common.global_sum(float(row_weights @ rollouts["completion_mask"].sum(1).float()))
        beta = (1.0 if args.forward_then_reverse and step >= args.steps // 2  # PACED's 2nd stage
                else args.jsd_beta)
        trained_rows = row_weights.nonzero().flatten().tolist()
        loss_sum, step_tokens = 0.0, 0
        for first in range(0, len(trained_rows), args.micro_batch_size):
            rows = trained_rows[first:first + args.micro_batch_size]
            student_batch = common.pack([student_prompts[i] for i in rows],
                                        [completions[i] for i in rows], tokenizer.pad_token_id, device)
            teacher_batch = common.pack([teacher_prompts[i] for i in rows],
                                        [completions[i] for i in rows], tokenizer.pad_token_id, device)
            with torch.no_grad(), teacher_context(teacher):  # 3. teacher: no gradient, ever
                teacher_hidden = common.completion_hidden(teacher, teacher_batch)  # [B, T, H]
            student_hidden = common.completion_hidden(model, student_batch)  # [B, T, H]
            completion_ids, completion_mask = (student_batch["completion_ids"],
                                               student_batch["completion_mask"])
            token_weights = row_weights[rows].to(device)[:, None] * completion_mask  # [B, T]
            # 4. The loss on this micro-batch is a (weighted) token mean; weight it by its share of
            # the step's tokens so the step's loss is the token mean over all of them.
            if args.loss == "full":
                loss = divergence(student_hidden, teacher_hidden, token_weights,
                                  lambda hidden: common.output_logits(model, hidden),
                                  lambda hidden: common.output_logits(teacher, hidden),
                                  list(model.get_output_embeddings().parameters()),
                                  beta, args.temperature, args.clip, args.chunk_size)
            else:
                mask, targets = completion_mask.bool(), completion_ids[completion_mask.bool()]
                with torch.no_grad():
                    teacher_logprobs = common.target_logprobs(
                        teacher, teacher_hidden[mask], targets, args.temperature, args.chunk_size)
                loss = sampled_token_loss(common.target_logprobs(
                    model, student_hidden[mask], targets, args.temperature, args.chunk_size),
                    teacher_logprobs, token_weights[mask])
            weight = float(token_weights.sum()) / num_tokens
            (loss * weight).backward()
            loss_sum += loss.item() * weight
            step_tokens += sum(int(batch["prompt_mask"].sum() + batch["completion_mask"].sum())
                               for batch in (student_batch, teacher_batch))
        grad_norm = common.optimizer_step(model, optimizer, scheduler, args.max_grad_norm)
        step += 1

        loss_sum, step_tokens = common.global_sum(loss_sum), common.global_sum(step_tokens)
        state["train_tokens"] += step_tokens
        state["wall_seconds"] = wall_before + time.time() - loop_start
        paced = ({"pass_rate": common.global_mean(correct.float().mean().item()),
                  "paced_weight": common.global_mean(row_weights.mean().item())}
                 if args.paced else {})
        common.log_step(metrics_file, {
            "step": step, "loss": loss_sum, **paced,
            "completion_length": common.global_mean(
                rollouts["completion_mask"].sum(1).float().mean().item()),
            "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
            "generated_tokens": state["generated_tokens"],
            "tokens_per_second": round((common.global_sum(rollouts["num_generated_tokens"])
                                        + step_tokens) / (time.time() - step_start)),
            **common.periodic_evaluation(args, step, model, tokenizer, eval_examples, state),
        }, args.steps, (time.time() - loop_start) / (step - first_step))
        common.save_every(args, step, model, tokenizer, optimizer, scheduler, state)
    common.finish_run(args, model, tokenizer, optimizer, scheduler, step, state,
                      eval_examples)


if __name__ == "__main__":
    common.run_cli(main)
