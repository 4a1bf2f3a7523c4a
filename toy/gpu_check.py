"""The one-shot GPU check: every script and teacher mode, the sampler's speed, a full-size rollout,
the fused losses against the plain computation, the sampler/trainer gap, and the test suite.

    python toy/gpu_check.py --out out/gpu_check   # one CUDA GPU; meant to take under 8 minutes
    python toy/gpu_check.py --tiny                # the same path on a CPU, tiny (tests/ runs this)

It prints one table per part and writes everything to gpu_check.json in --out. The model has random
weights (toy/random_model.py: Qwen3-1.7B's config.json, vocabulary 151,936, bfloat16), so nothing
is downloaded, and its completions always run to --max-new-tokens: the worst case of every step.
Each part records an error instead of stopping the check, so one failure loses nothing else.

1. environment: Python, torch, transformers, flash-attn, CUDA and the GPU.
2. runs: 2 steps of sft.py, sft.py --full, grpo.py and opsd.py at their defaults (the paper's: 32
   prompts a step, 1024 new tokens, micro-batches of 16, LoRA r 64, GRPO's 8 generations, bf16,
   gradient checkpointing), and of every other OPSD teacher (current, ema, --teacher-model, the
   bridge) at 256 new tokens. Each: peak allocated memory, rollout and training tokens per second,
   the last step's loss, gradient norm and sampler/trainer log-probability gap.
3. decode: milliseconds per decode step of engine.generate and of transformers' model.generate
   (sampling at temperature 1, 64 new tokens), at 32 and 256 rows; model.generate with each
   attention installed (SDPA, Flash Attention 2); engine.generate always decodes through SDPA.
4. rollout: one 256 x 1024 rollout (32 prompts x 8 samples) of engine.generate: seconds and peak
   allocated and reserved memory.
5. fused: the shared-prompt training pass and every fused loss (token log-probabilities, OPSD's
   divergence, the GRPO and SFT losses on them) against one plain forward pass per row, in value
   and LoRA gradient, on a small random Qwen3 in bfloat16 on the GPU (float32 on a CPU); the
   largest relative difference of each against its tolerance (TOLERANCES).
6. suite: the README's test command, `python -m pytest -q tests`, in two processes: the CPU tests
   (-m "not gpu", 8 threads) from the start, beside the other parts (they share the CPU with it,
   not the GPU), then tests/test_gpu.py (-m gpu) with the GPU alone; not with --tiny.
"""
import argparse
import gc
import importlib.metadata
import json
import math
import os
import platform
import resource
import subprocess
import sys
import threading
import time
import traceback
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
from lora import apply_lora, lora_disabled  # noqa: E402

SHORT = ["--max-new-tokens", "256"]  # the other teachers: their paths, not the paper's lengths
RUNS = [("sft.py", sft.main, []), ("sft.py --full", sft.main, ["--full"]),
        ("grpo.py", grpo.main, []), ("opsd.py", opsd.main, []),
        ("opsd.py --teacher current", opsd.main, ["--teacher", "current", *SHORT]),
        ("opsd.py --teacher ema", opsd.main, ["--teacher", "ema", *SHORT]),
        ("opsd.py --teacher-model", opsd.main, ["--teacher-model", "MODEL", "--teacher-prompt",
                                                "plain", *SHORT]),
        ("opsd.py --teacher-rollout-steps 1", opsd.main, ["--teacher-rollout-steps", "1", *SHORT])]
TINY = {"sft.py": ["--batch-size", "4"], "grpo.py": ["--batch-size", "2", "--num-generations", "2"],
        "opsd.py": ["--batch-size", "4"]}
# Largest relative difference allowed between a fused computation and the plain one: bfloat16
# keeps 8 bits of mantissa (a relative step of 2^-8 = 0.4%), and the two take different paths
# (a cached prompt against a whole row, chunks against all positions) through 2-4 layers.
TOLERANCES = {torch.bfloat16: 0.05, torch.float32: 1e-4}


def on_gpu():
    return common.default_device().type == "cuda"


def synchronize():
    if on_gpu():
        torch.cuda.synchronize()


def peak_gib():
    """The peak allocated GPU memory since the last reset; on a CPU the process's peak RSS."""
    peak = (torch.cuda.max_memory_allocated() if on_gpu()
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return round(peak / 2**30, 2)


def reset_peak():
    gc.collect()
    if on_gpu():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def environment():
    versions = {}
    for package in ("torch", "transformers", "flash_attn", "safetensors", "tokenizers"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    gpu = on_gpu()
    return {"python": platform.python_version(), **versions,
            "cuda": torch.version.cuda if gpu else None,
            "device": torch.cuda.get_device_name() if gpu else "CPU",
            "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
            if gpu else None,
            "flash_attention_2": common.flash_attention_usable() if gpu else False}


def timed_generate(generate, timings):
    """`generate`, recording its seconds and generated tokens in `timings`."""
    def timed(*args, **kwargs):
        start = time.time()
        rollouts = generate(*args, **kwargs)
        synchronize()  # the GPU has finished, not only been given the work
        timings["seconds"] += time.time() - start
        timings["tokens"] += rollouts["num_generated_tokens"]
        return rollouts
    return timed


def script_run(name, main, argv, out):
    """Run one script; its peak memory, throughputs and the last step's numbers."""
    timings = {"seconds": 0.0, "tokens": 0}
    real_generate = engine.generate
    engine.generate = timed_generate(real_generate, timings)  # sample_rollouts calls it by name
    reset_peak()
    try:
        main(argv + ["--out", str(out), "--overwrite"])  # replaces an earlier check's run
    finally:
        engine.generate = real_generate
    summary = json.loads((out / "summary.json").read_text())
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    train_seconds = summary["wall_seconds"] - timings["seconds"]
    row = {"run": name, "peak_memory_gib": peak_gib(),
           "rollout_tokens": summary["generated_tokens"],  # training's (not show_inputs' sample)
           "rollout_tokens_per_second": round(timings["tokens"] / max(timings["seconds"], 1e-9)),
           "train_tokens": summary["train_tokens"],
           "train_tokens_per_second": round(summary["train_tokens"] / max(train_seconds, 1e-9)),
           "seconds": round(summary["wall_seconds"], 1), "loss": last["loss"],
           "grad_norm": last["grad_norm"], "logprob_gap_mean": last.get("logprob_gap_mean"),
           "logprob_gap_max": last.get("logprob_gap_max")}
    row["ok"] = math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"])
    return row


def toy_prompts(tokenizer, n):
    return [common.chat_prompt(tokenizer, common.student_message(example))
            for example in common.load_examples("toy", "train")[:n]]


def decode_speed(folder, rows_list, new_tokens):
    """ms per decode step, engine.generate against model.generate, at each number of rows."""
    from transformers import GenerationConfig
    model, tokenizer = common.load_model(str(folder))
    implementations = ["sdpa"] + (["flash_attention_2"] if environment()["flash_attention_2"] else [])
    results = []
    for rows in rows_list:
        prompts, samples = toy_prompts(tokenizer, min(rows, 32)), max(1, rows // 32)
        config = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                  max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                  num_return_sequences=samples,
                                  eos_token_id=engine.end_token_ids(model, tokenizer),
                                  pad_token_id=tokenizer.pad_token_id)
        encoded = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left",
                            add_special_tokens=False).to(model.device)

        def ours():
            return engine.generate(model, tokenizer, prompts, new_tokens, 1.0, num_samples=samples)

        def theirs():
            with torch.inference_mode():
                return model.generate(**encoded, generation_config=config)
        samplers = [("engine.generate (SDPA)", ours, "sdpa")] + [
            (f"model.generate ({name})", theirs, name) for name in implementations]
        for label, sample, implementation in samplers:
            model.set_attn_implementation(implementation)
            sample()  # warm-up
            synchronize()
            start = time.time()
            sample()
            synchronize()
            results.append({"sampler": label, "rows": len(prompts) * samples,
                            "ms_per_step": round(1000 * (time.time() - start) / new_tokens, 2)})
    return results


def rollout_memory(folder, prompts_count, samples, new_tokens):
    """One rollout of engine.generate: seconds and peak allocated / reserved memory."""
    model, tokenizer = common.load_model(str(folder))
    prompts = toy_prompts(tokenizer, prompts_count)
    reset_peak()
    start = time.time()
    rollouts = engine.generate(model, tokenizer, prompts, new_tokens, 1.0, num_samples=samples)
    synchronize()
    return {"rows": prompts_count * samples, "new_tokens": new_tokens,
            "generated_tokens": rollouts["num_generated_tokens"],
            "seconds": round(time.time() - start, 2), "peak_allocated_gib": peak_gib(),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2)
            if on_gpu() else None}


def relative_difference(fused, plain):
    fused, plain = fused.float(), plain.float()
    return float((fused - plain).norm() / plain.norm().clamp(min=1e-12))


def fused_against_plain(dtype):
    """Each fused computation against one plain forward pass per [prompt | completion] row, in
    value and LoRA gradient: their relative differences (`TOLERANCES`)."""
    device = common.default_device()
    tokenizer = random_model.make_tokenizer(random_model.TOY_VOCAB_SIZE)
    shape = {**random_model.SHAPES["tiny"], "num_hidden_layers": 2}
    model = random_model.make_model(shape, tokenizer).to(device=device, dtype=dtype)
    apply_lora(model, r=8, alpha=16)
    torch.manual_seed(0)
    for parameter in model.parameters():
        if parameter.requires_grad:
            torch.nn.init.normal_(parameter, std=0.05)  # B = 0 would make every path alike
    generator = torch.Generator().manual_seed(0)

    def ids(length):
        return torch.randint(3, 90, (length,), generator=generator).tolist()
    prompts = [ids(n) for n in (7, 12, 7, 12)]  # two prompts, each twice: the pass shares them
    prompts[2], prompts[3] = prompts[0], prompts[1]
    completions = [ids(n) for n in (5, 9, 3, 8)]
    batch = engine.pack(prompts, completions, tokenizer.pad_token_id, device)
    teacher_batch = engine.pack([p[::-1] for p in prompts], completions, tokenizer.pad_token_id,
                                device)
    mask = batch["completion_mask"].bool()
    teacher_prompts = [p[::-1] for p in prompts]

    def plain_logprobs():  # each row's whole forward pass, no cache, no padding
        return common.textbook_logprobs(model, prompts, completions)

    def fused_logprobs():
        return engine.token_logprobs(model, batch, chunk_size=3)

    def opsd_fused():
        with torch.no_grad(), lora_disabled(model):
            teacher_hidden = engine.completion_hidden(model, teacher_batch)
        return opsd.divergence(model, engine.completion_hidden(model, batch),
                               opsd.Teacher(model, lora_disabled), teacher_hidden,
                               batch["completion_mask"], mask.sum(), 0.0, 1.1, 0.0,
                               chunk_size=3)[0]

    def opsd_plain():
        with torch.no_grad(), lora_disabled(model):
            teacher_logits = common.textbook_logits(model, teacher_prompts, completions)
        return opsd.textbook_divergence(common.textbook_logits(model, prompts, completions),
                                        teacher_logits, batch["completion_mask"], mask.sum(),
                                        0.0, 1.1, 0.0)

    advantages = torch.tensor([1.0, -0.5, 0.25, -1.0], device=device)

    def grpo_loss(logprobs):
        return grpo.policy_loss(logprobs, logprobs.detach(), advantages, batch["completion_mask"],
                                len(completions))

    def sft_loss(logprobs):
        return sft.sft_loss(logprobs, batch["completion_mask"], mask.sum())

    def value_and_gradient(loss_function):
        model.zero_grad(set_to_none=True)
        value = loss_function()
        value.sum().backward()
        gradient = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
        return value.detach(), gradient

    def hidden_fused():
        return engine.completion_hidden(model, batch)[mask]

    def hidden_plain():
        rows = []
        for prompt, completion in zip(prompts, completions):
            row = torch.tensor([prompt + completion], device=device)
            rows.append(model.get_decoder()(input_ids=row).last_hidden_state[0, len(prompt) - 1:-1])
        return torch.cat(rows)

    checks = {"shared-prompt pass (hidden states)": (hidden_fused, hidden_plain),
              "token log-probabilities": (fused_logprobs, plain_logprobs),
              "OPSD divergence": (opsd_fused, opsd_plain),
              "GRPO loss": (lambda: grpo_loss(fused_logprobs()), lambda: grpo_loss(plain_logprobs())),
              "SFT loss": (lambda: sft_loss(fused_logprobs()), lambda: sft_loss(plain_logprobs()))}
    results = []
    for name, (fused, plain) in checks.items():
        fused_value, fused_gradient = value_and_gradient(fused)
        plain_value, plain_gradient = value_and_gradient(plain)
        row = {"check": name, "value": relative_difference(fused_value, plain_value),
               "gradient": relative_difference(fused_gradient, plain_gradient),
               "tolerance": TOLERANCES[dtype]}
        row["ok"] = row["value"] <= row["tolerance"] and row["gradient"] <= row["tolerance"]
        results.append(row)
    return results


def run_test_suite(marker, timeout):
    """The README's test command, `python -m pytest -q tests`, for the tests marked or not marked
    gpu (-m), in a process of its own: its last line, failures, exit code and seconds."""
    command = [sys.executable, "-m", "pytest", "-q", "tests", "-m", marker]
    start = time.time()
    try:
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                                env={**os.environ, "OMP_NUM_THREADS": "8"})
    except subprocess.TimeoutExpired:
        return {"command": " ".join(command[1:]), "exit_code": None, "ok": False,
                "last_line": f"timed out after {timeout} s", "seconds": timeout}
    lines = result.stdout.strip().splitlines()
    return {"command": " ".join(command[1:]), "exit_code": result.returncode,
            "last_line": lines[-1] if lines else "", "seconds": round(time.time() - start),
            "failures": [line for line in lines if line.startswith(("FAILED", "ERROR"))],
            "ok": result.returncode == 0}


def part(report, name, function, *args):
    """report[name] = function(*args), or the error it raised (the check goes on)."""
    start = time.time()
    try:
        report[name] = function(*args)
    except Exception as error:  # noqa: BLE001 - recorded, and the other parts still run
        report[name] = {"error": f"{type(error).__name__}: {error}",
                        "traceback": traceback.format_exc()[-3000:]}
        print(f"{name}: {report[name]['error']}", file=sys.stderr)
    print(f"[{name}: {time.time() - start:.0f} s]", flush=True)


def table(rows, columns):
    """A Markdown table of a list of dicts, or the part's error."""
    if isinstance(rows, dict):
        return "\n".join(f"{key}: {value}" for key, value in rows.items() if key != "traceback")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(f"{row.get(column)}" if not isinstance(row.get(column), float)
                                      else f"{row[column]:.3g}" for column in columns) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--tiny", action="store_true",
                        help="a tiny model, a few prompts of 16 tokens, no test suite: the CPU path")
    parser.add_argument("--out", default="out/gpu_check",
                        help="model folder, runs and gpu_check.json go here")
    parser.add_argument("--suite-timeout", type=int, default=300,
                        help="seconds the test suite may take")
    args = parser.parse_args(argv)
    out, started = Path(args.out), time.time()
    folder = random_model.write("tiny" if args.tiny else "qwen3-1.7b",
                                out / ("tiny" if args.tiny else "qwen3-1.7b"))
    report = {"environment": environment(), "shape": "tiny" if args.tiny else "Qwen3-1.7B"}
    print(json.dumps(report["environment"]))
    suite_thread = None
    if not args.tiny:  # the CPU tests from the start, beside everything else (not on the GPU)
        suite_thread = threading.Thread(target=part, args=(report, "suite (not gpu)", run_test_suite,
                                                           "not gpu", args.suite_timeout))
        suite_thread.start()
    rows_list, decode_tokens = ([4, 8], 8) if args.tiny else ([32, 256], 64)
    part(report, "decode", decode_speed, folder, rows_list, decode_tokens)
    part(report, "rollout", rollout_memory, folder, *((4, 2, 16) if args.tiny else (32, 8, 1024)))
    runs = []
    report["runs"] = runs
    for name, script_main, extra in RUNS:
        extra = [str(folder) if value == "MODEL" else value for value in extra]
        argv = ["--model", str(folder), "--data", "toy", "--steps", "2", "--eval-n", "0", *extra]
        if args.tiny:
            argv += TINY[name.split()[0]] + ["--max-new-tokens", "16"]
        run_report = {}
        part(run_report, name, script_run, name, script_main, argv,
             out / "runs" / name.replace(" ", "").replace("--", "_").replace(".py", ""))
        runs.append(run_report[name] if "error" not in run_report[name]
                    else {"run": name, "ok": False, **run_report[name]})
    part(report, "fused", fused_against_plain, torch.bfloat16 if on_gpu() else torch.float32)
    if suite_thread:
        suite_thread.join()
        reset_peak()  # what this process's allocator holds, given back for the GPU tests
        part(report, "suite (gpu)", run_test_suite, "gpu", args.suite_timeout)
    report["seconds"] = round(time.time() - started)
    report["ok"] = all(row.get("ok") for row in runs) and isinstance(report["fused"], list) and \
        all(row["ok"] for row in report["fused"]) and "error" not in report["decode"] and \
        "error" not in report["rollout"] and \
        all(report[name].get("ok") for name in ("suite (not gpu)", "suite (gpu)") if name in report)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    environment_line = ", ".join(f"{key} {value}" for key, value in report["environment"].items())
    print(f"\n{environment_line}; {report['shape']} shape; {report['seconds']} s in all; "
          f"{'all ok' if report['ok'] else 'NOT ALL OK'}\n")
    print(table(runs, ["run", "ok", "peak_memory_gib", "rollout_tokens_per_second",
                       "train_tokens_per_second", "seconds", "loss", "grad_norm",
                       "logprob_gap_mean", "logprob_gap_max"]) + "\n")
    print(table(report["decode"], ["sampler", "rows", "ms_per_step"]) + "\n")
    print(table([report["rollout"]] if "error" not in report["rollout"] else report["rollout"],
                ["rows", "new_tokens", "seconds", "peak_allocated_gib", "peak_reserved_gib"]) + "\n")
    print(table(report["fused"], ["check", "value", "gradient", "tolerance", "ok"]) + "\n")
    for name in ("suite (not gpu)", "suite (gpu)"):
        if name in report:
            suite = report[name]
            print(table(suite, []) if "error" in suite else
                  f"{suite['command']}: {suite['last_line']} ({suite['seconds']} s)")
    return report


if __name__ == "__main__":
    main()
