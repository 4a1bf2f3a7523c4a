"""Data parallel under torchrun, on CPU with gloo and 2 processes.

2 processes with --batch-size B must compute what 1 process with --batch-size 2B computes: the same
gradient (its norm is logged), the same loss and the same LoRA weights. The rollouts are made
independent of the process a question lands in (distributed_worker.seeded_rollouts); everything
else is the scripts' own code.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import common
import distributed_worker

REPO = Path(__file__).resolve().parent.parent
QUICK = ["--steps", "2", "--lr", "1e-3", "--schedule", "constant", "--warmup-steps", "0",
         "--eval-n", "5", "--eval-batch-size", "8", "--max-new-tokens", "40"]
METHODS = {"sft": ("sft", []), "rft": ("sft", ["--rejection-sampling", "4"]),
           "grpo": ("grpo", ["--num-generations", "4"]), "opsd": ("opsd", [])}


def torchrun(script, argv):
    """Run `script` (sft, grpo or opsd) with argv in 2 processes under torchrun."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               "2", str(REPO / "tests" / "distributed_worker.py"), script, *argv]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1",
                                 "CUDA_VISIBLE_DEVICES": ""})  # gloo on the CPU
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def run_outputs(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    adapter = load_file(common.latest_checkpoint(out) / "adapter_model.safetensors")
    return rows, adapter, json.loads((out / "summary.json").read_text())


@pytest.mark.parametrize("method", METHODS)
def test_two_processes_train_like_one_with_the_doubled_batch(method, tmp_path, monkeypatch):
    script, extra = METHODS[method]
    log = torchrun(script, ["--seeded-rollouts", *QUICK, *extra, "--batch-size", "2",
                            "--out", str(tmp_path / "two")])
    assert "data parallel: 2 processes" in log and log.count("step    2/2") == 1  # rank 0 logs
    monkeypatch.setattr(common, "sample_rollouts", distributed_worker.seeded_rollouts)
    __import__(script).main([*QUICK, *extra, "--batch-size", "4", "--out", str(tmp_path / "one")])

    two_rows, two_adapter, two_summary = run_outputs(tmp_path / "two")
    one_rows, one_adapter, one_summary = run_outputs(tmp_path / "one")
    assert any(row["grad_norm"] > 0 for row in one_rows)  # (a GRPO step can have none)
    for two, one in zip(two_rows, one_rows, strict=True):
        assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-4)
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-4, abs=1e-7)
        assert two.get("generated_tokens") == one.get("generated_tokens")
    if method != "grpo":  # a GRPO process whose rows all have advantage 0 trains them anyway (a
        # zero gradient, grpo.rows_to_train), where the one process trains only the others
        assert two_summary["train_tokens"] == one_summary["train_tokens"]
    # Evaluation is sharded over the processes and gathered: the same 5 problems.
    assert two_summary["before"] == one_summary["before"] and two_summary["after"]["n"] == 5
    assert set(two_adapter) == set(one_adapter)
    # AdamW's first steps move each weight by about lr * sign(gradient), so an entry whose gradient
    # is ~0 may move by a fraction of lr = 1e-3 on float noise alone: tolerance 1e-4. A gradient
    # that is not the whole batch's moves most entries by ~1e-3 the other way.
    for name in one_adapter:
        assert torch.allclose(two_adapter[name], one_adapter[name], atol=1e-4), name
    assert any(tensor.abs().max() > 0 for name, tensor in one_adapter.items()
               if "lora_B" in name)  # B starts at zero: training moved it


def test_two_processes_resume_exactly(tmp_path):
    args = ["opsd", *QUICK, "--batch-size", "2"]  # sampled rollouts: each process's own stream
    torchrun(args[0], args[1:] + ["--out", str(tmp_path / "straight")])
    torchrun(args[0], args[1:] + ["--out", str(tmp_path / "resumed"), "--steps", "1"])
    log = torchrun(args[0], args[1:] + ["--out", str(tmp_path / "resumed"), "--resume"])
    assert "resumed from" in log
    straight_rows, straight_adapter, _ = run_outputs(tmp_path / "straight")
    resumed_rows, resumed_adapter, _ = run_outputs(tmp_path / "resumed")
    assert [row["loss"] for row in resumed_rows] == [row["loss"] for row in straight_rows]
    for name, tensor in straight_adapter.items():
        assert torch.equal(resumed_adapter[name], tensor), name
    # One process cannot continue a run of two: its data order and random streams differ.
    import opsd
    with pytest.raises(common.InputError, match="saved by 2 processes"):
        opsd.main(args[1:] + ["--out", str(tmp_path / "resumed"), "--steps", "3", "--resume"])
