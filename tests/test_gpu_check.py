"""The one-shot GPU check (toy/gpu_check.py) on its CPU path: a tiny random Qwen3, 2 steps of each
script, the figures it prints. On a GPU, `python toy/gpu_check.py` runs the Qwen3-1.7B shape."""
import importlib.util
from pathlib import Path

import engine

REPO = Path(__file__).resolve().parent.parent


def test_the_gpu_check_runs_each_script_on_a_tiny_shape(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "toy" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    real_generate = engine.generate
    results = gpu_check.main(["--tiny", "--out", str(tmp_path)])
    assert engine.generate is real_generate  # the timing wrapper is gone again
    assert [row["script"] for row in results] == ["sft.py", "grpo.py", "opsd.py"]
    # A random model's completions run to --max-new-tokens 16: 2 steps x prompts x generations x 16.
    assert [row["rollout_tokens"] for row in results] == [0, 2 * 2 * 2 * 16, 2 * 4 * 1 * 16]
    for row in results:
        assert row["peak_memory_gib"] > 0 and row["train_tokens_per_second"] > 0
        assert row["train_tokens"] > 0 and row["seconds"] > 0
    assert results[1]["rollout_tokens_per_second"] > 0
    table = capsys.readouterr().out
    assert "| script | peak memory (GiB) |" in table and "| opsd.py |" in table
