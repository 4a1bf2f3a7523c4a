"""The one-shot GPU check (toy/gpu_check.py) on its CPU path: a tiny random Qwen3, every script and
OPSD teacher for 2 steps, the sampler's speed, a rollout, the fused losses against the plain
computation. On a GPU, `python toy/gpu_check.py` runs the Qwen3-1.7B shape and the test suite."""
import importlib.util
import json
from pathlib import Path

import engine

REPO = Path(__file__).resolve().parent.parent


def test_the_gpu_check_runs_every_part_on_a_tiny_shape(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "toy" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    real_generate = engine.generate
    report = gpu_check.main(["--tiny", "--out", str(tmp_path)])
    assert engine.generate is real_generate  # the timing wrapper is gone again
    assert report["ok"] and json.loads((tmp_path / "gpu_check.json").read_text())["ok"]
    runs = {row["run"]: row for row in report["runs"]}
    assert list(runs) == [name for name, _, _ in gpu_check.RUNS]
    # A random model's completions run to --max-new-tokens 16: 2 steps x prompts x samples x 16.
    assert runs["sft.py"]["rollout_tokens"] == runs["sft.py --full"]["rollout_tokens"] == 0
    assert runs["grpo.py"]["rollout_tokens"] == 2 * 2 * 2 * 16
    assert runs["opsd.py --teacher ema"]["rollout_tokens"] == 2 * 4 * 16
    for name, row in runs.items():
        assert row["train_tokens_per_second"] > 0 and row["peak_memory_gib"] > 0
        if name.startswith(("grpo", "opsd")) and "rollout-steps" not in name:  # its own samples
            assert 0 <= row["logprob_gap_max"] < 1e-4  # float32 on a CPU: rounding
    assert {row["sampler"] for row in report["decode"]} == {"engine.generate (SDPA)",
                                                            "model.generate (sdpa)"}
    assert all(row["ms_per_step"] > 0 for row in report["decode"])
    assert report["rollout"]["generated_tokens"] == 4 * 2 * 16
    fused = {row["check"]: row for row in report["fused"]}
    assert len(fused) == 5 and all(row["value"] < 1e-4 and row["gradient"] < 1e-4
                                   for row in fused.values())
    printed = capsys.readouterr().out
    assert "| run | ok |" in printed and "| OPSD divergence |" in printed
