"""Peak memory and time of opsd.divergence, chunked against naive, at a real vocabulary size.

    python tests/benchmark_divergence.py                  # V = 151,936 (Qwen3), T = 1024
    python tests/benchmark_divergence.py --device cuda

A benchmark, not a test (pytest does not collect it). Each variant runs forward + backward on bf16
logits [1, T, V] (what a bf16 model returns) in a fresh process; memory is the peak *added* by the
loss on top of its inputs: the CUDA allocator's peak on a GPU, the process's peak RSS on a CPU.
"""
import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import opsd  # noqa: E402


def measure(device, T, V, chunk_size, beta, clip):
    """One forward + backward of the divergence; returns (seconds, peak extra bytes)."""
    torch.manual_seed(0)
    # made in bf16 directly: a float32 temporary would raise the peak RSS before the measurement
    student = torch.randn(1, T, V, device=device, dtype=torch.bfloat16).requires_grad_()
    teacher = torch.randn(1, T, V, device=device, dtype=torch.bfloat16)
    mask = torch.ones(1, T, device=device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.time()
    opsd.divergence(student, teacher, mask, beta, 1.1, clip, chunk_size).backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return time.time() - start, peak


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--T", type=int, default=1024)
    parser.add_argument("--V", type=int, default=151_936)
    parser.add_argument("--chunk-size", type=int, default=128)
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant, print JSON
    args = parser.parse_args()
    if args.variant:
        chunk_size, beta, clip = json.loads(args.variant)
        measure(args.device, 8, 64, chunk_size, beta, clip)  # warm up kernels and allocator
        seconds, peak = measure(args.device, args.T, args.V, chunk_size, beta, clip)
        print(json.dumps({"seconds": seconds, "peak_bytes": peak}))
        return
    print(f"divergence forward + backward, bf16 logits [1, {args.T}, {args.V}], {args.device}")
    print("| loss | naive: peak extra memory | time | chunked by "
          f"{args.chunk_size}: peak extra memory | time |\n|---|---|---|---|---|")
    for name, beta, clip in [("forward KL (beta 0), clip 0.05", 0.0, 0.05),
                             ("JSD (beta 0.5)", 0.5, 0.0)]:
        cells = []
        for chunk_size in [None, args.chunk_size]:
            variant = json.dumps([chunk_size, beta, clip])
            result = json.loads(subprocess.run(
                [sys.executable, __file__, "--device", args.device, "--T", str(args.T), "--V",
                 str(args.V), "--variant", variant],
                check=True, capture_output=True, text=True).stdout)
            cells += [f"{result['peak_bytes'] / 2**30:.2f} GiB", f"{result['seconds']:.2f} s"]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
