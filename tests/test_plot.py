"""`python toy/plot.py RUN...`: a run's curves, a panel per logged number, runs overlaid."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "toy"))
import common  # noqa: E402
import plot  # noqa: E402  toy/plot.py


def write_run(folder, rows, summary=None):
    folder.mkdir()
    (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    if summary:
        (folder / "summary.json").write_text(json.dumps(summary))
    return str(folder)


def test_the_curves_put_the_health_first_then_the_methods_own_numbers(tmp_path, capsys):
    grpo = write_run(tmp_path / "grpo", [
        {"step": step, "zero_std_fraction": 0.5, "reward": 0.1 * step, "loss": 0.0,
         "grad_norm": 0.2, "lr": 1e-3, "entropy": 0.9, "completion_length": 30.0,
         "truncated_fraction": 0.0, "update": "grpo", "tokens_per_second": 100}
        for step in range(1, 31)], {"steps": 30, "before": {"accuracy": 0.4},
                                    "after": {"accuracy": 0.6}})
    sft = write_run(tmp_path / "sft", [{"step": 1, "loss": 1.0, "grad_norm": 0.5, "lr": 1e-3}])
    assert plot.panel_names([plot.read_metrics(grpo), plot.read_metrics(sft)]) == [
        "loss", "reward", "eval_accuracy", "grad_norm", "entropy", "completion_length",
        "truncated_fraction", "zero_std_fraction"]  # no lr, tokens/s or text (update)
    accuracy = [(row["step"], row["eval_accuracy"]) for row in plot.read_metrics(grpo)
                if "eval_accuracy" in row]
    assert accuracy == [(0, 0.4), (30, 0.6)]  # before and after, from summary.json
    plot.main([grpo])
    assert (tmp_path / "grpo" / "curves.png").stat().st_size > 10_000
    assert "8 panels" in capsys.readouterr().out
    plot.main([grpo, sft, "--out", str(tmp_path / "both.png")])
    assert (tmp_path / "both.png").stat().st_size > 10_000


def test_a_folder_without_metrics_stops_in_one_line(tmp_path):
    with pytest.raises(common.InputError, match="no metrics.jsonl"):
        plot.main([str(tmp_path)])


def test_the_running_mean_averages_the_window_before_each_point():
    assert plot.running_mean([1, 2, 3, 4], 2) == [1, 1.5, 2.5, 3.5]
