"""sft.py: supervised fine-tuning (SFT) on worked solutions, LoRA by default.

The model learns to reproduce the reference solution y of each problem x, token by token:

    L = -(1/N) * sum_i sum_t log p(y_i,t | x_i, y_i,<t)      N = target tokens in the whole step

Only the solution and its EOS are targets; the prompt is context. N counts the targets of all
micro-batches of a step together, so gradient accumulation weights every token the same as one big
batch would (averaging per micro-batch would favour the tokens of short micro-batches). A solution
that does not fit in --max-new-tokens with its EOS is cut there and gets no EOS: an EOS after the
cut would teach the model to stop in the middle of a solution. The log says once how many were cut.

This is the textbook recipe; the OPSD paper (arXiv 2601.18734) ran it as a baseline with TRL on
"Problem: ... Solution: ..." text. Here the prompt is the same one grpo.py and opsd.py use.

`--rejection-sampling K` trains on the model's own solutions instead of the references: rejection-
sampling fine-tuning (RFT, Yuan et al. 2023, arXiv 2308.01825; STaR, Zelikman et al. 2022, arXiv
2203.14465). Each step samples K completions per question from the current model, keeps the correct
ones (each distinct completion once) and takes the SFT step above on them. RFT samples the whole
data set once from a fixed model, and STaR and ReST-EM repeat that in rounds; here every step is a
round, so the samples always come from the improved model. That is GRPO's sample-verify-reinforce
loop with the SFT loss: wrong samples are dropped instead of pushed down, and there is no baseline.

`--rejection-sampling K --orpo-lambda [L]` pushes them down as well: ORPO (Hong et al. 2024, arXiv
2403.07691) on pairs of a correct and a wrong sample of the same question (see `orpo_loss`), the
way SFT, ORPO and GRPO are compared on GSM8K. It needs no reference model, unlike DPO. It trains on
pairs only: each correct sample with a wrong one of its question, so a question whose samples are
all right (or all wrong), and the correct samples beyond its wrong ones, are not trained on.

    python sft.py                                                   # built-in toy model and task
    python sft.py --rejection-sampling 8 --steps 60 --batch-size 16  # RFT on the toy
    python sft.py --rejection-sampling 8 --steps 60 --batch-size 16 --orpo-lambda  # ORPO, L 0.1
    python sft.py --model Qwen/Qwen3-1.7B --data train.jsonl
"""
import argparse

import torch
import torch.nn.functional as F

import common
import engine

# The shared flags' defaults that SFT changes (none), and the built-in toy's settings: only with
# --model toy, and only for flags not given on the command line.
DEFAULTS = {}
TOY_SETTINGS = {"steps": 150, "batch_size": 32, "lr": 5e-4, "lora_r": 16, "lora_alpha": 32,
                "warmup_steps": 10, "temperature": 0.7, "max_new_tokens": 64,
                "eval_batch_size": 256, "eval_temperature": 0.7, "micro_batch_size": 0,
                "gradient_checkpointing": False}


# ----------------------------------------------------------------------------------------------
# SFT's formula and its gradient


def sft_loss(logprobs, completion_mask, num_target_tokens):
    """Token-mean negative log-likelihood of the completion tokens.

    logprobs [B, T]: log p of each completion token; completion_mask [B, T]: 1 on targets.
    Divides by num_target_tokens, the targets of the whole optimizer step, not of this micro-batch.
    """
    return -(logprobs * completion_mask).sum() / num_target_tokens


def encode(tokenizer, example, max_new_tokens):
    """(prompt ids, completion ids): the solution then EOS, or, if that is longer than
    max_new_tokens, the solution's first max_new_tokens tokens and no EOS (it does not end there)."""
    prompt = common.chat_prompt(tokenizer, common.student_message(example))
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(example["solution"], add_special_tokens=False)["input_ids"]
    completion_ids = completion_ids + [tokenizer.eos_token_id]
    return prompt_ids, completion_ids[:max_new_tokens]


def reference_rows(run, examples):
    """SFT's rows: each problem's prompt and reference solution (`encode`). Says once a run how
    many solutions were cut at --max-new-tokens, and counts them all in state["cut_solutions"]."""
    tokenizer, max_new_tokens, state = run.tokenizer, run.args.max_new_tokens, run.state
    rows = [encode(tokenizer, example, max_new_tokens) for example in examples]
    num_cut = common.global_sum(sum(completion[-1] != tokenizer.eos_token_id
                                    for _, completion in rows))  # of all ranks
    if num_cut and not state.get("cut_solutions"):  # said once a run
        print(f"note: {num_cut} of {common.global_sum(len(rows))} solutions of step "
              f"{run.step + 1} do not fit in --max-new-tokens {max_new_tokens} with their "
              "EOS: cut there and trained without EOS (summary.json counts them all)")
    state["cut_solutions"] = state.get("cut_solutions", 0) + num_cut
    return rows


def sft_batches(rows, micro_batch_size, tokenizer, device):
    """SFT's rows (prompt ids, completion ids) as training batches (`engine.pack`), micro_batch_size
    rows each, similar lengths together (less padding)."""
    rows = sorted(rows, key=lambda row: len(row[0]) + len(row[1]))
    return [batch for _, batch in common.training_batches(
        [prompt for prompt, _ in rows], [completion for _, completion in rows],
        list(range(len(rows))), micro_batch_size, tokenizer, device)]


def sft_gradient(run, rows):
    """The gradient of `sft_loss` over the step's rows (prompt ids, completion ids), backward a
    micro-batch at a time; the normaliser counts the whole step on all ranks, so the micro-batches'
    gradients add up to the step's. Returns (the loss, summed over ranks; this rank's training
    tokens). The log-probabilities are `common.textbook_logprobs`, computed by
    `engine.token_logprobs` a chunk of positions at a time."""
    num_target_tokens = common.global_sum(sum(len(completion) for _, completion in rows))
    loss_sum, train_tokens = 0.0, 0
    for batch in sft_batches(rows, run.args.micro_batch_size, run.tokenizer, run.model.device):
        logprobs = engine.token_logprobs(run.model, batch, chunk_size=run.args.chunk_size)  # [B, T]
        loss = sft_loss(logprobs, batch["completion_mask"], num_target_tokens)
        loss.backward()  # gradients add up over micro-batches into the step's token mean
        loss_sum += loss.item()
        train_tokens += common.batch_tokens(batch)
    return common.global_sum(loss_sum), train_tokens


# ----------------------------------------------------------------------------------------------
# The algorithm


def main(argv=None):
    args = parse_args(argv)
    run = common.start_run(args, first_inputs)  # shows what the model sees and is trained on
    while run.step < args.steps:
        examples = common.next_batch(run)
        # The step's rows (prompt ids, completion ids): the reference solutions, or with
        # --rejection-sampling the model's own correct samples (RFT; with --orpo-lambda in pairs).
        rows, metrics = (rejection_sampled_rows(run, examples) if args.rejection_sampling
                         else (reference_rows(run, examples), {}))
        # The loss's gradient, a micro-batch at a time: SFT's token mean (or ORPO's).
        loss, train_tokens = (orpo_gradient(run, rows, metrics) if args.orpo_lambda
                              else sft_gradient(run, rows))
        grad_norm = common.optimizer_step(run)
        common.end_step(run, {**metrics, "loss": loss, "grad_norm": grad_norm}, train_tokens)
    common.finish_run(run, cut_solutions=run.state.get("cut_solutions"))


def first_inputs(run, example):
    """For common.show_inputs: the prompt and what SFT trains on after it, the reference solution
    (`encode`), or with --rejection-sampling a sample (None: show_inputs samples one)."""
    prompt = common.student_prompts(run.tokenizer, [example])[0]
    return {"policy": prompt}, None if run.args.rejection_sampling else \
        encode(run.tokenizer, example, run.args.max_new_tokens)[1]


# ----------------------------------------------------------------------------------------------
# The variants: rejection sampling (RFT) and ORPO


def judged_samples(run, examples):
    """Rejection sampling: K completions per question from the current model, judged by their
    final answers. Each distinct completion of a question counts once.

    Returns (correct, wrong, num_correct): correct[q] the correct completions of question q that
    finished (ended in an end token: a cut one is not a whole solution), wrong[q] its wrong ones,
    as rows (prompt ids, completion ids) like `encode`'s, with the sampled token ids themselves (no
    re-tokenisation of the text); num_correct counts every correct sample.
    """
    samples_per_question = run.args.rejection_sampling
    prompts = common.student_prompts(run.tokenizer, examples)
    rollouts = common.sample_rollouts(run, run.model, prompts, samples_per_question)
    is_correct = common.judge(rollouts["texts"], examples, samples_per_question).tolist()  # [N]
    prompts, completions = rollouts["prompts"], rollouts["completions"]
    correct, wrong = [[] for _ in examples], [[] for _ in examples]
    seen = set()
    for i, text in enumerate(rollouts["texts"]):
        question = i // samples_per_question
        if (question, text) in seen or (is_correct[i] and not rollouts["finished"][i]):
            continue
        seen.add((question, text))
        (correct if is_correct[i] else wrong)[question].append((prompts[i], completions[i]))
    return correct, wrong, sum(is_correct)


def rejection_sampled_rows(run, examples):
    """RFT's rows: the correct samples of each question (`judged_samples`); with --orpo-lambda
    ORPO's: each correct sample with a wrong one of its question, the two rows adjacent.
    Returns (rows, metrics for the log)."""
    correct, wrong, num_correct = judged_samples(run, examples)
    if run.args.orpo_lambda:
        rows = [row for question_correct, question_wrong in zip(correct, wrong)
                for pair in zip(question_correct, question_wrong) for row in pair]
    else:
        rows = [row for question_correct in correct for row in question_correct]
    return rows, {"correct_fraction": common.global_mean(
                      num_correct / (len(examples) * run.args.rejection_sampling)),
                  "kept": common.global_sum(len(rows))}  # distinct samples trained on


def log_odds(mean_logprobs):
    """log(p / (1 - p)) of p = exp(mean_logprobs) <= 1, with log(1 - p) computed without loss:
    log(-expm1(x)) near x = 0 and log1p(-exp(x)) below -log 2 (Maechler 2012, "Accurately
    computing log(1 - exp(-|a|))"). x is capped at -1e-6: at p = 1 the odds are infinite."""
    x = mean_logprobs.clamp(max=-1e-6)
    log_one_minus_p = torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))
    return x - log_one_minus_p


def orpo_loss(chosen_logprobs, chosen_mask, rejected_logprobs, rejected_mask, num_target_tokens,
              num_pairs, orpo_lambda):
    """ORPO, Hong et al. 2024 (arXiv 2403.07691), eq. 6-7: SFT on the chosen completion plus an
    odds-ratio term that pushes the chosen one's odds above the rejected one's:

        L = NLL(chosen) - lambda * log sigmoid(log odds(chosen) - log odds(rejected))
        odds(y) = p(y) / (1 - p(y)),  p(y) = exp(mean over t of log p(y_t | x, y_<t))

    [B, T] log-probs and masks of B pairs (row i of each is one pair). NLL is `sft_loss` over the
    step's chosen tokens (num_target_tokens), the odds-ratio term a mean over the step's pairs.
    Returns (loss, the pairs' log odds ratios [B] for the log).
    """
    def mean_logprob(logprobs, mask):  # [B]: length-normalised, as in the paper
        return (logprobs * mask).sum(1) / mask.sum(1).clamp(min=1)
    log_odds_ratio = (log_odds(mean_logprob(chosen_logprobs, chosen_mask))
                      - log_odds(mean_logprob(rejected_logprobs, rejected_mask)))  # [B]
    odds_term = -F.logsigmoid(log_odds_ratio).sum() / num_pairs
    return (sft_loss(chosen_logprobs, chosen_mask, num_target_tokens) + orpo_lambda * odds_term,
            log_odds_ratio.detach())


def orpo_gradient(run, rows, metrics):
    """The gradient of `orpo_loss` over rows that alternate chosen, rejected (a micro-batch holds
    whole pairs), as `sft_gradient`; adds the pairs' mean log odds ratio to `metrics` (above 0: the
    chosen samples are the likelier ones, in odds). Returns (the loss, this rank's training tokens)."""
    args, model = run.args, run.model
    micro_batch_size = max(2, args.micro_batch_size // 2 * 2)  # whole pairs
    num_target_tokens = common.global_sum(sum(len(completion) for _, completion in rows[0::2]))
    num_pairs = common.global_sum(len(rows) // 2)
    loss_sum, train_tokens, log_odds_ratios = 0.0, 0, []
    for _, batch in common.training_batches([prompt for prompt, _ in rows],
                                            [completion for _, completion in rows],
                                            list(range(len(rows))), micro_batch_size,
                                            run.tokenizer, model.device):
        logprobs = engine.token_logprobs(model, batch, chunk_size=args.chunk_size)  # [B, T]
        mask = batch["completion_mask"]
        loss, ratios = orpo_loss(logprobs[0::2], mask[0::2], logprobs[1::2], mask[1::2],
                                 num_target_tokens, num_pairs, args.orpo_lambda)
        loss.backward()
        loss_sum += loss.item()
        train_tokens += common.batch_tokens(batch)
        log_odds_ratios += ratios.tolist()
    metrics["log_odds_ratio"] = common.global_mean(sum(log_odds_ratios) / max(1, len(log_odds_ratios)))
    return common.global_sum(loss_sum), train_tokens


# ----------------------------------------------------------------------------------------------
# The command line


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(parser)
    parser.add_argument("--rejection-sampling", type=int, default=0, metavar="K",
                        help="train on the correct ones of K samples per question from the "
                             "current model instead of the references (0: plain SFT)")
    parser.add_argument("--orpo-lambda", type=float, nargs="?", const=0.1, default=0.0,
                        metavar="L", help="with --rejection-sampling: ORPO on pairs of a correct "
                                          "and a wrong sample, odds-ratio weight L (the flag "
                                          "alone: 0.1; 0: off)")
    args = common.parse_args(parser, argv, DEFAULTS, TOY_SETTINGS, ranges={
        "rejection_sampling": (lambda v: v >= 0, "at least 0 (0: plain SFT)"),
        "orpo_lambda": (lambda v: v >= 0, "at least 0 (0: off)")})
    if args.rejection_sampling and args.temperature <= 0:
        raise common.InputError("--rejection-sampling needs --temperature > 0 (K greedy samples "
                                "would all be the same)")
    if args.orpo_lambda and args.rejection_sampling < 2:
        raise common.InputError("--orpo-lambda needs --rejection-sampling K >= 2: its pairs are a "
                                "correct and a wrong sample of one question")
    args.method = "orpo" if args.orpo_lambda else "rft" if args.rejection_sampling else "sft"
    args.out = args.out or f"out/{args.method}"
    args.micro_batch_size = args.micro_batch_size or args.batch_size * max(1, args.rejection_sampling)
    return args


if __name__ == "__main__":
    common.run_cli(main)
