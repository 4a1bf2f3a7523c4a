"""toy/same_results.py, the refactor's check: two runs are the same when every metric but time and
every result in summary.json are equal, bit for bit."""
import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("same_results", REPO / "toy" / "same_results.py")
same_results = importlib.util.module_from_spec(spec)
spec.loader.exec_module(same_results)


def write_run(folder, rows, summary):
    folder.mkdir()
    (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / "summary.json").write_text(json.dumps(summary))


def test_runs_differ_in_any_metric_or_result_but_time(tmp_path):
    rows = [{"step": 1, "loss": 0.5, "tokens_per_second": 100}, {"step": 2, "loss": 0.25}]
    summary = {"after": {"accuracy": 0.6, "correct": [1, 0]}, "final_loss": 0.25, "wall_seconds": 9}
    write_run(tmp_path / "a", rows, summary)
    write_run(tmp_path / "b", [{**rows[0], "tokens_per_second": 120}, rows[1]],
              {**summary, "wall_seconds": 12})  # time alone differs: the same
    assert same_results.differences(tmp_path / "a", tmp_path / "b") == ([], [])
    write_run(tmp_path / "c", [rows[0], {**rows[1], "loss": 0.25000001, "gap": 0.0}], summary)
    failures, notes = same_results.differences(tmp_path / "a", tmp_path / "c")
    assert failures == ["step 2: loss 0.25 against 0.25000001"]
    assert notes == ["step 2: gap only in the working run"]
    write_run(tmp_path / "d", rows, {**summary, "after": {"accuracy": 0.6, "correct": [0, 1]}})
    assert same_results.differences(tmp_path / "a", tmp_path / "d")[0] == ["summary.json: after differs"]
    assert same_results.main(["--runs", str(tmp_path / "a"), str(tmp_path / "d")]) == 1
    assert same_results.main(["--runs", str(tmp_path / "a"), str(tmp_path / "b")]) == 0


def test_close_fields_may_differ_by_rounding_only(tmp_path):
    rows = [{"step": 1, "loss": 0.5, "reward": 0.25}]
    summary = {"final_loss": 0.5, "steps": 1}
    write_run(tmp_path / "a", rows, summary)
    write_run(tmp_path / "b", [{**rows[0], "loss": 0.50000001}], {**summary, "final_loss": 0.50000001})
    failures, notes = same_results.differences(tmp_path / "a", tmp_path / "b", close={"loss"})
    assert failures == [] and notes == ["loss moved by at most 2.0e-08 relative (--close)"]
    assert len(same_results.differences(tmp_path / "a", tmp_path / "b")[0]) == 2  # not named: fails
    write_run(tmp_path / "c", [{**rows[0], "loss": 0.5001, "reward": 0.2500001}], summary)
    failures, _ = same_results.differences(tmp_path / "a", tmp_path / "c", close={"loss"})
    assert failures == ["step 1: loss 0.5 against 0.5001", "step 1: reward 0.25 against 0.2500001"]
