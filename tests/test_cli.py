"""The command line as a user meets it: every bad flag or combination stops in one line that names
the flag, with exit code 2, before the model loads; no run deletes another run's files; --help
shows every default; the outputs describe themselves."""
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import common
import grpo
import opsd
import sft

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "toy"))
import evaluate  # noqa: E402  toy/evaluate.py

SCRIPTS = {"sft": sft, "grpo": grpo, "opsd": opsd, "evaluate": evaluate}


def a_run(folder, **saved_args):
    """A folder holding a finished run's checkpoint (only what prepare_out reads, whole)."""
    checkpoint = folder / "checkpoint-000002"
    checkpoint.mkdir(parents=True)
    (checkpoint / "args.json").write_text(json.dumps({"method": "sft", "model": "toy", "full": False,
                                                      "lora_r": 16, "lora_alpha": 32, "steps": 2,
                                                      **saved_args}))
    save_file({"weight": torch.zeros(2)}, checkpoint / "adapter_model.safetensors")
    torch.save({}, checkpoint / "trainer_state.pt")
    (checkpoint / "state.json").write_text("{}")
    (checkpoint / "adapter_config.json").write_text("{}")
    (folder / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    return folder


BAD = [  # (script, command line, the flag the error line must name)
    ("sft", ["--lora-r", "0"], "--lora-r"),
    ("sft", ["--batch-size", "0"], "--batch-size"),
    ("sft", ["--lr", "-1"], "--lr"),
    ("sft", ["--eval-k", "-1"], "--eval-k"),
    ("sft", ["--steps", "0"], "--steps"),
    ("sft", ["--steps", "-1"], "--steps"),
    ("sft", ["--eval-n", "-1"], "--eval-n"),
    ("sft", ["--micro-batch-size", "-1"], "--micro-batch-size"),
    ("sft", ["--top-p", "0"], "--top-p"),
    ("sft", ["--top-k", "-1"], "--top-k"),
    ("sft", ["--lora-dropout", "1"], "--lora-dropout"),
    ("sft", ["--max-new-tokens", "0"], "--max-new-tokens"),
    ("sft", ["--chunk-size", "0"], "--chunk-size"),
    ("sft", ["--eval-temperature", "0"], "--eval-temperature"),
    ("sft", ["--keep-checkpoints", "0"], "--keep-checkpoints"),
    ("sft", ["--steps", "abc"], "--steps"),  # argparse's own errors: one line too
    ("sft", ["--schedule", "linear"], "--schedule"),
    ("sft", ["--no-such-flag"], "--no-such-flag"),
    ("sft", ["--rejection-sampling", "4", "--temperature", "0"], "--rejection-sampling"),
    ("sft", ["--resume", "--overwrite"], "--resume"),
    ("sft", ["--lr", "inf"], "--lr"),
    ("grpo", ["--format-reward", "nan"], "--format-reward"),
    ("opsd", ["--jsd-beta", "2"], "--jsd-beta"),
    ("opsd", ["--clip", "-0.1"], "--clip"),
    ("opsd", ["--temperature", "0"], "--temperature"),
    ("grpo", ["--temperature", "0"], "--temperature"),
    ("grpo", ["--num-generations", "1"], "--num-generations"),
    ("grpo", ["--num-iterations", "0"], "--num-iterations"),
    ("grpo", ["--epsilon-low", "1.5"], "--epsilon-low"),
    ("grpo", ["--beta", "0.04", "--full"], "--beta"),
    ("evaluate", ["--eval-k", "-1"], "--eval-k"),
    ("evaluate", ["--eval-batch-size", "0"], "--eval-batch-size"),
]


@pytest.mark.parametrize("script,argv,flag", BAD, ids=[" ".join([s, *a]) for s, a, _ in BAD])
def test_a_bad_flag_is_one_line_naming_it_before_the_model_loads(script, argv, flag, tmp_path,
                                                                   monkeypatch, capsys):
    monkeypatch.setattr(common, "load_model", lambda *args, **kwargs: pytest.fail("loaded"))
    with pytest.raises(SystemExit) as exit_:
        common.run_cli(lambda: SCRIPTS[script].main(argv + ["--out", str(tmp_path / "out")]))
    assert exit_.value.code == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and error.startswith("error: ") and flag in error, error


@pytest.mark.parametrize("command", [["grpo.py", "--num-generations", "1"],
                                     ["opsd.py", "--jsd-beta", "2"],
                                     ["sft.py", "--lora-r", "0"],
                                     ["toy/evaluate.py", "--eval-k", "-1"]])
def test_the_command_line_itself_exits_2_in_one_line_within_seconds(command, tmp_path):
    import subprocess
    import time
    start = time.time()
    result = subprocess.run([sys.executable, *command, "--out", str(tmp_path / "out")],
                            cwd=common.REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and time.time() - start < 15
    assert len(result.stderr.strip().splitlines()) == 1 and command[1] in result.stderr
    assert not (tmp_path / "out").exists()  # nothing written


@pytest.mark.parametrize("script,argv,message", [
    ("sft", [], "holds a run (checkpoint-000002, its newest checkpoint): continue it with --resume"),
    ("grpo", ["--resume"], "was trained with method sft, this run has grpo"),
    ("sft", ["--resume", "--lora-r", "8"], "was trained with --lora-r 16, this run has 8"),
    ("sft", ["--resume", "--model", "other"], "was trained with --model toy"),
])
def test_an_existing_run_is_never_replaced_or_resumed_by_another(script, argv, message, tmp_path,
                                                                   monkeypatch, capsys):
    monkeypatch.setattr(common, "load_model", lambda *args, **kwargs: pytest.fail("loaded"))
    run = a_run(tmp_path / "run")
    before = sorted(path.name for path in run.rglob("*"))
    with pytest.raises(SystemExit) as exit_:
        common.run_cli(lambda: SCRIPTS[script].main(argv + ["--out", str(run)]))
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert sorted(path.name for path in run.rglob("*")) == before  # nothing touched


def test_a_failed_start_does_not_take_the_folder(tmp_path, capsys):
    """A typo in --data stops the run in one line; the corrected command then runs in the same
    --out (the failed start is only recorded in runs.jsonl)."""
    out = str(tmp_path / "run")
    with pytest.raises(SystemExit):
        common.run_cli(lambda: sft.main(["--data", str(tmp_path / "missing.jsonl"), "--out", out]))
    assert "missing.jsonl" in capsys.readouterr().err
    sft.main(["--steps", "1", "--batch-size", "2", "--eval-n", "2", "--out", out])
    assert len((tmp_path / "run" / "runs.jsonl").read_text().splitlines()) == 2


def test_overwrite_never_deletes_what_the_run_reads_nor_runs_inside_a_checkpoint(tmp_path,
                                                                                capsys):
    run = a_run(tmp_path / "run")
    for argv, message in [(["--overwrite", "--model", str(run / "checkpoint-000002")],
                           "--overwrite would delete --model"),
                          (["--out", str(run / "checkpoint-000002" / "inner")],
                           "is inside a checkpoint")]:
        with pytest.raises(SystemExit):
            common.run_cli(lambda: sft.main(["--out", str(run), *argv]))
        assert message in capsys.readouterr().err
    assert (run / "checkpoint-000002" / "args.json").exists()


def test_no_held_out_problems_is_said_not_scored(tmp_path, capsys):
    sft.main(["--steps", "1", "--batch-size", "2", "--eval-n", "0", "--eval-k", "4",
              "--out", str(tmp_path / "run")])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["before"] == summary["after"] == {"accuracy": None, "n": 0}
    assert "no held-out evaluation (--eval-n 0)" in capsys.readouterr().out


def test_out_naming_a_file_stops_before_anything_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(common, "load_model", lambda *args, **kwargs: pytest.fail("loaded"))
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    for script in ["sft", "evaluate"]:
        with pytest.raises(SystemExit):
            common.run_cli(lambda: SCRIPTS[script].main(["--out", str(file)]))
        assert f"--out {file} is a file" in capsys.readouterr().err
    assert file.read_text() == "mine"


def test_a_run_keeps_its_checkpoints_arguments_and_a_summary_that_describes_it(tmp_path):
    out = tmp_path / "run"
    quick = ["--steps", "3", "--batch-size", "4", "--eval-n", "4", "--out", str(out)]
    sft.main(quick + ["--save-every", "1", "--keep-checkpoints", "2"])
    assert sorted(path.name for path in out.glob("checkpoint-*")) == ["checkpoint-000002",
                                                                      "checkpoint-000003"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "sft" and summary["model"] == "toy" and summary["data"] == "toy"
    assert summary["args"]["lora_r"] == 16 and summary["args"]["steps"] == 3
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert summary["final_loss"] == last["loss"] and summary["started"] <= summary["ended"]
    # The checkpoint alone is enough to load: PEFT finds the base model, and the tokenizer is there.
    checkpoint = out / "checkpoint-000003"
    adapter_config = json.loads((checkpoint / "adapter_config.json").read_text())
    assert Path(adapter_config["base_model_name_or_path"]) == common.TOY_DIR / "model"
    assert (checkpoint / "tokenizer_config.json").exists()
    # --overwrite replaces that run and only it; every start is recorded in runs.jsonl.
    (out / "notes.txt").write_text("mine")
    sft.main(quick + ["--overwrite"])
    assert sorted(path.name for path in out.glob("checkpoint-*")) == ["checkpoint-000003"]
    assert (out / "notes.txt").read_text() == "mine"
    runs = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert len(runs) == 1 and runs[0]["method"] == "sft" and runs[0]["args"]["overwrite"]


def test_help_shows_every_default_and_the_toy_setting(capsys):
    with pytest.raises(SystemExit):
        grpo.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "peak learning rate of AdamW (default: 2e-05; toy: 0.0005)" in text
    assert "completions per prompt (group size G) (default: 8)" in text


def test_ctrl_c_ends_in_one_line_not_a_traceback(capsys):
    def interrupted():
        raise KeyboardInterrupt
    with pytest.raises(SystemExit) as stopped:
        common.run_cli(interrupted)
    assert stopped.value.code == 130
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["interrupted: --resume continues from the last checkpoint (--save-every N "
                     "writes them during a run)"]
