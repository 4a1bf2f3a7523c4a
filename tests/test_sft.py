import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import common
import sft

FIXTURE = Path(__file__).parent / "fixtures" / "gsm8k_sample.jsonl"
QUICK = ["--batch-size", "8", "--eval-n", "8", "--eval-batch-size", "8", "--max-new-tokens", "40"]


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_loss_ignores_prompt_positions_and_counts_completion_ones():
    torch.manual_seed(0)
    logprobs = -torch.rand(3, 10)
    completion_mask = torch.zeros(3, 10, dtype=torch.long)
    completion_mask[:, 6:] = 1
    loss = sft.sft_loss(logprobs, completion_mask, num_target_tokens=12)
    changed_prompt = logprobs.clone()
    changed_prompt[:, :6] = -torch.rand(3, 6) * 50  # other targets at prompt positions
    assert torch.equal(sft.sft_loss(changed_prompt, completion_mask, 12), loss)
    changed_completion = logprobs.clone()
    changed_completion[0, 7] -= 1.0
    assert torch.isclose(sft.sft_loss(changed_completion, completion_mask, 12), loss + 1 / 12)
    assert torch.isclose(loss, -logprobs[:, 6:].sum() / 12)


def test_encode_appends_eos_and_hides_the_solution(toy):
    _, tokenizer = toy
    example = common.load_examples("toy", "test")[0]
    prompt_ids, completion_ids = sft.encode(tokenizer, example, max_new_tokens=64)
    assert completion_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(completion_ids[:-1]) == example["solution"]
    assert example["solution"] not in tokenizer.decode(prompt_ids)


def test_a_solution_cut_by_max_new_tokens_gets_no_eos(toy, tmp_path, capsys):
    """An EOS after the cut would teach the model to stop in the middle of a solution."""
    _, tokenizer = toy
    example = common.load_examples("toy", "test")[0]
    length = len(tokenizer(example["solution"], add_special_tokens=False)["input_ids"])
    _, fits = sft.encode(tokenizer, example, max_new_tokens=length + 1)  # solution + EOS
    assert fits[-1] == tokenizer.eos_token_id and len(fits) == length + 1
    _, cut = sft.encode(tokenizer, example, max_new_tokens=length)
    assert tokenizer.decode(cut) == example["solution"]  # all of it, but no EOS: it was cut
    _, cut = sft.encode(tokenizer, example, max_new_tokens=5)
    assert len(cut) == 5 and tokenizer.eos_token_id not in cut
    # A run says so once, and counts every cut solution in summary.json.
    sft.main(QUICK + ["--steps", "2", "--max-new-tokens", "12", "--out", str(tmp_path)])
    assert capsys.readouterr().out.count("do not fit in --max-new-tokens 12") == 1
    assert json.loads((tmp_path / "summary.json").read_text())["cut_solutions"] == 16


def test_accumulation_normalises_by_the_tokens_of_the_whole_step(tmp_path):
    """Micro-batches of 2 must give the loss and gradient norm of one batch of 8."""
    whole, micro = tmp_path / "whole", tmp_path / "micro"
    sft.main(QUICK + ["--steps", "1", "--out", str(whole)])
    sft.main(QUICK + ["--steps", "1", "--out", str(micro), "--micro-batch-size", "2"])
    a, b = metrics(whole)[0], metrics(micro)[0]
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def test_short_run_lowers_loss_and_writes_outputs(tmp_path):
    """On real GSM8K records, new to the toy model, a few steps must lower the loss clearly."""
    out = tmp_path / "run"
    sft.main(QUICK + ["--steps", "24", "--lr", "2e-3", "--out", str(out), "--data", str(FIXTURE)])
    losses = [row["loss"] for row in metrics(out)]
    assert len(losses) == 24
    assert sum(losses[-6:]) / 6 < 0.8 * sum(losses[:6]) / 6
    row = metrics(out)[0]
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_second"} <= set(row)
    summary = json.loads((out / "summary.json").read_text())
    for key in ("before", "after"):
        assert set(summary[key]) == {"accuracy", "format", "n", "correct"}
        assert summary[key]["n"] == 3 == len(summary[key]["correct"])  # 10% of 38
    assert summary["steps"] == 24 and summary["train_tokens"] > 0 and summary["generated_tokens"] == 0
    assert summary["wall_seconds"] > 0
    checkpoint = common.latest_checkpoint(out)
    assert checkpoint.name == "checkpoint-000024"
    assert (checkpoint / "adapter_model.safetensors").exists()
    assert json.loads((checkpoint / "state.json").read_text())["data_position"] == 24 * 8


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path, crash_after):
    # dropout draws random numbers, so the RNG state must be restored too
    args = QUICK + ["--steps", "6", "--save-every", "2", "--lora-dropout", "0.1",
                    "--lr", "1e-3"]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    sft.main(args + ["--out", str(straight)])

    crash_after(5, sft.main, args + ["--out", str(broken)])
    assert common.latest_checkpoint(broken).name == "checkpoint-000004"
    assert len(metrics(broken)) == 5

    sft.main(args + ["--out", str(broken), "--resume"])
    assert [r["step"] for r in metrics(broken)] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(metrics(straight), metrics(broken)):
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"]
    adapter_a = load_file(common.latest_checkpoint(straight) / "adapter_model.safetensors")
    adapter_b = load_file(common.latest_checkpoint(broken) / "adapter_model.safetensors")
    assert all(torch.equal(adapter_a[k], adapter_b[k]) for k in adapter_a)
    summary_a = json.loads((straight / "summary.json").read_text())
    summary_b = json.loads((broken / "summary.json").read_text())
    assert summary_a["before"] == summary_b["before"] and summary_a["after"] == summary_b["after"]


def test_full_fine_tuning_saves_a_loadable_model(tmp_path):
    out = tmp_path / "full"
    sft.main(QUICK + ["--steps", "2", "--full", "--out", str(out)])
    checkpoint = common.latest_checkpoint(out)
    model, _ = common.load_model(str(checkpoint))
    base, _ = common.load_model("toy")
    changed = [not torch.equal(a, b) for a, b in zip(model.parameters(), base.parameters())]
    assert any(changed)


def fake_rollouts(tokenizer, prompts, texts, finished):
    """What common.sample_rollouts returns, for given completion texts (EOS where finished)."""
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    completions = [tokenizer(text, add_special_tokens=False)["input_ids"]
                   + ([tokenizer.eos_token_id] if done else []) for text, done in zip(texts, finished)]
    repeat = len(texts) // len(prompts)
    return {"prompts": [prompt_ids[i // repeat] for i in range(len(texts))],
            "completions": completions, "finished": finished, "texts": texts}


def test_rejection_sampling_keeps_correct_finished_distinct_samples(toy, monkeypatch):
    _, tokenizer = toy
    examples = common.load_examples("toy", "train")[:2]
    answers = [examples[0]["answer"], examples[1]["answer"]]
    texts = [f"x\n#### {answers[0]}", f"x\n#### {answers[0]}", f"y\n#### {answers[0]}", "#### -1",
             f"#### {answers[1]}", f"x\n#### {answers[0]}", f"z\n#### {answers[1]}", "no answer"]
    finished = [True, True, True, True, True, True, False, True]
    prompts = [common.chat_prompt(tokenizer, common.student_message(e)) for e in examples]
    monkeypatch.setattr(common, "sample_rollouts",
                        lambda *args: fake_rollouts(tokenizer, prompts, texts, finished))
    args = sft.parse_args(["--rejection-sampling", "4"])
    run = common.Run(args, None, tokenizer, [], [], None, None, step=0, state={})
    correct, wrong, num_correct = sft.judged_samples(run, examples)
    # Question 0: samples 0-3; 0 and 1 are the same text (kept once), 3 is wrong.
    # Question 1: samples 4-7; 5 has question 0's answer, 6 is right but never finished (neither
    # kept nor wrong), 7 has no answer.
    assert num_correct == 5

    def decoded(rows):
        return [tokenizer.decode(completion, skip_special_tokens=True) for _, completion in rows]
    assert [decoded(rows) for rows in correct] == [[texts[0], texts[2]], [texts[4]]]
    assert [decoded(rows) for rows in wrong] == [[texts[3]], [texts[5], texts[7]]]
    assert all(completion[-1] == tokenizer.eos_token_id for _, completion in correct[0] + correct[1])
    student_prompt = tokenizer(prompts[1], add_special_tokens=False)["input_ids"]
    assert correct[1][0][0] == student_prompt  # the question's own prompt, without the padding


def test_rejection_sampling_run_logs_samples_and_periodic_evaluation(tmp_path):
    out = tmp_path / "rft"
    sft.main(QUICK + ["--rejection-sampling", "4", "--steps", "3", "--batch-size", "6",
                      "--eval-every", "2", "--eval-k", "2", "--out", str(out)])
    rows = metrics(out)
    assert [("eval_accuracy" in row) for row in rows] == [False, True, False]
    assert all(0 <= row["kept"] <= row["correct_fraction"] * 6 * 4 for row in rows)
    assert sum(row["kept"] for row in rows) > 0  # the toy base solves about 40% of problems
    assert rows[-1]["generated_tokens"] > rows[0]["generated_tokens"] > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "rft" and summary["generated_tokens"] == rows[-1]["generated_tokens"]
    assert summary["after"]["k"] == 2 and 0 <= summary["after"]["pass@2"] <= 1
    assert 0 < summary["eval_seconds"] < summary["wall_seconds"]


def test_the_open_book_mixture_is_toy_only(tmp_path, monkeypatch):
    """sft.py has no toy-only flag and does not import opsd.py; toy/build.py writes the mixture as
    a data file whose open-book records give exactly OPSD's teacher prompt."""
    import subprocess
    import sys
    imported = subprocess.run([sys.executable, "-c", "import sft, sys; print('opsd' in sys.modules)"],
                              cwd=Path(__file__).parent.parent, capture_output=True, text=True)
    assert imported.stdout.strip() == "False"
    with pytest.raises(SystemExit):
        sft.parse_args(["--open-book-fraction", "0.45"])
    monkeypatch.syspath_prepend(str(Path(__file__).parent.parent / "toy"))
    import build
    import opsd
    monkeypatch.setattr(build, "PRETRAIN_DATA", tmp_path / "pretrain.jsonl")
    build.write_pretraining_mixture()
    mixture = common.load_examples(str(tmp_path / "pretrain.jsonl"), "all")
    train = common.load_examples("toy", "train")
    open_book = [(mixed, original) for mixed, original in zip(mixture, train)
                 if mixed["question"] != original["question"]]
    assert 0.43 < len(open_book) / len(train) < 0.47
    for mixed, original in open_book[:200]:
        assert common.student_message(mixed) == opsd.teacher_message("solution")(original)


def test_orpo_loss_matches_the_formula_in_float64():
    import math
    torch.manual_seed(0)
    logprobs = -torch.rand(4, 6) * 2
    logprobs[0, :] = -1e-5  # a chosen sample the model is almost sure of: p near 1
    mask = torch.ones(4, 6)
    mask[1, 4:] = 0
    mask[3, 5:] = 0
    chosen, rejected = logprobs[0::2], logprobs[1::2]  # pairs (0, 1) and (2, 3)
    loss, ratios = sft.orpo_loss(chosen, mask[0::2], rejected, mask[1::2], num_target_tokens=11,
                                 num_pairs=2, orpo_lambda=0.1)

    def log_odds(row):  # the obvious way, in float64
        tokens = [float(v) for v, m in zip(logprobs[row], mask[row]) if m]
        p = math.exp(sum(tokens) / len(tokens))
        return math.log(p / (1 - p))
    expected_ratios = [log_odds(0) - log_odds(1), log_odds(2) - log_odds(3)]
    nll = -float((logprobs[0::2] * mask[0::2]).sum()) / 11
    expected = nll + 0.1 * sum(math.log(1 + math.exp(-r)) for r in expected_ratios) / 2
    assert ratios.tolist() == pytest.approx(expected_ratios, rel=1e-5)
    assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_orpo_run_trains_on_pairs_of_a_correct_and_a_wrong_sample(tmp_path, monkeypatch):
    pair_batches = []
    real_loss = sft.orpo_loss

    def record(chosen_logprobs, *args):
        pair_batches.append(chosen_logprobs.shape[0])
        assert args[-1] == 0.1  # the flag alone: lambda 0.1, passed to the loss
        return real_loss(chosen_logprobs, *args)
    monkeypatch.setattr(sft, "orpo_loss", record)
    out = tmp_path / "orpo"
    sft.main(QUICK + ["--rejection-sampling", "4", "--orpo-lambda", "--steps", "2", "--batch-size",
                      "6", "--micro-batch-size", "3", "--out", str(out)])
    rows = metrics(out)
    assert sum(row["kept"] for row in rows) == 2 * sum(pair_batches) > 0  # whole pairs only
    assert max(pair_batches) == 1  # micro-batch 3 rounds down to one pair of 2 rows
    assert all("log_odds_ratio" in row for row in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "orpo" and summary["args"]["orpo_lambda"] == 0.1


def test_orpo_needs_rejection_sampling(monkeypatch):
    monkeypatch.setattr(common, "load_model", lambda *args, **kwargs: pytest.fail("loaded"))
    with pytest.raises(common.InputError, match="--orpo-lambda needs --rejection-sampling K >= 2"):
        sft.main(["--orpo-lambda", "0.2", "--out", "unused"])
