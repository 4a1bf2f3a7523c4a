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

Where we differ from the authors' code (github.com/siyan-zhao/OPSD, opsd_trainer.py), and the
switches that run it their way: their cap is per vocabulary entry, as `--clip` (their help text says
"for each token": `--clip-per token`; see `pointwise_divergence`); their mean is per sequence, then
over sequences (`--loss-norm sequence`; ours: one token mean over the step); their teacher may be an
exponential moving average of the student (`--teacher ema`, `ema_update`) and their loss may use the
teacher's top K tokens only (`--teacher-top-k`, `top_k_logits`); their later versions let the
teacher think (Qwen3's `enable_thinking`) and not the student (`--teacher-thinking`,
`--student-thinking`); their learning rate is effectively constant over the paper's 100 steps, as
our default `--schedule` here (the toy keeps its cosine). Beside the loss we log the uncapped
divergence and the share of the teacher's mass the cap removed (`uncapped_divergence`, `capped_mass`).

A separate teacher (`--teacher-model PATH`, `teacher_model`): another model with the same tokenizer,
frozen, shown OPSD's prompt or the student's own (`--teacher-prompt plain`: on-policy distillation,
GKD with lmbda 1, arXiv 2306.13649). `--teacher-rollout-steps N` (`step_rollouts`) is the
sparse-to-dense paper's bridge: the teacher samples the first N steps' completions (off-policy), the
student the rest.

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
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import common
import engine
from lora import forget_decoding_caches, lora_disabled

# Only for the built-in 1M-parameter toy model, and only for flags not given on the command line.
# clip 0: on the toy, teacher and student disagree sharply on digits and a 0.05 cap reverses the
# gradient of exactly those tokens (see `divergence` and the README): 44.4% -> 47.8% with it,
# 59.8% without (both measured when model.generate did the sampling).
TOY_SETTINGS = {"steps": 150, "batch_size": 32, "lr": 1e-3, "lora_r": 16, "lora_alpha": 32,
                "max_grad_norm": 1.0, "temperature": 0.7, "top_p": 1.0, "top_k": 0, "clip": 0.0,
                "schedule": "cosine"}


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
    add("--teacher", choices=["fixed", "current", "ema"], default="fixed",
        help="fixed: the initial model (LoRA off); current: the weights being trained; ema: an "
             "exponential moving average of them (--ema-decay)")
    add("--ema-decay", type=float, default=None,
        help="--teacher ema's decay: teacher <- decay * teacher + (1 - decay) * student after each "
             "step (with it, 0.999 if not given)")
    add("--teacher-model", default=None,
        help="a separate teacher: a model folder or id, frozen, in --dtype, without LoRA; its "
             "tokenizer must be the student's (none: the student itself, --teacher)")
    add("--teacher-prompt", choices=["solution", "plain"], default="solution",
        help="what the teacher sees: OPSD's prompt with the reference solution, or the student's "
             "own prompt (on-policy distillation)")
    add("--teacher-rollout-steps", type=int, default=0,
        help="the first N steps train on the teacher's own samples (off-policy, forward KL), then "
             "on the student's: the sparse-to-dense bridge (0: the student's from the start)")
    add("--teacher-top-k", type=int, default=0,
        help="the divergence over the teacher's top K tokens only, both distributions "
             "renormalised over them (0: the whole vocabulary)")
    add("--loss", choices=["full", "sampled"], default="full",
        help="full: divergence over the vocabulary; sampled: per-token advantage on sampled tokens")
    add("--jsd-beta", type=float, default=0.0,
        help="generalized JSD weight beta: 0 forward KL(teacher||student), 1 reverse KL, 0.5 JSD "
             "(not grpo.py's --beta, a KL penalty)")
    add("--clip", type=float, default=0.05,
        help="cap on the pointwise divergence: on each vocabulary entry, as the authors' code "
             "(or per token, --clip-per token); 0: no cap")
    add("--clip-per", choices=["entry", "token"], default="entry",
        help="entry: min(term_v, clip) for each vocabulary entry v; token: min(sum_v term_v, clip)")
    add("--loss-norm", choices=["token", "sequence"], default="token",
        help="token: one token mean over the step; sequence: a token mean per completion, then a "
             "mean over completions (the authors' code)")
    add("--teacher-thinking", action=argparse.BooleanOptionalAction, default=True,
        help="the teacher's prompt with the chat template's thinking on (Qwen3's enable_thinking), "
             "as the authors' code; a template without the switch is unaffected")
    add("--student-thinking", action=argparse.BooleanOptionalAction, default=False,
        help="the student's prompt (its rollouts and training) with thinking on")
    add("--paced", action="store_true",
        help="PACED: weight each problem by p^alpha (1 - p)^beta, p = the student's pass rate "
             "over its --num-generations rollouts")
    add("--paced-alpha", type=float, default=None, help="PACED's alpha (with --paced, 1 if not given)")
    add("--paced-beta", type=float, default=None, help="PACED's beta (with --paced, 1 if not given)")
    add("--forward-then-reverse", action="store_true",
        help="PACED's two stages: forward KL (--jsd-beta 0) for the first half of the steps, "
             "reverse KL (1) for the second")
    # The OPSD paper's settings; both logits of the divergence are divided by the temperature.
    # Its code's schedule, linear decay over 30 epochs, is constant within 0.5% over its 100 steps.
    parser.set_defaults(lr=5e-6, max_grad_norm=0.1, temperature=1.1, top_p=0.95, top_k=20,
                        schedule="constant")
    args = common.parse_args(parser, argv, TOY_SETTINGS, ranges={
        "num_generations": (lambda v: v >= 1, "at least 1"),
        "jsd_beta": (lambda v: 0 <= v <= 1, "in [0, 1]: 0 forward KL, 1 reverse KL"),
        "clip": (lambda v: v >= 0, "at least 0 (0: no cap)"),
        "ema_decay": (lambda v: v is None or 0 <= v < 1, "in [0, 1)"),
        "teacher_top_k": (lambda v: v >= 0, "at least 0 (0: the whole vocabulary)"),
        "teacher_rollout_steps": (lambda v: v >= 0, "at least 0"),
        "paced_alpha": (lambda v: v is None or v >= 0, "at least 0"),
        "paced_beta": (lambda v: v is None or v >= 0, "at least 0"),
        "temperature": (lambda v: v > 0, "positive: the student samples its completions and both "
                                         "distributions are softmax(logits / temperature)")})
    if not args.paced and (args.paced_alpha, args.paced_beta) != (None, None):
        raise common.InputError("--paced-alpha and --paced-beta are PACED's: give --paced too")
    if args.ema_decay is not None and args.teacher != "ema":
        raise common.InputError("--ema-decay is --teacher ema's: give that too")
    if args.teacher == "ema":
        args.ema_decay = 0.999 if args.ema_decay is None else args.ema_decay
    if args.teacher_model and args.teacher != "fixed":
        raise common.InputError("--teacher chooses among the student's own weights: with "
                                "--teacher-model it cannot be given")
    if args.teacher_rollout_steps and (args.loss != "full" or args.paced):
        raise common.InputError("--teacher-rollout-steps trains on the teacher's samples: the "
                                "sampled loss and --paced's pass rates are of the student's own, "
                                "so it needs --loss full and no --paced")
    if args.teacher_top_k and args.loss != "full":
        raise common.InputError("--teacher-top-k restricts the full divergence: it needs --loss full")
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


def pointwise_divergence(student_logits, teacher_logits, beta, temperature, clip,
                         clip_per="entry"):
    """Per-position divergence summed over the vocabulary: [..., V] logits -> three [...] tensors,
    (the loss's divergence, the divergence uncapped, the teacher's probability mass the cap removed).

    With P_T = softmax(teacher / temperature), P_S = softmax(student / temperature):
        beta = 0:      KL(P_T || P_S) = sum_v P_T (log P_T - log P_S)     "forward"
        beta = 1:      KL(P_S || P_T) = sum_v P_S (log P_S - log P_T)     "reverse"
        0 < beta < 1:  M = beta P_T + (1 - beta) P_S
                       JSD_beta = beta KL(P_T || M) + (1 - beta) KL(P_S || M)
    Forward KL is mass-covering (the student must put mass wherever the teacher does), reverse KL
    mode-seeking. JSD_beta tends to 0 as beta -> 0 or 1, so the two endpoints are *defined* as the
    plain KLs above (as in TRL's GKD): the loss is discontinuous there, on purpose.

    clip > 0 caps from above. clip_per "entry" (the authors' code: `jsd.clamp(max=token_clip)` on
    the [B, T, V] terms) caps each vocabulary entry before the sum, sum_v min(term_v, clip); a term
    is negative where the other distribution puts more mass (forward KL: P_S(v) > P_T(v)) and is
    not capped, so the sum, and the logged loss, can fall slightly below 0. clip_per "token" (their
    help text: "clip the JSD loss for each token") caps the sum, min(sum_v term_v, clip): a token
    above the cap passes no gradient at all. The removed mass is sum_v P_T(v) over the capped
    entries, or 1 for a capped token.
    """
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if beta == 0:
        terms = log_p_teacher.exp() * (log_p_teacher - log_p_student)
    elif beta == 1:
        terms = log_p_student.exp() * (log_p_student - log_p_teacher)
    else:
        log_mixture = torch.logaddexp(log_p_teacher + math.log(beta),
                                      log_p_student + math.log(1 - beta))  # log M, stably
        terms = (beta * log_p_teacher.exp() * (log_p_teacher - log_mixture)
                 + (1 - beta) * log_p_student.exp() * (log_p_student - log_mixture))
    uncapped = terms.sum(-1)
    if clip <= 0:
        return uncapped, uncapped.detach(), torch.zeros_like(uncapped)
    if clip_per == "token":
        capped = uncapped.detach() > clip
        return uncapped.clamp(max=clip), uncapped.detach(), capped.float()
    capped = terms.detach() > clip  # a capped entry passes no gradient (see `divergence`)
    return (terms.clamp(max=clip).sum(-1), uncapped.detach(),
            (log_p_teacher.detach().exp() * capped).sum(-1))


def top_k_logits(student_logits, teacher_logits, k):
    """The logits of the teacher's K most likely tokens at each position, student's and teacher's:
    [..., V] -> [..., K] each. A divergence of these renormalises both distributions over the K
    tokens (the authors' `top_k_loss`: `torch.topk(teacher_logits, k)`, then a gather of both and
    log_softmax over the K), and ignores the rest of the vocabulary."""
    top = teacher_logits.topk(min(k, teacher_logits.shape[-1]), dim=-1).indices
    return student_logits.gather(-1, top), teacher_logits.gather(-1, top)


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


def divergence(student, student_hidden, teacher, teacher_hidden, weights, beta=0.0,
               temperature=1.0, clip=0.0, chunk_size=128, clip_per="entry", top_k=0,
               completion_ids=None):
    """Token mean over the completion of the full-vocabulary divergence D(P_T || P_S) (OPSD eq. for
    the full-distribution objective, arXiv 2601.18734; generalized JSD of GKD, arXiv 2306.13649):

        L = (1 / sum_t m_t) sum_t m_t D( softmax(z^T_t / T), softmax(z^S_t / T) )

    z^S_t, z^T_t: the student's and the teacher's logits at completion position t, from their final
    hidden states student_hidden, teacher_hidden [N, T, H] (`engine.completion_hidden`; position t
    predicts completion token t) through the output layers of the model `student` and of the
    `Teacher` `teacher` (inside its own weights).
    weights m: [N, T], 1 on completion tokens (EOS included) and 0 elsewhere, times the row's
    `paced_weights` with --paced, over the row's length with --loss-norm sequence (`token_weights`).
    D is `pointwise_divergence` (the formulas, the cap, which direction is "forward"), with top_k > 0
    over the teacher's top K tokens only (`top_k_logits`). Gradients flow into the student only. The
    logits exist a chunk of positions at a time (`engine.compare_logits_in_chunks`), never as
    [N, T, V]. Returns (L, [2]: the same weighted means of the uncapped divergence and of the
    teacher's mass the cap removed, for the log, and with completion_ids [N, T] the student's
    log softmax(z^S_t / T) of each completion token at the weighted positions, [n], for the log's
    sampler/trainer gap; else None).

    The clip, and why it can hurt: a capped entry j has zero gradient of its own, but through the
    softmax the uncapped entries still push on z_j with d/dz_j = p_S(j) * P_T(uncapped) > 0, i.e.
    the student's logit of a token the teacher strongly prefers goes *down*. On real LLMs few
    entries exceed 0.05; on the toy, whose teacher and student disagree sharply on digits, many do.
    """
    def per_position(student_logits, teacher_logits, *targets):  # [c, V] each -> [c], [c, 2 or 3]
        logprobs = [engine.logprobs_of(student_logits, targets[0], temperature)] if targets else []
        if top_k:
            student_logits, teacher_logits = top_k_logits(student_logits, teacher_logits, top_k)
        loss, uncapped, capped_mass = pointwise_divergence(student_logits, teacher_logits, beta,
                                                           temperature, clip, clip_per)
        return loss, torch.stack([uncapped, capped_mass, *logprobs], -1)
    mask = weights > 0
    extra = [completion_ids[mask]] if completion_ids is not None else []
    values, monitored = engine.compare_logits_in_chunks(  # [n], [n, 2 or 3]: at weighted positions
        per_position, student, student_hidden[mask], teacher.logits, teacher_hidden[mask],
        chunk_size, extra)
    position_weights = weights[mask].float()  # [n]
    total = position_weights.sum().clamp(min=1e-8)
    return ((values * position_weights).sum() / total,
            (monitored[:, :2] * position_weights[:, None]).sum(0) / total,
            monitored[:, 2] if extra else None)


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


def token_weights(row_weights, completion_mask, loss_norm):
    """Each completion token's weight m in the step's loss: [N] row weights w (1, or PACED's) and
    [N, T] completion mask -> [N, T]. The step's loss is sum m D / sum m over all its tokens:
        token:     m_it = w_i            one token mean over the step (ours)
        sequence:  m_it = w_i / |o_i|    sum_i w_i (mean_t D_it) / sum_i w_i, a mean of the
                                         completions' token means (the authors' code, one
                                         completion per micro-batch)
    A long completion weighs more in the first, the same as a short one in the second."""
    weights = row_weights[:, None] * completion_mask  # [N, T]
    if loss_norm == "sequence":
        weights = weights / completion_mask.sum(1, keepdim=True).clamp(min=1)
    return weights


def divergence_beta(args, step):
    """The generalized JSD's beta at a step: --jsd-beta, or with --forward-then-reverse PACED's two
    stages (arXiv 2603.11178): the forward KL (0) for the first half of the steps, the reverse KL
    (1) for the second, to cover the teacher's modes first and consolidate on them after."""
    if args.forward_then_reverse:
        return 1.0 if step >= args.steps // 2 else 0.0
    return args.jsd_beta


def ema_update(ema, model, decay):
    """The EMA teacher's update after each optimizer step (the authors' `_update_ema`):

        theta_T <- decay * theta_T + (1 - decay) * theta_S

    over the trainable parameters only (with LoRA the adapters, so it costs adapter-sized memory).
    `ema` {name: tensor} is changed in place. As theirs, the first call copies theta_S: the average
    starts from the weights after the first step, and before it the teacher is the student."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if not parameter.requires_grad:
                continue
            if name in ema:
                ema[name].mul_(decay).add_(parameter, alpha=1 - decay)
            else:
                ema[name] = parameter.detach().clone()


@contextmanager
def ema_weights(model, ema):
    """The model with its trainable parameters' values swapped for their averages in `ema` (as the
    authors' `_ema_teacher_context`), put back afterwards; as it is while `ema` is empty. LoRA's
    decoding caches are cleared both ways: a swap keeps a parameter's version counter, and
    `ema_update` changes the averages in place."""
    saved = {}
    for name, parameter in model.named_parameters():
        if name in ema:
            saved[name], parameter.data = parameter.data, ema[name]
    forget_decoding_caches(model)
    try:
        yield model
    finally:
        for name, parameter in model.named_parameters():
            if name in saved:
                parameter.data = saved[name]
        forget_decoding_caches(model)


@dataclass
class Teacher:
    """OPSD's teacher: a model and the weights it is used with, `weights(model)` a context that
    swaps them in (the fixed teacher: LoRA off; the EMA teacher: the averages; otherwise none).
    Everything the teacher does, its hidden states, its logits, its log-probabilities and its
    samples, goes through these methods, inside its weights and without gradient, so no call
    can score it with the student's."""
    model: torch.nn.Module
    weights: Callable = nullcontext

    def hidden(self, batch):  # [N, T, H]: engine.completion_hidden
        with torch.no_grad(), self.weights(self.model):
            return engine.completion_hidden(self.model, batch)

    def logits(self, hidden):  # [..., H] -> [..., V]
        with torch.no_grad(), self.weights(self.model):
            return engine.output_logits(self.model, hidden)

    def logprobs(self, hidden, targets, temperature, chunk_size):  # [n]: engine.target_logprobs
        with torch.no_grad(), self.weights(self.model):
            return engine.target_logprobs(self.model, hidden, targets, temperature, chunk_size)

    def sample(self, run, examples, num_samples, thinking, message):  # common.sample_rollouts
        with self.weights(self.model):
            return common.sample_rollouts(run, examples, num_samples, thinking, model=self.model,
                                          message=message)


def teacher_model(args, run):
    """The `Teacher`. fixed, the initial model: with LoRA the student with LoRA switched off (no
    second copy), with --full a frozen copy loaded from --model again (not the resumed weights);
    current: the student as it is; ema: the student with its trainable weights' averages
    (`ema_weights`), kept in run.method_tensors and so in checkpoints. With --teacher-model: that
    model, frozen, in --dtype, without LoRA (its weights and one forward pass without gradients are
    what it adds to memory)."""
    if args.teacher_model:
        return Teacher(common.load_model(args.teacher_model, args.dtype)[0].requires_grad_(False))
    if args.teacher == "current":
        return Teacher(run.model)
    if args.teacher == "ema":
        return Teacher(run.model, lambda model: ema_weights(model, run.method_tensors))
    if not args.full:
        return Teacher(run.model, lora_disabled)
    return Teacher(common.load_model(args.model, args.dtype)[0].requires_grad_(False))


def check_teacher_tokenizer(student, teacher):
    """A separate teacher scores the student's own token ids, and the divergence compares the two
    distributions entry by entry: the teacher's tokenizer must have the student's vocabulary, the
    same token for the same id. Refused in one line otherwise."""
    student_vocabulary, teacher_vocabulary = (common.load_tokenizer(name).get_vocab()
                                              for name in (student, teacher))
    if teacher_vocabulary != student_vocabulary:
        raise common.InputError(
            f"--teacher-model {teacher}: its tokenizer does not give --model {student}'s token ids "
            f"({len(teacher_vocabulary):,} entries against {len(student_vocabulary):,}): "
            "distillation over the vocabulary needs the same tokenizer")


def teacher_message(view):
    """What the teacher is shown, as a function of the example: OPSD's prompt with the reference
    solution (`teacher_prompt`), or the student's own prompt (on-policy distillation, GKD)."""
    if view == "plain":
        return common.student_message
    return lambda example: teacher_prompt(example["question"], example["solution"])


def prompt_ids(tokenizer, examples, message, thinking, group_size):
    """Each rollout's prompt as token ids: message(example) in the chat template, the group_size
    rollouts of an example adjacent (as `common.sample_rollouts` returns them)."""
    texts = [common.chat_prompt(tokenizer, message(example), thinking) for example in examples]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [ids[i // group_size] for i in range(len(examples) * group_size)]


def step_rollouts(run, examples, teacher):
    """The step's completions and who sampled them. The student's own from the problem alone
    (on-policy); in the first --teacher-rollout-steps steps the teacher's, from the teacher's own
    prompt: the forward KL on them is a dense, off-policy warm-up, the first stage of the
    sparse-to-dense bridge (after it the student samples: on-policy distillation)."""
    args = run.args
    if run.step >= args.teacher_rollout_steps:
        return common.sample_rollouts(run, examples, args.num_generations,
                                      args.student_thinking), "student"
    return teacher.sample(run, examples, args.num_generations, args.teacher_thinking,
                          teacher_message(args.teacher_prompt)), "teacher"


def main(argv=None):
    args = parse_args(argv)
    if args.teacher_model:  # before anything slow: one line if it cannot score the student's ids
        check_teacher_tokenizer(args.model, args.teacher_model)
    run = common.start_run(args)
    model, tokenizer, group_size = run.model, run.tokenizer, args.num_generations
    teacher = teacher_model(args, run)
    while run.step < args.steps:
        examples = common.next_batch(run)

        # 1. The student samples its own completions from the problem alone (or, in the bridge's
        # first --teacher-rollout-steps steps, the teacher from its own prompt).
        rollouts, sampler = step_rollouts(run, examples, teacher)

        # 2. The teacher's prompt shows the reference solution; the completion tokens are the same.
        completions = engine.unpadded(rollouts["completion_ids"], rollouts["completion_mask"])
        student_prompts = prompt_ids(tokenizer, examples, common.student_message,
                                     args.student_thinking, group_size)
        teacher_prompts = prompt_ids(tokenizer, examples, teacher_message(args.teacher_prompt),
                                     args.teacher_thinking, group_size)

        row_weights = torch.ones(len(completions), device=model.device)  # [N]
        metrics = {"rollouts": sampler} if args.teacher_rollout_steps else {}
        if args.paced:  # PACED: each rollout weighted by its problem's pass rate
            correct = common.judge(rollouts["texts"], examples, group_size).to(model.device)  # [N]
            row_weights = paced_weights(correct, group_size, args.paced_alpha, args.paced_beta)
            metrics.update(pass_rate=common.global_mean(correct.float().mean().item()),
                           paced_weight=common.global_mean(row_weights.mean().item()))
        # The step's completion tokens, each counted with its weight, on all ranks: the normaliser.
        num_tokens = common.global_sum(float(token_weights(
            row_weights, rollouts["completion_mask"], args.loss_norm).sum()))
        beta = divergence_beta(args, run.step)
        trained_rows = row_weights.nonzero().flatten().tolist()  # rows of weight 0: not trained
        loss_sum, monitored_sum, train_tokens = 0.0, torch.zeros(2, device=model.device), 0
        sampler_logprobs, trainer_logprobs = [], []  # of the student's own samples: the gap
        for first in range(0, len(trained_rows), args.micro_batch_size):
            rows = trained_rows[first:first + args.micro_batch_size]
            student_batch = engine.pack([student_prompts[i] for i in rows],
                                        [completions[i] for i in rows], tokenizer.pad_token_id,
                                        model.device)
            teacher_batch = engine.pack([teacher_prompts[i] for i in rows],
                                        [completions[i] for i in rows], tokenizer.pad_token_id,
                                        model.device)
            teacher_hidden = teacher.hidden(teacher_batch)  # [B, T, H]  3. no gradient, ever
            student_hidden = engine.completion_hidden(model, student_batch)  # [B, T, H]
            completion_mask = student_batch["completion_mask"]  # [B, T]
            weights = token_weights(row_weights[rows], completion_mask,
                                    args.loss_norm)  # [B, T]
            # 4. The loss on this micro-batch is a (weighted) token mean; weight it by its share of
            # the step's tokens so the step's loss is the token mean over all of them.
            weight = float(weights.sum()) / num_tokens
            mask = completion_mask.bool()
            if args.loss == "full":
                loss, monitored, student_logprobs = divergence(
                    model, student_hidden, teacher, teacher_hidden, weights, beta,
                    args.temperature, args.clip, args.chunk_size, args.clip_per,
                    args.teacher_top_k, student_batch["completion_ids"])
                monitored_sum += monitored * weight
            else:
                targets = student_batch["completion_ids"][mask]
                teacher_logprobs = teacher.logprobs(teacher_hidden[mask], targets,
                                                    args.temperature, args.chunk_size)
                student_logprobs = engine.target_logprobs(
                    model, student_hidden[mask], targets, args.temperature, args.chunk_size)
                loss = sampled_token_loss(student_logprobs, teacher_logprobs, weights[mask])
            if sampler == "student":  # the same tokens' log-probabilities from the sampler
                sampler_logprobs.append(rollouts["logprobs"][rows, :mask.shape[1]][mask])
                trainer_logprobs.append(student_logprobs.detach())
            (loss * weight).backward()
            loss_sum += loss.item() * weight
            train_tokens += sum(int(batch["prompt_mask"].sum() + batch["completion_mask"].sum())
                                for batch in (student_batch, teacher_batch))
        grad_norm = common.optimizer_step(run)
        if args.teacher == "ema":
            ema_update(run.method_tensors, model, args.ema_decay)
        if args.loss == "full":  # what the student learns, beside the (capped) loss
            uncapped, capped_mass = (common.global_sum(float(value)) for value in monitored_sum)
            metrics.update(uncapped_divergence=uncapped, capped_mass=capped_mass)
        if sampler == "student":
            metrics.update(common.logprob_gap(sampler_logprobs, trainer_logprobs))
        common.end_step(run, {
            "loss": common.global_sum(loss_sum), **metrics,
            "completion_length": common.global_mean(
                rollouts["completion_mask"].sum(1).float().mean().item()),
            "grad_norm": grad_norm}, train_tokens)
    common.finish_run(run)


if __name__ == "__main__":
    common.run_cli(main)
