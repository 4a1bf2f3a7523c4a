"""opsd.py: On-Policy Self-Distillation (OPSD), LoRA by default.

OPSD (Zhao et al. 2026, arXiv 2601.18734): the model teaches itself, shown the solution y* too.
  1. the student samples its own completion o ~ p_S(. | x)                      (on-policy)
  2. the teacher scores the same tokens: p_T(. | x, y*, o_<t) at every position t of o
  3. the student minimises L = (1/|o|) sum_t D( p_T(. | x, y*, o_<t),  p_S(. | x, o_<t) )
No reward: a dense signal per token, so one rollout per prompt. Defaults, the paper's final setting:
the frozen initial model as teacher (LoRA off; steadier than one that moves), D the forward KL with
each vocabulary entry capped at `--clip` 0.05. Where the authors' code (siyan-zhao/OPSD on GitHub)
differs, a flag runs it their way: `--loss-norm sequence` (a mean per sequence), `--teacher ema`
(an average of the student), `--teacher-top-k`, `--clip-per token` (their help text's cap).
A separate teacher: `--teacher-model`; the sparse-to-dense bridge: `--teacher-rollout-steps`. PACED
(arXiv 2603.11178): `--paced` weights by pass rate; `--forward-then-reverse`. See docs/opsd.md.

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

# The shared flags' defaults that OPSD changes, the paper's, and the toy's (why: docs/opsd.md).
DEFAULTS = {"lr": 5e-6, "max_grad_norm": 0.1, "temperature": 1.1, "top_p": 0.95, "top_k": 20,
            "schedule": "constant"}
TOY_SETTINGS = {"steps": 150, "batch_size": 32, "lr": 1e-3, "lora_r": 16, "lora_alpha": 32,
                "max_grad_norm": 1.0, "temperature": 0.7, "top_p": 1.0, "top_k": 0, "clip": 0.0,
                "schedule": "cosine", "max_new_tokens": 64, "eval_batch_size": 256,
                "eval_temperature": 0.7, "micro_batch_size": 0, "gradient_checkpointing": False}


# ---- OPSD's formulas -----------------------------------------------------------------------------


def pointwise_divergence(student_logits, teacher_logits, beta, temperature, clip, clip_per="entry"):
    """[..., V] logits -> [...] each: the divergence summed over the vocabulary, uncapped, and the
    teacher's mass the cap removed. P = softmax(z / temperature); beta 0: KL(P_T || P_S), 1: KL(P_S
    || P_T), else beta KL(P_T || M) + (1 - beta) KL(P_S || M), M = beta P_T + (1 - beta) P_S. clip
    caps each entry's term (clip_per "entry", the authors' code) or the sum (docs/opsd.md)."""
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if beta == 0:
        terms = log_p_teacher.exp() * (log_p_teacher - log_p_student)  # forward KL: mass-covering
    elif beta == 1:
        terms = log_p_student.exp() * (log_p_student - log_p_teacher)  # reverse KL: mode-seeking
    else:
        log_mixture = torch.logaddexp(log_p_teacher + math.log(beta),
                                      log_p_student + math.log(1 - beta))  # log M, stably
        terms = (beta * log_p_teacher.exp() * (log_p_teacher - log_mixture)
                 + (1 - beta) * log_p_student.exp() * (log_p_student - log_mixture))
    uncapped = terms.sum(-1)
    if clip <= 0:
        return uncapped, uncapped.detach(), torch.zeros_like(uncapped)
    if clip_per == "token":  # their help text's cap: a capped token passes no gradient at all
        return uncapped.clamp(max=clip), uncapped.detach(), (uncapped.detach() > clip).float()
    capped = terms.detach() > clip  # a capped entry passes no gradient (docs/opsd.md)
    return (terms.clamp(max=clip).sum(-1), uncapped.detach(),
            (log_p_teacher.detach().exp() * capped).sum(-1))


def divergence(student, student_hidden, teacher, teacher_hidden, weights, normaliser, beta=0.0,
        temperature=1.0, clip=0.0, chunk_size=128, clip_per="entry", top_k=0, completion_ids=None):
    """OPSD's loss (arXiv 2601.18734; generalized JSD, arXiv 2306.13649), sum_t m_t D(softmax(z^T_t
    / T), softmax(z^S_t / T)) / normaliser, D `pointwise_divergence`: hidden states [N, T, H] ->
    logits a chunk of positions at a time; weights m [N, T]. Returns (the loss, [3] the uncapped
    divergence, capped mass and the student's entropy, weighted as the loss, [n] the student's
    completion log-probabilities or None)."""
    def per_position(student_logits, teacher_logits, *targets):  # [c, V] each -> [c], [c, 3 or 4]
        logprobs = [engine.logprobs_of(student_logits, targets[0], temperature)] if targets else []
        entropy = engine.entropy_of(student_logits, temperature)  # [c]: the whole vocabulary
        if top_k:
            student_logits, teacher_logits = top_k_logits(student_logits, teacher_logits, top_k)
        loss, uncapped, capped_mass = pointwise_divergence(student_logits, teacher_logits, beta,
                                                           temperature, clip, clip_per)
        return loss, torch.stack([uncapped, capped_mass, entropy, *logprobs], -1)
    mask = weights > 0
    extra = [completion_ids[mask]] if completion_ids is not None else []
    values, monitored = engine.compare_logits_in_chunks(  # [n], [n, 3 or 4]: at weighted positions
        per_position, student, student_hidden[mask], teacher.logits, teacher_hidden[mask],
        chunk_size, extra)
    position_weights = weights[mask].float()  # [n]
    return ((values * position_weights).sum() / normaliser,
            (monitored[:, :3] * position_weights[:, None]).sum(0) / normaliser,
            monitored[:, 3] if extra else None)


def textbook_divergence(student_logits, teacher_logits, weights, normaliser, beta=0.0,
                        temperature=1.0, clip=0.0, clip_per="entry", top_k=0):
    """`divergence` plainly, from full logits [N, T, V], as tests/test_fused_losses.py checks it."""
    if top_k:
        student_logits, teacher_logits = top_k_logits(student_logits, teacher_logits, top_k)
    values = pointwise_divergence(student_logits, teacher_logits, beta, temperature, clip,
                                  clip_per)[0]  # [N, T]
    return (values * weights).sum() / normaliser


def token_weights(row_weights, completion_mask, loss_norm):
    """Token weights m [N, T] of the step's loss sum m D / sum m, from row weights w [N] and a mask:
    w (token: one token mean, ours) or w / |o_i| (sequence: a mean of means, the authors' code)."""
    weights = row_weights[:, None] * completion_mask  # [N, T]
    if loss_norm == "sequence":
        weights = weights / completion_mask.sum(1, keepdim=True).clamp(min=1)
    return weights


def loss_normaliser(row_weights, completions, loss_norm):
    """The step's sum m over all ranks: sum_i w_i |o_i| (token), or sum_i w_i (sequence)."""
    lengths = torch.tensor([len(ids) for ids in completions], device=row_weights.device)
    per_row = row_weights * lengths if loss_norm == "token" else row_weights * (lengths > 0)
    return max(common.global_sum(float(per_row.sum())), 1e-8)


# ---- The teacher ---------------------------------------------------------------------------------


@dataclass
class Teacher:
    """OPSD's teacher: a model and `weights(model)`, a context swapping its weights in. All its uses
    go through these methods, without gradient, so none can score it with the student's weights."""
    model: torch.nn.Module
    weights: Callable = nullcontext
    update: Callable = lambda student: None  # after each optimizer step (--teacher ema: ema_update)

    def hidden(self, batch):  # [N, T, H]: engine.completion_hidden
        with torch.no_grad(), self.weights(self.model):
            return engine.completion_hidden(self.model, batch)

    def logits(self, hidden):  # [..., H] -> [..., V]
        with torch.no_grad(), self.weights(self.model):
            return engine.output_logits(self.model, hidden)

    def logprobs(self, hidden, targets, temperature, chunk_size):  # [n]: engine.target_logprobs
        with torch.no_grad(), self.weights(self.model):
            return engine.target_logprobs(self.model, hidden, targets, temperature, chunk_size)

    def sample(self, run, prompts, num_samples):  # common.sample_rollouts
        with self.weights(self.model):
            return common.sample_rollouts(run, self.model, prompts, num_samples)


def make_teacher(args, run):
    """The `Teacher` that --teacher and --teacher-model choose (docs/opsd.md)."""
    if args.teacher == "current":
        return Teacher(run.model)
    if args.teacher == "ema":  # the averages: in checkpoints (run.method_tensors)
        averages = run.method_tensors  # one dict: the weights swapped in, and the ones updated
        return Teacher(run.model, lambda model: ema_weights(model, averages),
                       lambda student: ema_update(averages, student, args.ema_decay))
    if args.teacher_model or args.full:  # a separate model, or --full's frozen copy of --model
        frozen = common.load_model(args.teacher_model or args.model, args.dtype)[0]
        return Teacher(frozen.requires_grad_(False))
    return Teacher(run.model, lora_disabled)  # fixed: the student with LoRA off


# ---- The algorithm -------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    run = common.start_run(args, first_inputs)  # shows both prompts and checks their boundary
    model = run.model
    teacher = make_teacher(args, run)
    while run.step < args.steps:
        examples = common.next_batch(run)

        # 1. The student samples its own completions from the problem alone (the bridge's first
        # steps: the teacher, from its prompt, which shows the solution); the tokens are the same.
        rollouts, student_prompts, teacher_prompts, sampled_by = step_rollouts(run, examples,
                                                                               teacher)
        metrics = {"rollouts": sampled_by} if args.teacher_rollout_steps else {}
        row_weights = rollout_weights(run, rollouts, examples, metrics)  # [N]: 1, or --paced
        normaliser = loss_normaliser(row_weights, rollouts["completions"], args.loss_norm)
        jsd_beta = divergence_beta(args, run.step)  # --jsd-beta, or --forward-then-reverse's
        trained = row_weights.nonzero().flatten().tolist()  # rows of weight 0: not trained

        totals = {"loss": 0.0, "monitored": torch.zeros(3, device=model.device), "tokens": 0}
        gap = ([], [])  # the sampler's and the trainer's log-probabilities of the same tokens
        for indices, student_batch, teacher_batch in step_batches(run, rollouts, student_prompts,
                                                               teacher_prompts, trained):
            # 2. The teacher scores the same tokens (no gradient, ever); 3. the student's loss is
            # the divergence between the two, token by token, over the whole vocabulary.
            teacher_hidden = teacher.hidden(teacher_batch)  # [B, T, H]
            student_hidden = engine.completion_hidden(model, student_batch)  # [B, T, H]
            weights = token_weights(row_weights[indices], student_batch["completion_mask"],
                                    args.loss_norm)  # [B, T]
            loss, monitored, student_logprobs = distillation_loss(
                args, model, teacher, student_hidden, teacher_hidden, student_batch, weights,
                normaliser, jsd_beta)
            loss.backward()  # the micro-batches' gradients add up to the step's
            add_to_totals(totals, loss, monitored, student_batch, teacher_batch)
            if sampled_by == "student":  # the same tokens' log-probabilities from the sampler
                common.add_logprob_gap(gap, rollouts, indices, student_logprobs)
        grad_norm = common.optimizer_step(run)
        teacher.update(model)  # --teacher ema: its average moves towards the student
        common.end_step(run, {**step_metrics(args, rollouts, totals, gap, sampled_by, metrics),
                              "grad_norm": grad_norm}, totals["tokens"])
    common.finish_run(run)


def step_rollouts(run, examples, teacher):
    """The completions, both prompts' ids and who sampled: the teacher in the bridge's steps."""
    args, tokenizer = run.args, run.tokenizer
    student_texts, teacher_texts = prompt_texts(args, tokenizer, examples)

    def tokenised(texts):  # each rollout's prompt ids, the rollouts of an example adjacent
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [ids[i // args.num_generations] for i in range(len(ids) * args.num_generations)]
    if run.step >= args.teacher_rollout_steps:
        rollouts = common.sample_rollouts(run, run.model, student_texts, args.num_generations)
        return rollouts, rollouts["prompts"], tokenised(teacher_texts), "student"
    rollouts = teacher.sample(run, teacher_texts, args.num_generations)
    return rollouts, tokenised(student_texts), rollouts["prompts"], "teacher"


def prompt_texts(args, tokenizer, examples):
    """The student's and the teacher's prompts of the examples, each in its --*-thinking mode."""
    return (common.student_prompts(tokenizer, examples, args.student_thinking),
            [common.chat_prompt(tokenizer, teacher_message(args.teacher_prompt)(example),
                                args.teacher_thinking) for example in examples])


def first_inputs(run, example):
    """For common.show_inputs: both prompts, named with the thinking mode their flags give; the
    completion is sampled there. A template that always thinks refuses a flag that is off."""
    prompts = {}
    for side, text in zip(("student", "teacher"), prompt_texts(run.args, run.tokenizer, [example])):
        thinking = getattr(run.args, f"{side}_thinking")
        message = (common.student_message if side == "student" else
                   teacher_message(run.args.teacher_prompt))(example)
        on, off = (common.chat_prompt(run.tokenizer, message, mode) for mode in (True, False))
        mode = f"--{side}-thinking {'on' if thinking else 'off'}"
        if on == off and "<think>" in on and not thinking:
            raise common.InputError(f"{mode}, but the model's chat template always opens a "
                                    "<think> block")
        prompts[f"{side} ({mode}{'' if on != off else ': the template has no such mode'})"] = text[0]
    return prompts, None


def step_batches(run, rollouts, student_prompts, teacher_prompts, trained):
    """The trained rows as micro-batches: [(rows, student's batch, teacher's batch)]."""
    args, tokenizer, device = run.args, run.tokenizer, run.model.device
    student, teacher = (common.training_batches(prompts, rollouts["completions"], trained,
                                                args.micro_batch_size, tokenizer, device)
                        for prompts in (student_prompts, teacher_prompts))
    return [(indices, student_batch, teacher_batch)
            for (indices, student_batch), (_, teacher_batch) in zip(student, teacher)]


def distillation_loss(args, model, teacher, student_hidden, teacher_hidden, batch, weights,
                      normaliser, jsd_beta):
    """A micro-batch's (loss, [3] monitored values, [n]): `divergence` or `sampled_token_loss`
    (--loss; its monitored values: only the student's entropy)."""
    if args.loss == "full":
        return divergence(model, student_hidden, teacher, teacher_hidden, weights, normaliser,
                          jsd_beta, args.temperature, args.clip, args.chunk_size, args.clip_per,
                          args.teacher_top_k, batch["completion_ids"])
    mask = batch["completion_mask"].bool()
    targets = batch["completion_ids"][mask]
    teacher_logprobs = teacher.logprobs(teacher_hidden[mask], targets, args.temperature,
                                        args.chunk_size)
    student_logprobs, entropy = engine.target_logprobs(model, student_hidden[mask], targets,
                                                       args.temperature, args.chunk_size, True)
    monitored = torch.zeros(3, device=entropy.device)
    monitored[2] = (entropy * weights[mask]).sum() / normaliser
    return (sampled_token_loss(student_logprobs, teacher_logprobs, weights[mask], normaliser),
            monitored, student_logprobs)


def add_to_totals(totals, loss, monitored, student_batch, teacher_batch):
    """Add a micro-batch's loss, monitored values and training tokens to the step's totals."""
    totals["loss"] += loss.item()
    totals["monitored"] += monitored
    totals["tokens"] += common.batch_tokens(student_batch) + common.batch_tokens(teacher_batch)


def step_metrics(args, rollouts, totals, gap, sampled_by, variants):
    """The step's log: loss, variants, uncapped divergence, capped mass, the student's entropy,
    logprob gap, length and truncated share."""
    metrics = {"loss": common.global_sum(totals["loss"]), **variants}
    uncapped, capped_mass, entropy = (common.global_sum(float(value))
                                      for value in totals["monitored"])
    if args.loss == "full":
        metrics.update(uncapped_divergence=uncapped, capped_mass=capped_mass)
    metrics["entropy"] = entropy
    if sampled_by == "student":
        metrics.update(common.logprob_gap(*gap))
    return {**metrics, **common.rollout_health(rollouts)}


# ---- The variants --------------------------------------------------------------------------------


def sampled_token_loss(student_logprobs, teacher_logprobs, weights, normaliser):
    """The paper's ablation on the sampled tokens y, all [n]: L = -sum m A log p_S(y) / normaliser,
    A = stopgrad(log p_T(y) - log p_S(y)): a REINFORCE estimate of the reverse KL's gradient."""
    advantages = (teacher_logprobs - student_logprobs).detach()  # up where the teacher prefers
    return -(advantages * student_logprobs * weights).sum() / normaliser


def top_k_logits(student_logits, teacher_logits, k):
    """Both logits at the teacher's top K tokens, [..., V] -> [..., K] (the authors' top_k_loss)."""
    top = teacher_logits.topk(min(k, teacher_logits.shape[-1]), dim=-1).indices
    return student_logits.gather(-1, top), teacher_logits.gather(-1, top)


def rollout_weights(run, rollouts, examples, metrics):
    """Each rollout's weight [N]: 1, or with --paced `paced_weights` (logged); 0: not trained."""
    args, device = run.args, run.model.device
    if not args.paced:
        return torch.ones(len(rollouts["completions"]), device=device)
    correct = common.judge(rollouts["texts"], examples, args.num_generations).to(device)  # [N]
    weights = paced_weights(correct, args.num_generations, args.paced_alpha, args.paced_beta)
    metrics.update(pass_rate=common.global_mean(correct.float().mean().item()),
                   paced_weight=common.global_mean(weights.mean().item()))
    return weights


def paced_weights(correct, group_size, alpha=1.0, beta=1.0):
    """PACED (arXiv 2603.11178): p^alpha (1 - p)^beta of the problems' pass rates p, [N] -> [N]."""
    pass_rate = correct.view(-1, group_size).float().mean(dim=1)  # [problems]
    return (pass_rate ** alpha * (1 - pass_rate) ** beta).repeat_interleave(group_size)


def divergence_beta(args, step):
    """beta at a step: --jsd-beta, or PACED's (arXiv 2603.11178) forward KL (0), then reverse KL."""
    if args.forward_then_reverse:
        return 1.0 if step >= args.steps // 2 else 0.0
    return args.jsd_beta


def ema_update(ema, model, decay):
    """theta_T <- decay theta_T + (1 - decay) theta_S, in place in `ema` (their `_update_ema`)."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    with torch.no_grad():
        for name, parameter in trainable:
            if name in ema:
                ema[name].mul_(decay).add_(parameter, alpha=1 - decay)
            else:
                ema[name] = parameter.detach().clone()  # the first step's weights, as theirs


@contextmanager
def ema_weights(model, ema):
    """The model with its trainable parameters swapped for their averages in `ema`, then back."""
    swapped = {name: p for name, p in model.named_parameters() if name in ema}
    saved = {name: parameter.data for name, parameter in swapped.items()}
    for name, parameter in swapped.items():
        parameter.data = ema[name]
    forget_decoding_caches(model)  # a swap keeps a parameter's version counter
    try:
        yield model
    finally:
        for name, parameter in swapped.items():
            parameter.data = saved[name]
        forget_decoding_caches(model)


def teacher_message(view):
    """What the teacher sees: OPSD's `common.solution_prompt`, or ("plain") the student's prompt."""
    if view == "plain":
        return common.student_message
    return lambda example: common.solution_prompt(example["question"], example["solution"])


def check_teacher_tokenizer(student, teacher):
    """Refuse, in one line, a separate teacher whose tokenizer gives other token ids."""
    student_vocabulary, teacher_vocabulary = (common.load_tokenizer(name).get_vocab()
                                              for name in (student, teacher))
    if teacher_vocabulary != student_vocabulary:
        raise common.InputError(
            f"--teacher-model {teacher}: its tokenizer does not give --model {student}'s token ids "
            f"({len(teacher_vocabulary):,} entries against {len(student_vocabulary):,}): "
            "distillation over the vocabulary needs the same tokenizer")


# ---- The command line ----------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(parser)
    add = parser.add_argument
    add("--num-generations", type=int, default=1, help="student completions per prompt")
    add("--teacher", choices=["fixed", "current", "ema"], default="fixed",
        help="fixed: the initial model (LoRA off); current: the weights being trained; ema: an "
             "exponential moving average of them (--ema-decay)")
    add("--ema-decay", type=float, default=None, help="--teacher ema's decay: teacher <- decay * "
        "teacher + (1 - decay) * student after each step (with it, 0.999 if not given)")
    add("--teacher-model", default=None,
        help="a separate teacher: a model folder or id, frozen, in --dtype, without LoRA; its "
             "tokenizer must be the student's (none: the student itself, --teacher)")
    add("--teacher-prompt", choices=["solution", "plain"], default="solution",
        help="what the teacher sees: OPSD's prompt with the reference solution, or the student's "
             "own prompt (on-policy distillation)")
    add("--teacher-rollout-steps", type=int, default=0,
        help="the first N steps train on the teacher's own samples (off-policy, forward KL), then "
             "on the student's: the sparse-to-dense bridge (0: the student's from the start)")
    add("--teacher-top-k", type=int, default=0, help="the divergence over the teacher's top K "
        "tokens only, both distributions renormalised over them (0: the whole vocabulary)")
    add("--loss", choices=["full", "sampled"], default="full",
        help="full: divergence over the vocabulary; sampled: per-token advantage on sampled tokens")
    add("--jsd-beta", type=float, default=0.0, help="generalized JSD weight beta: 0 forward "
        "KL(teacher||student), 1 reverse KL, 0.5 JSD (not grpo.py's --beta, a KL penalty)")
    add("--clip", type=float, default=0.05, help="cap on the pointwise divergence: on each "
        "vocabulary entry, as the authors' code (or per token, --clip-per token); 0: no cap")
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
    add("--paced", action="store_true", help="PACED: weight each problem by p^alpha (1 - p)^beta, "
        "p = the student's pass rate over its --num-generations rollouts")
    add("--paced-alpha", type=float, help="PACED's alpha (with --paced, 1 if not given)")
    add("--paced-beta", type=float, help="PACED's beta (with --paced, 1 if not given)")
    add("--forward-then-reverse", action="store_true", help="PACED's two stages: forward KL "
        "(--jsd-beta 0) for the first half of the steps, reverse KL (1) for the second")
    args = common.parse_args(parser, argv, DEFAULTS, TOY_SETTINGS, ranges={
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
    if args.teacher_model and args.teacher != "fixed": raise common.InputError("--teacher chooses "
        "among the student's own weights: with --teacher-model it cannot be given")
    if args.teacher_rollout_steps and (args.loss != "full" or args.paced): raise common.InputError(
        "--teacher-rollout-steps trains on the teacher's samples: the sampled loss and --paced's "
        "pass rates are of the student's own, so it needs --loss full and no --paced")
    if args.teacher_top_k and args.loss != "full": raise common.InputError(
        "--teacher-top-k restricts the full divergence: it needs --loss full")
    if args.paced:
        args.paced_alpha = 1.0 if args.paced_alpha is None else args.paced_alpha
        args.paced_beta = 1.0 if args.paced_beta is None else args.paced_beta
    if args.paced and args.num_generations < 2: raise common.InputError("--paced needs "
        "--num-generations >= 2: a pass rate of one rollout is 0 or 1, whose weight is 0")
    if args.forward_then_reverse and (args.jsd_beta != 0 or args.loss != "full"):
        raise common.InputError("--forward-then-reverse sets the divergence's beta itself: it "
                                "needs --jsd-beta 0 and --loss full")
    if args.teacher_model:  # before anything slow: one line if it cannot score the student's ids
        check_teacher_tokenizer(args.model, args.teacher_model)
    args.method = "opsd"
    args.out = args.out or "out/opsd"
    args.micro_batch_size = args.micro_batch_size or args.batch_size * args.num_generations
    return args


if __name__ == "__main__":
    common.run_cli(main)
