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


def seeded_rollouts(run, examples, *args, **kwargs):
    """common.sample_rollouts, one question at a time, each from the seed of its question text."""
    parts = []
    for example in examples:
        torch.manual_seed(zlib.crc32(example["question"].encode()))
        parts.append(sample_rollouts(run, [example], *args, **kwargs))
    pad = run.tokenizer.pad_token_id
    prompt_width = max(part["prompt_ids"].shape[1] for part in parts)
    completion_width = max(part["completion_ids"].shape[1] for part in parts)

    def padded(key, width, value, left):
        tensors = [part[key] for part in parts]
        return torch.cat([torch.nn.functional.pad(
            tensor, (width - tensor.shape[1], 0) if left else (0, width - tensor.shape[1]),
            value=value) for tensor in tensors])
    return {"prompt_ids": padded("prompt_ids", prompt_width, pad, left=True),
            "prompt_mask": padded("prompt_mask", prompt_width, 0, left=True),
            "completion_ids": padded("completion_ids", completion_width, pad, left=False),
            "completion_mask": padded("completion_mask", completion_width, 0, left=False),
            "logprobs": padded("logprobs", completion_width, 0.0, left=False),
            "finished": torch.cat([part["finished"] for part in parts]),
            "texts": [text for part in parts for text in part["texts"]],
            "num_generated_tokens": sum(part["num_generated_tokens"] for part in parts)}


if __name__ == "__main__":
    script, *argv = sys.argv[1:]
    if argv[:1] == ["--seeded-rollouts"]:
        common.sample_rollouts = seeded_rollouts
        argv = argv[1:]
    common.run_cli(lambda: importlib.import_module(script).main(argv))
