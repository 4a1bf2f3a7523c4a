"""Speed and memory of the training scripts at a real scale, on random models (toy/random_model.py).

    python toy/benchmark.py memory                  # peak RSS of one step of opsd.py, grpo.py, sft.py
    python toy/benchmark.py memory --scripts opsd   # only some of them
    python toy/benchmark.py rollouts                # engine.generate against model.generate

memory: one training step of each script, in a process of its own, on the real-vocabulary stand-in
(Qwen3 with V = 151,936, hidden 1024, 2 layers; built into models/standin on first use) at the
settings the README reports: 512 new tokens, LoRA r 64 / alpha 128, float32; opsd.py with 4 prompts
(and again with a separate teacher, a second stand-in: "opsd-teacher"), grpo.py with 2 prompts x 4
generations, sft.py with 8 problems; every script's own micro-batch and other defaults. Evaluation
is off (--eval-n 0), so the step is all there is besides loading. The stand-in's completions always
run to --max-new-tokens (see toy/random_model.py), so each run costs the same. Reported: the
process's peak resident memory (ru_maxrss of exactly that process, from os.wait4; its model is 0.75
GB of it), its wall time and CPU time, loading included. It prints a table and one JSON line with
every number; each run's log is in out/benchmark/<script>/log.txt.

grpo: seconds per training step of grpo.py and of TRL's GRPOTrainer at identical settings, side by
side in one run: the "tiny" random Qwen3 (the toy model's shape: hidden 128, 4 layers; built into
models/tiny on first use), the same prompt strings in the same order, 8 prompts x 8 generations x 48
new tokens at temperature 1 (no top-p, no top-k), LoRA r 16 / alpha 32 on the seven projections,
beta 0, one policy update per batch, the "grpo" loss, float32, one forward pass for all 64 rows,
no gradient checkpointing. Each runs --steps steps in a process of its own, which prints a line per
step; the time between two such lines is a step (generation, reward, loss, backward, optimizer).
Reported: the median over steps 2..N (step 1 warms up). TRL runs only where `import trl` works
(TRL is not a dependency of this project):

    python toy/benchmark.py grpo                     # grpo.py only, without TRL
    /path/to/venv-with-trl/bin/python toy/benchmark.py grpo    # both; tested with TRL 1.16.0

distill: seconds per training step and peak RSS of `opsd.py --teacher-model T --teacher-prompt plain`
(on-policy distillation) and of TRL's GKDTrainer with lmbda 1 (the student samples every completion)
and beta 0 (the forward KL), side by side in one run, on a random pair of real shapes: the
stand-in as student and another stand-in (other weights, the same tokenizer) as teacher, 4 prompts
x 128 new tokens at temperature 1, LoRA r 16 on the seven projections, no cap, float32, no
gradient checkpointing, --steps steps, --repeats runs of each, alternating:

    /path/to/venv-with-trl/bin/python toy/benchmark.py distill    # tested with TRL 1.16.0

The two compute the same forward KL, but TRL 1.16's GKDTrainer logs (and takes the gradient of) a
larger number: it divides the sum over generated tokens by the token count of the data set's
reference answers, which transformers' Trainer counts before the student's samples replace them
(TRL's DistillationTrainer fixed this, huggingface/trl pull request 6478). AdamW and the gradient
clipping (both clip here) make the step nearly the same; the time and memory do not depend on it.
Where the work differs: TRL applies both models' output layers to every position, prompts
included; ours to the completion positions only.

rollouts: seconds to sample one step of those rollouts (8 prompts x 8 samples x 48 tokens, the
"tiny" model) with engine.generate and with transformers' model.generate at identical sampling.

decode: what one rollout of engine.generate asks of the machine, counted on the CPU with
torch.profiler (the toy model, SDPA, float32, 8 prompts x 4 samples x 32 new tokens at temperature
0.7, without LoRA and with LoRA r 16): the top-level aten calls per decode step and per decoder
layer and step (each one a kernel launch on a GPU), the sync-like calls per step (item, is_nonzero,
nonzero, masked_select, equal, tolist: each a wait of the CPU for the GPU there) and the KV
cache's reallocations per rollout (new buffers for every layer, counted once). A CPU proxy for a
GPU's launch and sync costs, not a GPU measurement:

    python toy/benchmark.py decode

Run it on a machine that does nothing else if the times matter: on 2 CPU cores, a test suite
running beside it made steps 2 to 15 times slower (two processes of 2 threads each on 2 cores). The
peaks do not depend on it.
"""
import argparse
import importlib.util
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

TOY = Path(__file__).resolve().parent
REPO = TOY.parent
sys.path.insert(0, str(TOY))
sys.path.insert(0, str(REPO))  # common and grpo, for the TRL run's prompts and reward
import random_model  # noqa: E402

OUT = REPO / "out" / "benchmark"

# The settings every memory run shares, then each script's own (the README reports these).
MEMORY_COMMON = ["--data", "toy", "--steps", "1", "--eval-n", "0", "--max-new-tokens", "512",
                 "--lora-r", "64", "--lora-alpha", "128", "--dtype", "float32"]
MEMORY_SCRIPTS = {
    "opsd": ["--batch-size", "4"],
    "grpo": ["--batch-size", "2", "--num-generations", "4"],
    "sft": ["--batch-size", "8"],
    # on-policy distillation from a separate teacher: a second stand-in (other weights)
    "opsd-teacher": ["--batch-size", "4", "--teacher-model", "models/standin-teacher",
                     "--teacher-prompt", "plain"],
}


def run_measured(command, log_path):
    """Run `command` (its output to log_path); return (exit code, wall seconds, CPU seconds, peak
    RSS in bytes).

    os.wait4 returns the resource usage of that one child, so each run's peak is its own: the
    RUSAGE_CHILDREN of this process would be the largest peak of all the runs so far.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        started = time.time()
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.time() - started
    process.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen.wait
    cpu_seconds = usage.ru_utime + usage.ru_stime  # all threads
    return process.returncode, seconds, cpu_seconds, usage.ru_maxrss * 1024  # Linux reports KiB


def memory(args):
    model = args.model or random_model.write("standin", REPO / "models" / "standin")
    results = []
    if "opsd-teacher" in args.scripts:
        distill_models()  # the teacher stand-in, built on first use
    for script in args.scripts:
        out = OUT / script
        shutil.rmtree(out, ignore_errors=True)  # no metrics or checkpoint of an earlier run
        command = [sys.executable, f"{script.split('-')[0]}.py", "--model", str(model),
                   "--out", str(out), *MEMORY_COMMON, *MEMORY_SCRIPTS[script]]
        print("$ " + " ".join(command), flush=True)
        code, seconds, cpu_seconds, peak = run_measured(command, out / "log.txt")
        if code != 0:
            tail = (out / "log.txt").read_text().splitlines()[-20:]
            sys.exit(f"{script}.py failed (exit code {code}):\n" + "\n".join(tail))
        step = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
        results.append({"script": script, "peak_rss_gb": round(peak / 1e9, 2),
                        "wall_seconds": round(seconds, 1), "cpu_seconds": round(cpu_seconds, 1),
                        "generated_tokens": step["generated_tokens"],
                        "settings": " ".join(MEMORY_SCRIPTS[script])})
    print(f"\none step on {model}, {' '.join(MEMORY_COMMON)}")
    print("| script | settings | peak RSS | wall time (load + step) | CPU time | generated tokens |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['script'].split('-')[0]}.py | {r['settings']} | {r['peak_rss_gb']:.2f} GB | "
              f"{r['wall_seconds']:.0f} s | {r['cpu_seconds']:.0f} s | {r['generated_tokens']} |")
    print(json.dumps({"benchmark": "memory", "model": str(model), "common": MEMORY_COMMON,
                      "results": results}))


# grpo: the settings both implementations share.
GRPO = {"prompts": 8, "generations": 8, "max_new_tokens": 48, "lora_r": 16, "lora_alpha": 32,
        "temperature": 1.0, "lr": 2e-5, "seed": 0}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def step_times(command, log_path):
    """Run `command`, which prints a line "step N..." after each training step; return the seconds
    between consecutive such lines (steps 2..N), as this process reads them, and the process's peak
    RSS in bytes (its own, from os.wait4, as `run_measured`)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    stamps = []
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, bufsize=1)
        for line in process.stdout:
            log.write(line)
            if re.match(r"step\s+\d+", line):
                stamps.append(time.time())
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen.wait
    if process.returncode != 0:
        tail = log_path.read_text().splitlines()[-20:]
        sys.exit(f"{command[1]} failed (exit code {process.returncode}):\n" + "\n".join(tail))
    return [b - a for a, b in zip(stamps, stamps[1:])], usage.ru_maxrss * 1024


def grpo_prompts(tokenizer, steps):
    """The prompt strings of grpo.py's first `steps` steps, in its order, with their answers."""
    import common
    examples = common.load_examples("toy", "train")
    indices = common.batch_indices(len(examples), GRPO["prompts"] * steps, 0, GRPO["seed"])
    return [(common.chat_prompt(tokenizer, common.student_message(examples[i])),
             examples[i]["answer"]) for i in indices]


def trl_worker(model_path, steps, out):
    """Train with TRL's GRPOTrainer at the settings of GRPO; print "step N" after each step."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    import common  # the same reward as grpo.py's: common.is_correct

    torch.manual_seed(GRPO["seed"])
    tokenizer = AutoTokenizer.from_pretrained(model_path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    prompts = grpo_prompts(tokenizer, steps)
    dataset = Dataset.from_list([{"prompt": p, "answer": a} for p, a in prompts])

    def correct(completions, answer, **kwargs):
        return [float(common.is_correct(c, a)) for c, a in zip(completions, answer)]

    class PrintStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            print(f"step {state.global_step}", flush=True)

    rows = GRPO["prompts"] * GRPO["generations"]
    config = GRPOConfig(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=rows,
        gradient_accumulation_steps=1, num_generations=GRPO["generations"],
        max_completion_length=GRPO["max_new_tokens"], temperature=GRPO["temperature"],
        top_p=1.0, top_k=0, beta=0.0, num_iterations=1, loss_type="grpo", scale_rewards="group",
        epsilon=0.2, mask_truncated_completions=False, learning_rate=GRPO["lr"],
        lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=True, shuffle_dataset=False,
        seed=GRPO["seed"], logging_steps=1, report_to="none", save_strategy="no",
        disable_tqdm=True, log_completions=False)
    lora = LoraConfig(r=GRPO["lora_r"], lora_alpha=GRPO["lora_alpha"], lora_dropout=0.0,
                      target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=model, reward_funcs=correct, args=config, train_dataset=dataset,
                          processing_class=tokenizer, peft_config=lora, callbacks=[PrintStep()])
    trainer.train()


def grpo_speed(args):
    model = args.model or random_model.write("tiny", REPO / "models" / "tiny")
    ours = [sys.executable, "grpo.py", "--model", str(model), "--data", "toy",
            "--steps", str(args.steps), "--batch-size", str(GRPO["prompts"]),
            "--num-generations", str(GRPO["generations"]),
            "--max-new-tokens", str(GRPO["max_new_tokens"]), "--temperature", str(GRPO["temperature"]),
            "--top-p", "1.0", "--top-k", "0", "--lora-r", str(GRPO["lora_r"]),
            "--lora-alpha", str(GRPO["lora_alpha"]), "--beta", "0", "--num-iterations", "1",
            "--loss-type", "grpo", "--lr", str(GRPO["lr"]), "--seed", str(GRPO["seed"]),
            "--dtype", "float32", "--eval-n", "0", "--out", str(OUT / "grpo-ours"), "--overwrite",
            "--micro-batch-size", "0", "--no-gradient-checkpointing"]  # as TRL's run below
    trl = [sys.executable, __file__, "trl-worker", "--model", str(model), "--steps", str(args.steps)]
    side_by_side("grpo", {"grpo.py": ours, "TRL GRPOTrainer": trl}, args.repeats,
                 f"seconds per GRPO step, median of steps 2..{args.steps}, on {model}: "
                 f"{GRPO['prompts']} prompts x {GRPO['generations']} generations x "
                 f"{GRPO['max_new_tokens']} new tokens, LoRA r {GRPO['lora_r']}, beta 0, float32",
                 {"model": str(model), "settings": GRPO, "steps": args.steps})


def side_by_side(benchmark, runs, repeats, title, facts):
    """Run ours and TRL's (the second of `runs`, where `import trl` works) `repeats` times each,
    alternating so that a slow spell hits both; print a table of the median seconds per step and
    the peak RSS of each run, relative to TRL's, and one JSON line with every number."""
    if not importlib.util.find_spec("trl"):
        print("TRL is not installed here: timing ours only")
        runs = dict(list(runs.items())[:1])
    medians, peaks, all_times = {}, {}, {}
    for repeat in range(repeats):
        for number, (name, command) in enumerate(runs.items()):
            print(f"$ {' '.join(command)}", flush=True)
            times, peak = step_times(command, OUT / f"{benchmark}-{number}-{repeat}.log")
            medians.setdefault(name, []).append(statistics.median(times))
            peaks.setdefault(name, []).append(peak)
            all_times.setdefault(name, []).append([round(t, 3) for t in times])
    print(f"\n{title}")
    print("| implementation | seconds per step | relative to TRL | peak RSS (GB) | relative to TRL |")
    print("| --- | --- | --- | --- | --- |")
    trl_name = list(runs)[1] if len(runs) > 1 else None

    def relative(values, name):
        return " / ".join(f"{v / r:.2f}x" for v, r in zip(values, name)) if trl_name else "-"
    for name in runs:
        print(f"| {name} | {' / '.join(f'{m:.2f}' for m in medians[name])} | "
              f"{relative(medians[name], medians.get(trl_name, []))} | "
              f"{' / '.join(f'{p / 1e9:.2f}' for p in peaks[name])} | "
              f"{relative(peaks[name], peaks.get(trl_name, []))} |")
    versions = {package: __import__(package).__version__
                for package in ["torch", "transformers", "trl", "peft"]
                if importlib.util.find_spec(package)}
    print(json.dumps({"benchmark": benchmark, **facts, "seconds_per_step": medians,
                      "peak_rss_bytes": peaks, "step_seconds": all_times, "versions": versions}))


# distill: on-policy distillation from a separate teacher, the settings both implementations share.
DISTILL = {"prompts": 4, "max_new_tokens": 128, "lora_r": 16, "lora_alpha": 32, "temperature": 1.0,
           "lr": 1e-5, "seed": 0}


def distill_models():
    """The pair: the real-vocabulary stand-in as the student and another one (other random
    weights, the same tokenizer) as the teacher, built into models/ on first use."""
    return (random_model.write("standin", REPO / "models" / "standin"),
            random_model.write("standin", REPO / "models" / "standin-teacher",
                               seed=random_model.SEED + 1))


def gkd_worker(steps, out):
    """Train with TRL's GKDTrainer at the settings of DISTILL: lmbda 1 (the student samples every
    completion), beta 0 (the forward KL), the same teacher; print "step N" after each step."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    import common  # the same prompts as opsd.py's student
    student, teacher = distill_models()
    torch.manual_seed(DISTILL["seed"])
    tokenizer = AutoTokenizer.from_pretrained(student, padding_side="left")
    examples = common.load_examples("toy", "train")[:DISTILL["prompts"] * steps]
    dataset = Dataset.from_list([{"messages": [
        {"role": "user", "content": common.student_message(example)},
        {"role": "assistant", "content": example["solution"]}]} for example in examples])

    class PrintStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            print(f"step {state.global_step}", flush=True)

    config = GKDConfig(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=DISTILL["prompts"],
        gradient_accumulation_steps=1, lmbda=1.0, beta=0.0, temperature=DISTILL["temperature"],
        max_new_tokens=DISTILL["max_new_tokens"], learning_rate=DISTILL["lr"],
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=True, seed=DISTILL["seed"],
        logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True)
    lora = LoraConfig(r=DISTILL["lora_r"], lora_alpha=DISTILL["lora_alpha"], lora_dropout=0.0,
                      target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    trainer = GKDTrainer(
        model=AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32),
        teacher_model=AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32),
        args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=lora,
        callbacks=[PrintStep()])
    trainer.train()


def distill_speed(args):
    student, teacher = distill_models()
    ours = [sys.executable, "opsd.py", "--model", str(student), "--teacher-model", str(teacher),
            "--teacher-prompt", "plain", "--data", "toy", "--steps", str(args.steps),
            "--batch-size", str(DISTILL["prompts"]), "--num-generations", "1",
            "--max-new-tokens", str(DISTILL["max_new_tokens"]),
            "--temperature", str(DISTILL["temperature"]), "--top-p", "1.0", "--top-k", "0",
            "--jsd-beta", "0", "--clip", "0", "--lora-r", str(DISTILL["lora_r"]),
            "--lora-alpha", str(DISTILL["lora_alpha"]), "--lr", str(DISTILL["lr"]),
            "--schedule", "constant", "--max-grad-norm", "1.0", "--seed", str(DISTILL["seed"]),
            "--dtype", "float32", "--eval-n", "0", "--out", str(OUT / "distill-ours"),
            "--overwrite", "--micro-batch-size", "0", "--no-gradient-checkpointing"]  # as TRL's
    trl = [sys.executable, __file__, "gkd-worker", "--steps", str(args.steps)]
    side_by_side("distill", {"opsd.py --teacher-model": ours, "TRL GKDTrainer": trl}, args.repeats,
                 f"on-policy distillation, seconds per step (median of steps 2..{args.steps}) and "
                 f"peak RSS: student {student}, teacher {teacher} (vocabulary 151,936), "
                 f"{DISTILL['prompts']} prompts x {DISTILL['max_new_tokens']} new tokens, forward "
                 f"KL, LoRA r {DISTILL['lora_r']}, float32",
                 {"student": str(student), "teacher": str(teacher), "settings": DISTILL,
                  "steps": args.steps})


def rollout_speed(args):
    """Seconds to sample GRPO's rollouts with engine.generate and with model.generate at identical
    sampling (temperature 1, no top-k, no top-p; 8 prompts x 8 samples x 48 new tokens), in this
    process, alternating, the median of --repeats calls each after one warm-up call."""
    import torch
    from transformers import GenerationConfig

    import common
    import engine
    model_path = args.model or random_model.write("tiny", REPO / "models" / "tiny")
    model, tokenizer = common.load_model(str(model_path), "float32")
    prompts = [prompt for prompt, _ in grpo_prompts(tokenizer, 1)]
    n, max_new = GRPO["generations"], GRPO["max_new_tokens"]
    config = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                              max_new_tokens=max_new, num_return_sequences=n,
                              eos_token_id=engine.end_token_ids(model, tokenizer),
                              pad_token_id=tokenizer.pad_token_id)

    def ours():
        return engine.generate(model, tokenizer, prompts, max_new, 1.0, num_samples=n)[
            "num_generated_tokens"]

    def transformers_generate():
        encoded = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left",
                            add_special_tokens=False)
        with torch.no_grad():
            output = model.generate(**encoded, generation_config=config)
        return output.shape[0] * (output.shape[1] - encoded["input_ids"].shape[1])

    times = {"engine.generate": [], "model.generate": []}
    for repeat in range(args.repeats + 1):
        for name, sample in [("engine.generate", ours), ("model.generate", transformers_generate)]:
            start = time.time()
            sample()
            if repeat:  # the first call of each warms up
                times[name].append(time.time() - start)
    medians = {name: statistics.median(seconds) for name, seconds in times.items()}
    print(f"rollouts on {model_path}: {len(prompts)} prompts x {n} samples x {max_new} new tokens")
    for name, median in medians.items():
        print(f"{name}: {median:.3f} s (median of {args.repeats})")
    print(f"engine.generate is {medians['model.generate'] / medians['engine.generate']:.2f}x as fast")
    print(json.dumps({"benchmark": "rollouts", "model": str(model_path), "seconds": times}))


SYNC_OPS = {"aten::item", "aten::is_nonzero", "aten::nonzero", "aten::_local_scalar_dense",
            "aten::masked_select", "aten::equal"}  # each reads a GPU result on the host


def decode_counts(args):
    """The `decode` benchmark: aten calls, sync-like calls and cache reallocations of one rollout."""
    import torch
    from torch.autograd.profiler import record_function
    from torch.overrides import TorchFunctionMode
    from torch.profiler import ProfilerActivity, profile

    import common
    import engine
    from lora import apply_lora

    class CountToList(TorchFunctionMode):  # tolist() copies to the host: a sync on a GPU
        count = 0

        def __torch_function__(self, func, types, func_args=(), kwargs=None):
            CountToList.count += func is torch.Tensor.tolist
            return func(*func_args, **(kwargs or {}))

    model, tokenizer = common.load_model("toy", "float32", device="cpu")
    prompts = [common.chat_prompt(tokenizer, common.student_message(example))
               for example in common.load_examples("toy", "test")[:8]]
    decoder, reallocations = model.get_decoder(), []
    real_reallocate = engine.PreallocatedLayer.reallocate

    def counted_reallocate(layer, *rest, **kwargs):
        reallocations.append(id(layer))
        return real_reallocate(layer, *rest, **kwargs)

    def enter_layer(module, _):
        module.profiled_range = record_function("decoder layer")
        module.profiled_range.__enter__()

    def exit_layer(module, *_):
        module.profiled_range.__exit__(None, None, None)

    forward_passes = []
    hooks = [decoder.register_forward_pre_hook(lambda *_: forward_passes.append(1))]
    for layer in decoder.layers:
        hooks += [layer.register_forward_pre_hook(enter_layer), layer.register_forward_hook(exit_layer)]
    engine.PreallocatedLayer.reallocate = counted_reallocate
    results = {}
    try:
        for label, rank in [("toy", 0), ("toy, LoRA r 16", 16)]:
            if rank:
                apply_lora(model, rank, 2 * rank)
            torch.manual_seed(0)
            engine.generate(model, tokenizer, prompts, 32, 0.7, num_samples=4)  # warm-up
            torch.manual_seed(0)
            forward_passes.clear(), reallocations.clear()
            CountToList.count = 0
            with profile(activities=[ProfilerActivity.CPU]) as profiler, CountToList():
                rollouts = engine.generate(model, tokenizer, prompts, 32, 0.7, num_samples=4)
            steps = len(forward_passes) - 1  # the first pass is the prefill
            events = profiler.events()
            top_level = [e for e in events if e.name.startswith("aten::") and (
                e.cpu_parent is None or e.cpu_parent.name == "decoder layer")]
            in_layers = [e for e in top_level if e.cpu_parent is not None]

            def has_sync_ancestor(event):
                parent = event.cpu_parent
                while parent is not None:
                    if parent.name in SYNC_OPS:
                        return True
                    parent = parent.cpu_parent
                return False
            syncs = sum(e.name in SYNC_OPS and not has_sync_ancestor(e) for e in events)
            results[label] = {
                "decode_steps": steps, "generated_tokens": rollouts["num_generated_tokens"],
                "aten_calls_per_step": round(len(top_level) / steps, 1),
                "aten_calls_per_layer_and_step": round(
                    len(in_layers) / (len(forward_passes) * len(decoder.layers)), 1),
                "sync_calls_per_step": round((syncs + CountToList.count) / steps, 2),
                "cache_reallocations_per_rollout": len(reallocations) // len(decoder.layers)}
    finally:
        engine.PreallocatedLayer.reallocate = real_reallocate
        for hook in hooks:
            hook.remove()
    print(f"one rollout of engine.generate on the toy model, CPU, {len(prompts)} prompts x 4 "
          "samples x 32 new tokens, temperature 0.7")
    print("| model | decode steps | aten calls / step | aten calls / layer and step | "
          "sync-like calls / step | cache reallocations / rollout |")
    print("|---|---|---|---|---|---|")
    for label, row in results.items():
        print(f"| {label} | {row['decode_steps']} | {row['aten_calls_per_step']} | "
              f"{row['aten_calls_per_layer_and_step']} | {row['sync_calls_per_step']} | "
              f"{row['cache_reallocations_per_rollout']} |")
    print(json.dumps({"benchmark": "decode", "results": results}))
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    parser_memory = commands.add_parser("memory", help="peak RSS of one step of each script")
    parser_memory.add_argument("--model", help="model folder (default: the stand-in, built on "
                                               "first use in models/standin)")
    parser_memory.add_argument("--scripts", nargs="+", choices=list(MEMORY_SCRIPTS),
                               default=list(MEMORY_SCRIPTS), help="which scripts (default: all)")
    parser_grpo = commands.add_parser("grpo", help="seconds per step: grpo.py and TRL's GRPOTrainer")
    parser_grpo.add_argument("--model", help="model folder (default: the tiny random Qwen3, built "
                                             "on first use in models/tiny)")
    parser_grpo.add_argument("--steps", type=int, default=8,
                             help="steps per run; the first is left out (default: 8)")
    parser_grpo.add_argument("--repeats", type=int, default=1,
                             help="run each implementation this many times, alternating")
    parser_rollouts = commands.add_parser("rollouts",
                                          help="seconds: engine.generate against model.generate")
    parser_rollouts.add_argument("--model", help="model folder (default: models/tiny)")
    parser_rollouts.add_argument("--repeats", type=int, default=5,
                                 help="timed calls of each, after one warm-up (default: 5)")
    parser_distill = commands.add_parser(
        "distill", help="seconds per step and peak memory: opsd.py --teacher-model and TRL's "
                        "GKDTrainer")
    parser_distill.add_argument("--steps", type=int, default=4,
                                help="steps per run; the first is left out (default: 4)")
    parser_distill.add_argument("--repeats", type=int, default=3,
                                help="run each implementation this many times, alternating")
    commands.add_parser("decode", help="aten calls, syncs and cache reallocations of one rollout")
    gkd = commands.add_parser("gkd-worker")  # internal: one TRL run, for `distill`
    gkd.add_argument("--steps", type=int, required=True, help="training steps")
    worker = commands.add_parser("trl-worker")  # internal: one TRL run, for `grpo`
    worker.add_argument("--model", required=True, help="model folder")
    worker.add_argument("--steps", type=int, required=True, help="training steps")
    args = parser.parse_args()
    if args.command == "trl-worker":
        trl_worker(args.model, args.steps, OUT / "grpo-trl")
    elif args.command == "gkd-worker":
        gkd_worker(args.steps, OUT / "distill-trl")
    else:
        {"memory": memory, "grpo": grpo_speed, "distill": distill_speed,
         "rollouts": rollout_speed, "decode": decode_counts}[args.command](args)


if __name__ == "__main__":
    main()
