"""The one-shot GPU check: each script at the paper's settings on a model of Qwen3-1.7B's shape.

    python toy/gpu_check.py            # on a CUDA GPU: over 5 minutes on one H200
    python toy/gpu_check.py --tiny     # the same path on a CPU with a tiny shape (tests/ runs this)

The model has random weights (toy/random_model.py: Qwen3-1.7B's config.json, vocabulary 151,936,
bfloat16), so nothing is downloaded, and its completions always run to --max-new-tokens: the worst
case of every step. Each of sft.py, grpo.py and opsd.py runs 2 steps with its defaults (the
paper's settings: 32 prompts a step, 1024 new tokens, LoRA r 64, GRPO's 8 generations) on the toy
problems, in bfloat16 with SDPA attention, or Flash Attention 2 when flash-attn is installed.
For each script it prints the peak GPU memory (torch.cuda.max_memory_allocated) and the tokens per
second of its rollouts (engine.generate) and of its training (the rest of each step).
"""
import argparse
import gc
import importlib.util
import json
import resource
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "toy"))
import common  # noqa: E402
import engine  # noqa: E402
import grpo  # noqa: E402
import opsd  # noqa: E402
import random_model  # noqa: E402
import sft  # noqa: E402

# 2 steps each: the first also pays for CUDA's warm-up, the second is the steady state.
RUNS = [("sft.py", sft.main), ("grpo.py", grpo.main), ("opsd.py", opsd.main)]
TINY = {"sft.py": ["--batch-size", "4", "--max-new-tokens", "16"],
        "grpo.py": ["--batch-size", "2", "--num-generations", "2", "--max-new-tokens", "16"],
        "opsd.py": ["--batch-size", "4", "--max-new-tokens", "16"]}


def timed_generate(generate, timings):
    """`generate`, recording its seconds and generated tokens in `timings`."""
    def timed(*args, **kwargs):
        start = time.time()
        rollouts = generate(*args, **kwargs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the GPU has finished, not only been given the work
        timings["seconds"] += time.time() - start
        timings["tokens"] += rollouts["num_generated_tokens"]
        return rollouts
    return timed


def check(name, main, argv, out):
    """Run one script; return its peak memory and the throughput of its rollouts and training."""
    timings = {"seconds": 0.0, "tokens": 0}
    real_generate = engine.generate
    engine.generate = timed_generate(real_generate, timings)  # sample_rollouts calls it by name
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        main(argv + ["--out", str(out), "--overwrite"])  # replaces an earlier check's run
    finally:
        engine.generate = real_generate
    summary = json.loads((out / "summary.json").read_text())
    train_seconds = summary["wall_seconds"] - timings["seconds"]
    peak = (torch.cuda.max_memory_allocated() if torch.cuda.is_available()  # CPU: the process's
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # peak RSS so far
    return {"script": name, "peak_memory_gib": round(peak / 2**30, 1),
            "rollout_tokens": timings["tokens"],
            "rollout_tokens_per_second": round(timings["tokens"] / max(timings["seconds"], 1e-9)),
            "train_tokens": summary["train_tokens"],
            "train_tokens_per_second": round(summary["train_tokens"] / max(train_seconds, 1e-9)),
            "seconds": round(summary["wall_seconds"], 1)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--tiny", action="store_true",
                        help="a tiny model and 4 prompts of 16 tokens: the CPU path of the check")
    parser.add_argument("--out", default="out/gpu_check", help="model folder and runs go here")
    parser.add_argument("--scripts", nargs="+", choices=[name for name, _ in RUNS],
                        default=[name for name, _ in RUNS], help="which scripts to run")
    args = parser.parse_args(argv)
    out = Path(args.out)
    start = time.time()
    folder = random_model.write("tiny" if args.tiny else "qwen3-1.7b",
                                out / ("tiny" if args.tiny else "qwen3-1.7b"))
    print(f"model {folder} written or found in {time.time() - start:.0f} s")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    flash = torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None
    results = []
    for name, script_main in [(name, main) for name, main in RUNS if name in args.scripts]:
        argv = ["--model", str(folder), "--data", "toy", "--steps", "2", "--eval-n", "0",
                *(TINY[name] if args.tiny else [])]  # --dtype auto: bfloat16 on CUDA
        results.append(check(name, script_main, argv,  # runs/: never the scripts' own out/<method>
                             out / "runs" / name.removesuffix(".py")))
        print(json.dumps(results[-1]))
    print(f"\n{device}, {'tiny shape' if args.tiny else 'Qwen3-1.7B shape'}, "
          f"{common.compute_dtype('auto', 'cuda' if torch.cuda.is_available() else 'cpu')}, "
          f"{'Flash Attention 2' if flash else 'SDPA'}, "
          f"{time.time() - start:.0f} s in all\n")
    print("| script | peak memory (GiB) | rollout tokens/s | training tokens/s | 2 steps (s) |")
    print("|---|---|---|---|---|")
    for row in results:
        print(f"| {row['script']} | {row['peak_memory_gib']} | {row['rollout_tokens_per_second']:,} "
              f"| {row['train_tokens_per_second']:,} | {row['seconds']} |")
    return results


if __name__ == "__main__":
    main()
