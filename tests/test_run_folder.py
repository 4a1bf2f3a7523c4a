"""A run's folder as a user meets it (issue 31): one run per --out at a time, a lock left by a killed
run blocks nothing, a damaged checkpoint never ends in a traceback, --resume refuses when there is
nothing to resume, and a mistyped or wrong --model stops at once in one line."""
import json
import os
import subprocess
import sys
import time

import pytest

import common
import sft

QUICK = ["--steps", "4", "--batch-size", "4", "--eval-n", "0", "--save-every", "1",
         "--keep-checkpoints", "3"]


def one_line_error(argv, capsys):
    """Run sft.py with argv as the command line does; return its one error line."""
    with pytest.raises(SystemExit) as exit_:
        common.run_cli(lambda: sft.main(argv))
    error = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(error) == 1, error
    return error[0]


def losses(out):
    return {row["step"]: row["loss"] for row in map(json.loads, (out / "metrics.jsonl").open())}


def test_a_second_live_run_is_refused_and_a_killed_runs_lock_blocks_nothing(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "sft.py", "--batch-size", "4", "--eval-n", "0", "--out", str(out)]
    first = subprocess.Popen(command + ["--steps", "100000", "--save-every", "1"], cwd=common.REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        started = time.time()
        while not (out / "checkpoint-000001").is_dir():
            assert first.poll() is None and time.time() - started < 120, "the first run stopped"
            time.sleep(0.2)
        second = subprocess.run(command + ["--steps", "3", "--resume"], cwd=common.REPO,
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and len(second.stderr.strip().splitlines()) == 1
        assert f"{out} is in use by a running process (pid {first.pid}" in second.stderr
    finally:
        first.kill()  # as `kill -9` or a lost machine would: no clean-up runs
        first.wait()
    assert (out / "run.lock").is_file()  # left behind by the killed run
    step = int(common.latest_checkpoint(out).name.split("-")[1])
    resumed = subprocess.run(command + ["--steps", str(step + 1), "--resume"], cwd=common.REPO,
                             capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {out / f'checkpoint-{step:06d}'}" in resumed.stdout
    assert not (out / "run.lock").exists()  # a finished run takes its lock away


def test_a_lock_names_its_process_and_a_dead_ones_is_ignored(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / "run.lock").write_text(f"{sleeper.pid}\n")
        error = one_line_error(QUICK + ["--out", str(out)], capsys)
        assert error.startswith(f"error: --out {out} is in use by a running process (pid "
                                f"{sleeper.pid}")
    finally:
        sleeper.kill()
        sleeper.wait()
    sft.main(QUICK + ["--steps", "1", "--out", str(out)])  # the same lock, its process dead
    assert losses(out).keys() == {1}


@pytest.mark.parametrize("damage", ["damaged", "missing"])
def test_a_damaged_checkpoint_resumes_from_the_newest_intact_one(damage, tmp_path, capsys):
    out = tmp_path / "run"
    sft.main(QUICK + ["--save-every", "2", "--out", str(out)])  # checkpoints 2 and 4
    straight = losses(out)
    newest = out / "checkpoint-000004"
    damaged = newest / "adapter_model.safetensors"
    if damage == "damaged":  # cut short, as a full disk or a killed copy leaves it
        damaged.write_bytes(damaged.read_bytes()[:-100])
    else:
        damaged.unlink()
    files = {path.name: path.read_bytes() for path in newest.iterdir()}
    capsys.readouterr()
    sft.main(QUICK + ["--steps", "3", "--save-every", "2", "--keep-checkpoints", "1", "--out",
                      str(out), "--resume"])
    output = capsys.readouterr().out
    assert f"{damaged} is {damage}" in output
    assert f"resuming from {out / 'checkpoint-000002'}, the newest intact checkpoint" in output
    assert losses(out)[3] == straight[3]  # the step after the intact checkpoint, exactly
    assert {path.name: path.read_bytes() for path in newest.iterdir()} == files  # left as it is
    assert (out / "checkpoint-000003").is_dir()  # kept: the damaged newer one is not counted


def test_no_intact_checkpoint_stops_in_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    sft.main(QUICK + ["--steps", "2", "--keep-checkpoints", "2", "--out", str(out)])
    for checkpoint in out.glob("checkpoint-*"):
        (checkpoint / "trainer_state.pt").write_bytes(b"not a zip")
    weights = out / "checkpoint-000001" / "adapter_model.safetensors"
    weights.write_bytes((2 ** 62).to_bytes(8, "little") + weights.read_bytes()[8:])  # a wild header
    error = one_line_error(QUICK + ["--out", str(out), "--resume"], capsys)
    assert error.startswith(f"error: --resume: no intact checkpoint in {out}")
    assert "checkpoint-000002/trainer_state.pt is damaged" in error
    assert "checkpoint-000001/adapter_model.safetensors is damaged" in error


def test_resume_refuses_when_there_is_nothing_to_resume(tmp_path, capsys):
    error = one_line_error(QUICK + ["--out", str(tmp_path / "new"), "--resume"], capsys)
    assert "--resume: no checkpoint in" in error and "start without --resume" in error


def test_holds_a_run_names_the_checkpoint_resume_continues_from(tmp_path, capsys):
    out = tmp_path / "run"
    sft.main(QUICK + ["--out", str(out)])
    error = one_line_error(QUICK + ["--out", str(out)], capsys)
    assert "holds a run (checkpoint-000004, its newest checkpoint)" in error


def test_resume_with_other_steps_says_what_becomes_of_the_schedule(tmp_path, capsys):
    out = tmp_path / "run"
    sft.main(QUICK + ["--steps", "2", "--out", str(out)])
    capsys.readouterr()
    sft.main(QUICK + ["--steps", "3", "--out", str(out), "--resume"])
    assert ("note: --steps 3, the run in checkpoint-000002 had 2: the cosine schedule now spans 3 "
            "steps") in capsys.readouterr().out


def test_a_mistyped_local_model_path_or_an_adapter_as_model_stops_at_once(tmp_path, capsys,
                                                                         monkeypatch):
    monkeypatch.chdir(tmp_path)
    error = one_line_error(["--model", "./typo", "--out", str(tmp_path / "out")], capsys)
    assert "--model ./typo: no such folder" in error
    common.check_model_path("HuggingFaceTB/SmolLM2-135M-Instruct")  # an id: no local folder
    started = time.time()
    error = one_line_error(["--model", str(tmp_path / "SmolLM2-135M-Instruc"), "--out",
                            str(tmp_path / "out")], capsys)
    assert f"--model {tmp_path / 'SmolLM2-135M-Instruc'}: no such folder" in error
    assert time.time() - started < 10  # no hub retries
    sft.main(QUICK + ["--steps", "1", "--out", str(tmp_path / "run")])
    adapter = tmp_path / "run" / "checkpoint-000001"
    error = one_line_error(["--model", str(adapter), "--out", str(tmp_path / "out2")], capsys)
    assert f"--model {adapter} is a LoRA adapter, not a model" in error
    assert f"its base is {common.model_folder('toy')}" in error


def test_the_lock_is_taken_only_by_a_run_that_starts(tmp_path, capsys):
    out = tmp_path / "run"
    sft.main(QUICK + ["--steps", "1", "--out", str(out)])
    one_line_error(QUICK + ["--out", str(out)], capsys)  # holds a run: refused
    assert not (out / "run.lock").exists() and os.listdir(out)
