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
import time

import torch
import torch.nn.functional as F

import common

# Only for the built-in 1M-parameter toy model, and only for flags not given on the command line.
TOY_SETTINGS = {"steps": 150, "batch_size": 32, "lr": 5e-4, "lora_r": 16, "lora_alpha": 32,
                "warmup_steps": 10, "temperature": 0.7}


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
    args = common.parse_args(parser, argv, TOY_SETTINGS, ranges={
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
    args.num_generations = args.rejection_sampling  # what common.sample_rollouts draws
    return args


def sft_loss(logprobs, completion_mask, num_target_tokens):
    """Token-mean negative log-likelihood of the completion tokens.

    logprobs [B, T]: log p of each completion token; completion_mask [B, T]: 1 on targets.
    Divides by num_target_tokens, the targets of the whole optimizer step, not of this micro-batch.
    """
    return -(logprobs * completion_mask).sum() / num_target_tokens


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


def encode(tokenizer, example, max_new_tokens):
    """(prompt ids, completion ids): the solution then EOS, or, if that is longer than
    max_new_tokens, the solution's first max_new_tokens tokens and no EOS (it does not end there)."""
    prompt = common.chat_prompt(tokenizer, common.student_message(example))
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(example["solution"], add_special_tokens=False)["input_ids"]
    completion_ids = completion_ids + [tokenizer.eos_token_id]
    return prompt_ids, completion_ids[:max_new_tokens]


def judged_samples(model, tokenizer, examples, args, state):
    """Rejection sampling: K completions per question from the current model, judged by their
    final answers. Each distinct completion of a question counts once.

    Returns (correct, wrong, num_correct): correct[q] the correct completions of question q that
    finished (ended in an end token: a cut one is not a whole solution), wrong[q] its wrong ones,
    as rows (prompt ids, completion ids) like `encode`'s, with the sampled token ids themselves (no
    re-tokenisation of the text); num_correct counts every correct sample.
    """
    rollouts = common.sample_rollouts(model, tokenizer, examples, args, state)
    prompts = common.unpadded(rollouts["prompt_ids"], rollouts["prompt_mask"])
    completions = common.unpadded(rollouts["completion_ids"], rollouts["completion_mask"])
    correct, wrong = [[] for _ in examples], [[] for _ in examples]
    seen, num_correct = set(), 0
    for i, text in enumerate(rollouts["texts"]):
        question = i // args.rejection_sampling
        is_correct = common.is_correct(text, examples[question]["answer"])
        num_correct += is_correct
        if (question, text) in seen or (is_correct and not rollouts["finished"][i]):
            continue
        seen.add((question, text))
        (correct if is_correct else wrong)[question].append((prompts[i], completions[i]))
    return correct, wrong, num_correct


def main(argv=None):
    args = parse_args(argv)
    model, tokenizer, train_examples, eval_examples, optimizer, scheduler, step, state = \
        common.start_run(args)
    metrics_file = common.open_metrics(args.out, step)
    device = common.device_of(model)
    model.train()
    loop_start, first_step, wall_before = time.time(), step, state["wall_seconds"]
    while step < args.steps:
        step_start = time.time()
        examples = common.next_batch(train_examples, args, state)
        if args.rejection_sampling:
            correct, wrong, num_correct = judged_samples(model, tokenizer, examples, args, state)
            if args.orpo_lambda:  # each correct sample with a wrong one of its question: adjacent
                rows = [row for question_correct, question_wrong in zip(correct, wrong)
                        for pair in zip(question_correct, question_wrong) for row in pair]
            else:
                rows = [row for question_correct in correct for row in question_correct]
            sampling = {"correct_fraction": common.global_mean(
                            num_correct / (len(examples) * args.rejection_sampling)),
                        "kept": common.global_sum(len(rows))}  # distinct samples trained on
        else:
            rows = [encode(tokenizer, example, args.max_new_tokens) for example in examples]
            sampling = {}
            num_cut = common.global_sum(sum(completion[-1] != tokenizer.eos_token_id
                                            for _, completion in rows))  # of all ranks
            if num_cut and not state.get("cut_solutions"):  # said once a run
                print(f"note: {num_cut} of {common.global_sum(len(rows))} solutions of step "
                      f"{step + 1} do not fit in --max-new-tokens {args.max_new_tokens} with their "
                      "EOS: cut there and trained without EOS (summary.json counts them all)")
            state["cut_solutions"] = state.get("cut_solutions", 0) + num_cut
        if not args.orpo_lambda:  # (ORPO keeps each pair's two rows together, in one micro-batch)
            rows.sort(key=lambda row: len(row[0]) + len(row[1]))  # similar lengths share micro-batches
        # The step's targets on all ranks (under torchrun): the loss is the mean over all of them.
        chosen = rows[0::2] if args.orpo_lambda else rows  # ORPO: rows alternate chosen, rejected
        num_target_tokens = common.global_sum(sum(len(completion) for _, completion in chosen))
        num_pairs = common.global_sum(len(rows) // 2)
        micro_batch_size = max(2, args.micro_batch_size // 2 * 2) if args.orpo_lambda \
            else args.micro_batch_size  # ORPO: whole pairs
        loss_sum, step_tokens, log_odds_ratios = 0.0, 0, []
        for first in range(0, len(rows), micro_batch_size):
            micro = rows[first:first + micro_batch_size]
            batch = common.pack([p for p, _ in micro], [c for _, c in micro],
                                tokenizer.pad_token_id, device)
            logprobs = common.token_logprobs(model, batch, chunk_size=args.chunk_size)  # [B, T]
            mask = batch["completion_mask"]
            if args.orpo_lambda:
                loss, ratios = orpo_loss(logprobs[0::2], mask[0::2], logprobs[1::2], mask[1::2],
                                         num_target_tokens, num_pairs, args.orpo_lambda)
                log_odds_ratios += ratios.tolist()
            else:
                loss = sft_loss(logprobs, mask, num_target_tokens)
            loss.backward()  # gradients add up over micro-batches into the step's token mean
            loss_sum += loss.item()
            step_tokens += int(batch["prompt_mask"].sum() + batch["completion_mask"].sum())
        grad_norm = common.optimizer_step(model, optimizer, scheduler, args.max_grad_norm)
        step += 1

        loss_sum, step_tokens = common.global_sum(loss_sum), common.global_sum(step_tokens)
        state["train_tokens"] += step_tokens
        state["wall_seconds"] = wall_before + time.time() - loop_start
        if args.orpo_lambda:  # above 0: the chosen samples are the likelier ones, in odds
            sampling["log_odds_ratio"] = common.global_mean(
                sum(log_odds_ratios) / max(1, len(log_odds_ratios)))
        common.log_step(metrics_file, {
            "step": step, **sampling, "loss": loss_sum, "lr": scheduler.get_last_lr()[0],
            "grad_norm": grad_norm, "generated_tokens": state["generated_tokens"],
            "tokens_per_second": round(step_tokens / (time.time() - step_start)),
            **common.periodic_evaluation(args, step, model, tokenizer, eval_examples, state),
        }, args.steps, (time.time() - loop_start) / (step - first_step))
        common.save_every(args, step, model, tokenizer, optimizer, scheduler, state)
    common.finish_run(args, model, tokenizer, optimizer, scheduler, step, state, eval_examples)


if __name__ == "__main__":
    common.run_cli(main)
