"""Runs a training script in one torchrun process, for tests/test_distributed.py (not a test):

    python -m torch.distributed.run --standalone --nproc_per_node 2 \
        tests/distributed_worker.py grpo [--seeded-rollouts] ARGS...

With --seeded-rollouts the rollouts of each question are sampled from a seed of its own
(`seeded_rollouts`), so they do not depend on which process or batch the question lands in: then
2 processes with --batch-size B must train exactly as 1 process with --batch-size 2B.
"""
import importlib
import sys
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402

sample_rollouts = common.sample_rollouts


def seeded_rollouts(run, model, prompts, num_samples):
    """common.sample_rollouts, one prompt at a time, each from the seed of its text."""
    parts = []
    for prompt in prompts:
        torch.manual_seed(zlib.crc32(prompt.encode()))
        parts.append(sample_rollouts(run, model, [prompt], num_samples))
    return {key: [row for part in parts for row in part[key]] if isinstance(parts[0][key], list)
            else sum(part[key] for part in parts) for key in parts[0]}


if __name__ == "__main__":
    script, *argv = sys.argv[1:]
    if argv[:1] == ["--seeded-rollouts"]:
        common.sample_rollouts = seeded_rollouts
        argv = argv[1:]
    common.run_cli(lambda: importlib.import_module(script).main(argv))
