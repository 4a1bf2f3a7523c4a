"""Evaluation metrics (pass@k, maj@k, ...), `python toy/evaluate.py` and `toy/compare.py`."""
import json
import math
import statistics
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import torch

import common
import sft

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "toy"))
import compare  # noqa: E402  toy/compare.py
import evaluate  # noqa: E402  toy/evaluate.py


@pytest.mark.parametrize("n", range(1, 11))
def test_pass_at_k_equals_the_binomial_formula(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            expected = 1 - math.comb(n - c, k) / math.comb(n, k)  # math.comb(a, b) = 0 for b > a
            assert common.pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)
        assert common.pass_at_k(n, c, 1) == pytest.approx(c / n)
        assert common.pass_at_k(n, 0, min(n, 3)) == 0.0


def test_pass_at_k_is_one_when_every_choice_of_k_holds_a_correct_sample():
    assert common.pass_at_k(8, 5, 4) == 1.0  # n - c = 3 < k = 4
    assert common.pass_at_k(8, 1, 8) == 1.0
    assert common.pass_at_k(8, 4, 4) < 1.0
    # Large n, where C(n, k) does not fit in a float: the product form against exact fractions.
    exact = 1 - Fraction(math.comb(4990, 100), math.comb(5000, 100))
    assert common.pass_at_k(5000, 10, 100) == pytest.approx(float(exact), rel=1e-9)


def test_majority_vote_ties_go_to_the_first_answer_and_none_never_votes():
    assert common.majority_vote(["3", "4", "4", "5"]) == "4"
    assert common.majority_vote(["3", "4", "4", "3"]) == "3"  # tie 2-2: "3" came first
    assert common.majority_vote(["4", "3", "3", "4"]) == "4"
    assert common.majority_vote([None, None, None, "7"]) == "7"  # unreadable answers do not win
    assert common.majority_vote([None, None]) is None


def test_sample_metrics_on_a_hand_counted_case():
    # Problem 1 (answer 2): 2 of 4 correct, vote "2". Problem 2 (answer 8): 1 of 4, vote "7".
    # Problem 3 (answer 5): 3 of 4 correct.
    answers = [["1", "2", "2", None], ["7", "7", "8", "9"], ["5", "5", None, "5"]]
    metrics = common.sample_metrics(answers, ["2", "8", "5"])
    assert metrics["mean@4"] == pytest.approx((2 + 1 + 3) / 12)
    assert metrics["pass@1"] == pytest.approx(metrics["mean@4"])
    # pass@2 per problem: 1 - C(4 - c, 2) / C(4, 2) = 1 - {1, 3, 0} / 6
    assert metrics["pass@2"] == pytest.approx((5 / 6 + 3 / 6 + 1) / 3)
    assert metrics["pass@4"] == 1.0
    assert metrics["maj@4"] == pytest.approx(2 / 3)  # problems 1 and 3
    assert metrics["more_than_half@4"] == pytest.approx(1 / 3)  # only problem 3: 2 of 4 is not more
    assert metrics["format@4"] == pytest.approx(10 / 12)  # two samples had no final answer


def test_evaluate_with_samples_keeps_greedy_accuracy_and_orders_the_metrics(toy):
    model, tokenizer = toy
    examples = common.load_examples("toy", "test")[:24]
    greedy = common.evaluate(model, tokenizer, examples, 64, batch_size=16)
    torch.manual_seed(0)
    sampled = common.evaluate(model, tokenizer, examples, 64, batch_size=16, k=4, temperature=0.7)
    assert sampled["accuracy"] == greedy["accuracy"] and sampled["n"] == 24 and sampled["k"] == 4
    assert 0 < sampled["mean@4"] == sampled["pass@1"] <= sampled["pass@2"] <= sampled["pass@4"] < 1
    # More than half of the samples correct means the correct answer wins the vote.
    assert sampled["more_than_half@4"] <= sampled["maj@4"] <= sampled["pass@4"]


def test_eval_command_writes_the_metrics_of_a_model_and_adapter(toy, tmp_path):
    import lora
    model, tokenizer = toy
    adapted = common.load_model("toy")[0]
    lora.apply_lora(adapted, r=4, alpha=8)
    torch.manual_seed(1)
    for layer in lora.lora_layers(adapted):
        torch.nn.init.normal_(layer.lora_B.weight, std=0.05)  # an adapter that changes the outputs
    lora.save_lora(adapted, tmp_path / "adapter")
    evaluate.main(["--adapter", str(tmp_path / "adapter"), "--eval-n", "16", "--eval-k", "2"])
    result = json.loads((tmp_path / "adapter" / "eval.json").read_text())
    examples = common.load_examples("toy", "test")[:16]
    expected = common.evaluate(adapted, tokenizer, examples, 64)["accuracy"]
    assert result["accuracy"] == expected and result["n"] == 16 and result["k"] == 2
    assert {"mean@2", "pass@2", "maj@2", "more_than_half@2"} <= set(result)
    # The base model on a local JSONL file (real GSM8K records): all of its records by default.
    fixture = str(Path(__file__).parent / "fixtures" / "gsm8k_sample.jsonl")
    evaluate.main(["--data", fixture, "--eval-k", "0", "--out", str(tmp_path / "base")])
    base = json.loads((tmp_path / "base" / "eval.json").read_text())
    records = common.read_records(fixture)
    assert base["n"] == len(records) and "mean@2" not in base
    assert base["accuracy"] == common.evaluate(model, tokenizer, records, 64)["accuracy"]


def test_evaluate_with_the_teacher_view_shows_the_reference_solution(toy, tmp_path):
    model, tokenizer = toy
    evaluate.main(["--view", "teacher", "--eval-n", "16", "--eval-k", "0", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "eval.json").read_text())
    examples = common.load_examples("toy", "test")[:16]
    teacher = common.evaluate(model, tokenizer, examples, 64, message=lambda e: common.solution_prompt(
        e["question"], e["solution"]))
    assert result["view"] == "teacher" and result["correct"] == teacher["correct"]
    assert result["accuracy"] > common.evaluate(model, tokenizer, examples, 64)["accuracy"]


def fake_run(folder, method, before, after, generated_tokens, curve, args=None):
    folder.mkdir()
    summary = {"method": method, "before": before, "after": after, "steps": 10,
               "train_tokens": 1000, "generated_tokens": generated_tokens, "wall_seconds": 70.0,
               "eval_seconds": 20.0, **({"args": args} if args else {})}
    (folder / "summary.json").write_text(json.dumps(summary))
    rows = [{"step": step, "loss": 1.0, "generated_tokens": tokens, **({"eval_accuracy": accuracy}
             if accuracy is not None else {})} for step, (tokens, accuracy) in enumerate(curve, 1)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(folder)


def test_compare_prints_mean_and_spread_over_seeds(tmp_path, capsys):
    before = {"accuracy": 0.4, "n": 100, "k": 8, "mean@8": 0.3, "pass@8": 0.7, "maj@8": 0.4}
    runs = [fake_run(tmp_path / "a0", "alpha", before,
                     {"accuracy": 0.50, "n": 100, "k": 8, "mean@8": 0.45, "pass@8": 0.80,
                      "maj@8": 0.50}, 3000, [(1000, None), (2000, 0.45)]),
            fake_run(tmp_path / "a1", "alpha", before,
                     {"accuracy": 0.60, "n": 100, "k": 8, "mean@8": 0.55, "pass@8": 0.90,
                      "maj@8": 0.60}, 5000, [(2500, 0.5)]),
            fake_run(tmp_path / "b0", "beta", before, {"accuracy": 0.7, "format": 0.9, "n": 100},
                     0, [(0, 0.6)])]
    plot = tmp_path / "compare.png"
    compare.main([*runs, "--plot", str(plot)])
    lines = capsys.readouterr().out.splitlines()
    table = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]]
             for line in lines if line.startswith("| ")}
    header = table["method"]
    alpha = dict(zip(header, table["alpha"]))
    assert alpha["runs"] == "2" and table["beta"][0] == "1"
    sd = statistics.stdev([50.0, 60.0])
    assert alpha["greedy accuracy (%)"] == f"55.0 ± {sd:.1f}"
    assert alpha["mean@8 (%)"] == f"50.0 ± {sd:.1f}" and alpha["maj@8 (%)"] == f"55.0 ± {sd:.1f}"
    assert alpha["generated tokens"] == f"4,000 ± {statistics.stdev([3000, 5000]):,.0f}"
    assert alpha["wall time w/o eval (s)"] == "50 ± 0"  # wall 70 s less 20 s of evaluation
    beta = dict(zip(header, table["beta"]))
    assert beta["greedy accuracy (%)"] == "70.0" and beta["pass@8 (%)"] == "–"
    assert beta["greedy format (%)"] == "90.0" and alpha["greedy format (%)"] == "–"
    base = dict(zip(header, table["base (before)"]))
    assert base["runs"] == "3" and base["greedy accuracy (%)"] == "40.0 ± 0.0"
    assert plot.stat().st_size > 1000  # matplotlib: requirements-dev.txt


def test_compare_plot_without_matplotlib_stops_in_one_line(tmp_path, monkeypatch):
    before = {"accuracy": 0.4, "n": 100}
    run = fake_run(tmp_path / "a0", "alpha", before, before, 0, [(0, None)])
    real_find_spec = compare.importlib.util.find_spec
    monkeypatch.setattr(compare.importlib.util, "find_spec",
                        lambda name: None if name == "matplotlib" else real_find_spec(name))
    with pytest.raises(common.InputError, match="--plot needs matplotlib"):
        compare.main([run, "--plot", str(tmp_path / "compare.png")])
    compare.main([run])  # the table alone needs no matplotlib


def test_compare_groups_runs_by_the_settings_that_differ_not_by_seed(tmp_path, capsys):
    before = {"accuracy": 0.4, "n": 100}
    runs = [fake_run(tmp_path / f"r{i}", "sft", before, {"accuracy": accuracy, "n": 100}, 0,
                     [(0, None)], {"steps": steps, "lr": 1e-3, "seed": seed, "out": f"r{i}"})
            for i, (steps, seed, accuracy) in enumerate([(1, 0, 0.4), (2, 0, 0.5), (2, 1, 0.7)])]
    compare.main([*runs, "--plot", str(tmp_path / "compare.png")])
    table = {line.split("|")[1].strip(): line.split("|")[2].strip()
             for line in capsys.readouterr().out.splitlines() if line.startswith("| ")}
    assert table["sft --steps 1"] == "1" and table["sft --steps 2"] == "2"  # runs in each group
    # Each seed from its own checkpoint: --ignore model puts them in one group, by the steps only.
    runs = [fake_run(tmp_path / f"m{i}", "grpo", before, {"accuracy": 0.5, "n": 100}, 0,
                     [(0, None)], {"model": f"out/first-{seed}/merged", "steps": steps,
                                   "seed": seed})
            for i, (seed, steps) in enumerate([(1, 6), (2, 6), (1, 12)])]
    compare.main([*runs, "--ignore", "model", "--plot", str(tmp_path / "compare.png")])
    table = {line.split("|")[1].strip(): line.split("|")[2].strip()
             for line in capsys.readouterr().out.splitlines() if line.startswith("| ")}
    assert table["grpo --steps 6"] == "2" and table["grpo --steps 12"] == "1"


def test_compare_takes_sampled_metrics_from_a_later_evaluation_of_the_same_model(tmp_path, capsys):
    greedy_only = {"accuracy": 0.4, "format": 1.0, "n": 100}
    run = fake_run(tmp_path / "a0", "alpha", greedy_only, {"accuracy": 0.5, "format": 1.0, "n": 100},
                   3000, [(1000, 0.45)])
    for folder, accuracy, mean in [(tmp_path / "a0", 0.5, 0.42), (tmp_path / "base", 0.4, 0.3)]:
        folder.mkdir(exist_ok=True)
        (folder / "eval.json").write_text(json.dumps(
            {"accuracy": accuracy, "format": 1.0, "n": 100, "k": 4, "mean@4": mean, "pass@4": 0.7,
             "maj@4": 0.45, "format@4": 0.9}))
    compare.main([run, "--base", str(tmp_path / "base"), "--plot", str(tmp_path / "plot.png")])
    table = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]]
             for line in capsys.readouterr().out.splitlines() if line.startswith("| ")}
    alpha = dict(zip(table["method"], table["alpha"]))
    base = dict(zip(table["method"], table["base (before)"]))
    assert (alpha["greedy accuracy (%)"], alpha["mean@4 (%)"], alpha["format@4 (%)"]) == ("50.0", "42.0", "90.0")
    assert (base["greedy accuracy (%)"], base["mean@4 (%)"]) == ("40.0", "30.0")
    # toy/evaluate.py --adapter CHECKPOINT writes eval.json into the final checkpoint: read there.
    checkpoint = tmp_path / "a0" / "checkpoint-000010"  # the run's final step: summary's "steps"
    checkpoint.mkdir()
    (tmp_path / "a0" / "eval.json").rename(checkpoint / "eval.json")
    compare.main([run, "--base", str(tmp_path / "base")])
    table = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]]
             for line in capsys.readouterr().out.splitlines() if line.startswith("| ")}
    assert dict(zip(table["method"], table["alpha"]))["mean@4 (%)"] == "42.0"
    (checkpoint / "eval.json").rename(tmp_path / "a0" / "eval.json")
    # An eval.json whose greedy accuracy is not the run's evaluated another model: refused.
    with pytest.raises(common.InputError, match="another model"):
        compare.main([run, "--base", str(tmp_path / "a0")])
    with pytest.raises(common.InputError, match="no eval.json"):
        compare.main([run, "--base", str(tmp_path)])


def test_compare_gives_paired_changes_with_95_percent_intervals(tmp_path, capsys):
    before = {"accuracy": 0.5, "n": 4, "correct": [1, 0, 1, 0]}
    runs = [fake_run(tmp_path / "a0", "alpha", before, {"accuracy": 0.75, "n": 4,
                                                       "correct": [1, 1, 1, 0]}, 0, [(0, None)]),
            fake_run(tmp_path / "a1", "alpha", before, {"accuracy": 0.5, "n": 4,
                                                       "correct": [1, 1, 0, 0]}, 0, [(0, None)]),
            fake_run(tmp_path / "b0", "beta", before, {"accuracy": 0.25, "n": 4,
                                                      "correct": [0, 0, 1, 0]}, 0, [(0, None)])]
    compare.main([*runs, "--plot", str(tmp_path / "compare.png")])
    table = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]]
             for line in capsys.readouterr().out.splitlines() if line.startswith("| ")}
    change = "change vs base (points, 95%)"
    alpha, beta = (dict(zip(table["method"], table[name])) for name in ("alpha", "beta"))

    def expected(differences):  # by hand: mean and 1.96 sd / sqrt(n) of per-problem differences
        half = 1.96 * statistics.stdev(differences) / math.sqrt(len(differences))
        return f"{100 * statistics.mean(differences):+.1f} ± {100 * half:.1f}"
    # alpha's two seeds average to [1, 1, 0.5, 0] per problem, against the base's [1, 0, 1, 0]
    assert alpha[change] == expected([0, 1, -0.5, 0])
    assert beta[change] == expected([-1, 0, 0, 0])
    assert table["alpha - beta"] == [expected([1, 1, -0.5, 0])]
    assert dict(zip(table["method"], table["base (before)"]))[change] == "–"


def test_runs_without_a_before_evaluation_are_compared_with_the_base_evaluation(tmp_path, capsys):
    out = tmp_path / "sft"
    sft.main(["--steps", "1", "--eval-n", "4", "--no-eval-before", "--out", str(out)])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["before"] is None and len(summary["after"]["correct"]) == 4
    with pytest.raises(common.InputError, match="give --base"):
        compare.main([str(out)])
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "eval.json").write_text(json.dumps(
        {**summary["after"], "correct": [1 - c for c in summary["after"]["correct"]],
         "accuracy": 1 - summary["after"]["accuracy"]}))  # the base solved just the others
    compare.main([str(out), "--base", str(tmp_path / "base"), "--plot", str(tmp_path / "p.png")])
    table = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]]
             for line in capsys.readouterr().out.splitlines() if line.startswith("| ")}
    after = summary["after"]["correct"]
    differences = [2 * c - 1 for c in after]  # +1 where the run is right, -1 where the base is
    half = 1.96 * statistics.stdev(differences) / 2
    assert dict(zip(table["method"], table["sft"]))["change vs base (points, 95%)"] == \
        f"{100 * statistics.mean(differences):+.1f} ± {100 * half:.1f}"


def test_compare_names_a_folder_without_a_summary(tmp_path):
    with pytest.raises(common.InputError, match="no summary.json"):
        compare.main([str(tmp_path)])


def test_eval_command_takes_the_adapters_base_model_or_names_it(tmp_path, capsys):
    import lora
    adapted = common.load_model("toy")[0]
    lora.apply_lora(adapted, r=4, alpha=8)
    lora.save_lora(adapted, tmp_path / "adapter", base_model=common.model_folder("toy"))
    evaluate.main(["--adapter", str(tmp_path / "adapter"), "--eval-n", "4", "--eval-k", "0"])
    assert "toy settings:" in capsys.readouterr().out  # the toy's base: the toy and its settings
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    config["target_modules"] = ["q_proj"]  # the keys of another model's adapter
    config["base_model_name_or_path"] = "models/another"
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(common.InputError, match="does not fit --model toy: its adapter_config.json "
                                                "names models/another as its base"):
        evaluate.main(["--model", "toy", "--adapter", str(tmp_path / "adapter"), "--eval-n", "4"])


def test_eval_command_names_a_folder_that_is_not_an_adapter(tmp_path):
    with pytest.raises(common.InputError, match="no adapter_config.json"):
        evaluate.main(["--adapter", str(tmp_path)])


def test_sampled_evaluation_does_not_change_the_training_run(tmp_path):
    import grpo
    quick = ["--steps", "2", "--batch-size", "2", "--num-generations", "4", "--eval-n", "4",
             "--max-new-tokens", "40"]
    grpo.main(quick + ["--out", str(tmp_path / "plain")])
    grpo.main(quick + ["--eval-k", "4", "--eval-every", "1", "--out", str(tmp_path / "evaluated")])

    def rows(name):
        return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    assert "eval_accuracy" in rows("evaluated")[0]  # it did sample and evaluate in between
    summary = json.loads((tmp_path / "evaluated" / "summary.json").read_text())
    # The training seconds at the evaluation leave out the evaluations before it ("before" included).
    train_seconds = rows("evaluated")[0]["train_seconds"]
    assert 0 < train_seconds < summary["wall_seconds"] - summary["eval_seconds"]
    for plain, evaluated in zip(rows("plain"), rows("evaluated"), strict=True):
        for key in ["reward", "loss", "grad_norm", "generated_tokens"]:
            assert plain[key] == evaluated[key], key
    assert summary["before"]["k"] == 4 and "mean@4" in summary["after"]


def test_the_eval_command_takes_the_scripts_toy_settings(monkeypatch):
    seen = []
    monkeypatch.setattr(evaluate, "evaluate_model", seen.append)
    evaluate.main([])  # the toy: short answers, the scripts' evaluation batch and temperature
    evaluate.main(["--model", "some/model"])  # a real model: the flags' defaults
    assert [(args.max_new_tokens, args.eval_batch_size, args.eval_temperature) for args in seen] \
        == [(64, 256, 0.7), (1024, 64, 1.0)]
