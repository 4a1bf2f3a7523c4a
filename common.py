"""common.py: what sft.py, grpo.py and opsd.py share, as plain functions in the order a script's
main() meets them; no method, nothing only for speed (engine.py's). Notes: docs/common.md."""
import argparse
import atexit
import importlib.metadata
import json
import math
import os
import random
import re
import shutil
import sys
import time
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

import engine
from lora import apply_lora, load_lora, save_lora

REPO = Path(__file__).resolve().parent
TOY_DIR = REPO / "toy"  # the built-in task (train.jsonl, test.jsonl) and model (toy/model)


class InputError(Exception):
    """Bad input from the user (file, field, model name): the scripts print it as one line."""


def exit_with_error(message):  # what bad input gets, from argparse or from our checks
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def run_cli(main):  # a script's main(); bad input and Ctrl-C each end in one line, not a traceback
    try:
        main()
    except InputError as error:
        exit_with_error(error)
    except KeyboardInterrupt:
        print("\ninterrupted: --resume continues from the last checkpoint (--save-every N writes "
              "them during a run)", file=sys.stderr)
        sys.exit(130)  # the shell's code for Ctrl-C
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# ---- Arguments shared by the three scripts (same flag, same meaning everywhere) ------------------

def add_common_args(parser):
    add = parser.add_argument
    add("--model", default="toy", help="Hugging Face model id or local folder; 'toy' = built-in")
    add("--data", default="toy", help="'toy' or a local .jsonl/.json file of problems")
    add("--eval-data", default=None,
        help="held-out file; if none, a fixed slice of --data (of the toy: its test split)")
    add("--out", default=None, help="output folder; if none, out/<method>")
    add("--overwrite", action="store_true",
        help="replace the run already in --out (its checkpoints, metrics and summary)")
    add("--resume", action="store_true",
        help="continue the run in --out from its newest intact checkpoint")
    add("--show-inputs", action="store_true", help="print the first example as the model sees it "
        "(every run does, into --out's inputs.txt), then exit without training")
    add("--save-every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    add("--keep-checkpoints", type=int, default=2, help="the newest N checkpoints are kept")
    add("--steps", type=int, default=100, help="training steps, each on --batch-size new prompts")
    add("--batch-size", type=int, default=32, help="prompts per step (per process under torchrun)")
    add("--micro-batch-size", type=int, default=16, help="rows per forward and backward pass; a "
        "step accumulates the gradients of its micro-batches (0: all rows of the step at once)")
    add("--lr", type=float, default=5e-6, help="peak learning rate of AdamW")
    add("--warmup-steps", type=int, default=0, help="steps of linear warmup from 0 to --lr")
    add("--schedule", choices=["cosine", "constant"], default="cosine",
        help="the learning rate after warmup: cosine decay to 0, or constant")
    add("--weight-decay", type=float, default=0.0, help="AdamW's decoupled weight decay")
    add("--max-grad-norm", type=float, default=1.0, help="gradient norm clipping")
    add("--seed", type=int, default=0, help="data order, LoRA initialisation and sampling")
    add("--full", action="store_true", help="full fine-tuning instead of LoRA")
    add("--lora-r", type=int, default=64, help="LoRA rank")
    add("--lora-alpha", type=int, default=128,
        help="LoRA scale numerator: updates scale by alpha/r")
    add("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA path's input")
    add("--dora", action="store_true",
        help="DoRA: LoRA's direction plus a trained magnitude per output row (lora.py)")
    add("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
        help="recompute each layer's activations in the backward pass instead of keeping them")
    add("--dtype", choices=["auto", "bfloat16", "float32"], default="auto",
        help="compute precision (auto: bfloat16 on CUDA, float32 on CPU); --full keeps its weights "
             "in float32 and computes in --dtype under autocast")
    add("--max-new-tokens", type=int, default=1024,
        help="longest completion, sampled or trained on, in tokens")
    add("--chunk-size", type=int, default=128, help="completion positions per chunk of the "
        "output layer and loss (memory: a few [chunk, vocabulary] float32 tensors)")
    add("--temperature", type=float, default=1.0, help="sampling of the model's own completions")
    add("--top-p", type=float, default=1.0, help="nucleus sampling of them (1: off)")
    add("--top-k", type=int, default=0, help="top-k sampling of them (0: off)")
    add("--eval-n", type=int, default=500, help="held-out problems to evaluate on (0: none)")
    add("--eval-batch-size", type=int, default=64, help="rows per generate call in evaluation")
    add("--eval-every", type=int, default=0, help="greedy held-out accuracy every N steps (0: off)")
    add("--eval-before", action=argparse.BooleanOptionalAction, default=True,
        help="evaluate the starting model before training (off: runs of a study from one base "
             "evaluated once, by toy/evaluate.py)")
    add("--eval-k", type=int, default=0, help="before and after training, also sample K "
        "completions per held-out problem: mean@K, pass@K, maj@K (0: greedy accuracy only)")
    add("--eval-temperature", type=float, default=1.0, help="sampling temperature of --eval-k")
    parser.set_defaults(updates_per_step=1)  # optimizer updates per step, for the schedule


# name -> (test, what it must be), for every parser with the flag; scripts add theirs (parse_args)
RANGES = {
    **dict.fromkeys(["steps", "batch_size", "keep_checkpoints", "lora_r", "max_new_tokens",
                     "chunk_size", "eval_batch_size"], (lambda v: v >= 1, "at least 1")),
    **dict.fromkeys(["lr", "max_grad_norm", "lora_alpha", "eval_temperature"],
                    (lambda v: v > 0, "positive")),
    **dict.fromkeys(["warmup_steps", "weight_decay"], (lambda v: v >= 0, "at least 0")),
    "micro_batch_size": (lambda v: v >= 0, "at least 0 (0: all rows of a step at once)"),
    "save_every": (lambda v: v >= 0, "at least 0 (0: only at the end)"),
    "lora_dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "temperature": (lambda v: v >= 0, "at least 0 (0: greedy)"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "top_k": (lambda v: v >= 0, "at least 0 (0: off)"),
    "eval_n": (lambda v: v >= 0, "at least 0 (0: no held-out evaluation)"),
    "eval_every": (lambda v: v >= 0, "at least 0 (0: off)"),
    "eval_k": (lambda v: v >= 0, "at least 0 (0: greedy accuracy only)"),
}


def parse_args(parser, argv, defaults, toy_settings, ranges=None):
    """Parse argv with the script's `defaults` (toy: `toy_settings`); check RANGES and `ranges`."""
    parser.set_defaults(**defaults)
    for action in parser._actions:  # --help: "... (default: 5e-06; toy: 0.0005)"
        if action.help and action.dest in toy_settings:
            action.help += f" (default: %(default)s; toy: {toy_settings[action.dest]})"
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter  # the others' defaults
    parser.error = lambda message: exit_with_error(f"{message} (see --help)")  # one line
    args = parser.parse_args(argv)
    if args.model == "toy":
        settings = {key: value for key, value in toy_settings.items() if hasattr(args, key)}
        parser.set_defaults(**settings)
        args = parser.parse_args(argv)
        print("toy settings: " + ", ".join(f"{key}={value}" for key, value in settings.items()
                                           if getattr(args, key) == value))
    for name, value in vars(args).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise InputError(f"--{name.replace('_', '-')} {value}: must be a finite number")
    for name, (valid, must_be) in {**RANGES, **(ranges or {})}.items():
        if hasattr(args, name) and not valid(getattr(args, name)):
            raise InputError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be {must_be}")
    if getattr(args, "dora", False) and args.full:
        raise InputError("--dora adapts LoRA layers: it cannot go with --full")
    return args


# ---- The run: what a script carries from step to step, made by `start_run` -----------------------

@dataclass
class Run:  # a training run in progress: a plain record, changed by the functions below
    args: argparse.Namespace
    model: torch.nn.Module
    tokenizer: object
    train_examples: list
    eval_examples: list  # the held-out problems (--eval-n of them)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    step: int  # steps done (a step may take several optimizer updates: `start_run`)
    state: dict  # what a checkpoint's state.json keeps: data position, token counters, "before"
    metrics_file: object = None  # metrics.jsonl, one row per step (rank 0's)
    loop_started: float = 0.0  # time.time() at this process's first step
    first_step: int = 0  # the step this process started at (a resumed run's checkpoint)
    wall_before: float = 0.0  # seconds of the run before this process's first step
    step_started: float = 0.0  # time.time() at the start of the current step (`next_batch`)
    generated_before_step: int = 0  # state["generated_tokens"] then
    method_tensors: dict = field(default_factory=dict)  # a method's tensors kept in checkpoints
    stalled_steps: int = 0  # steps in a row that trained nothing (`end_step`)


def start_run(args, first_inputs=None):
    """Folder, data, model, AdamW and schedule; resume, show the inputs (`show_inputs`), evaluate
    the start: a `Run`, training."""
    started = time.time()
    init_distributed()
    checkpoint = None if args.show_inputs else prepare_out(args)  # before anything slow
    random.seed(args.seed)
    torch.manual_seed(args.seed)  # the same LoRA initialisation on every rank
    train_examples = load_examples(args.data, "train")  # bad data fails before the slow load
    eval_split = "all" if args.eval_data not in (None, "toy") else "test"  # a file: all held out
    eval_examples = load_examples(args.eval_data or args.data, eval_split)[:args.eval_n]
    model, tokenizer = load_model(args.model, args.dtype, args.full, args.gradient_checkpointing)
    if not args.full:
        apply_lora(model, args.lora_r, args.lora_alpha, args.lora_dropout, dora=args.dora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    adapter = "full" if args.full else f"{'DoRA' if args.dora else 'LoRA'} r={args.lora_r}"
    print(f"model {args.model}: {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{trainable:,} trainable ({adapter})")
    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    scheduler = make_scheduler(optimizer, args.warmup_steps, args.steps * args.updates_per_step,
                               args.schedule)
    if world_size() > 1:
        print(f"data parallel: {world_size()} processes, {args.batch_size} prompts each per step")
        random.seed(args.seed + rank())
        torch.manual_seed(args.seed + rank())  # each rank samples its rollouts from its own stream
    run = Run(args, model, tokenizer, train_examples, eval_examples, optimizer, scheduler, step=0,
              state={"data_position": 0, "train_tokens": 0, "generated_tokens": 0,
                     "wall_seconds": 0.0, "eval_seconds": 0.0,
                     "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    if checkpoint:
        load_checkpoint(checkpoint, run)
        print(f"resumed from {checkpoint} at step {run.step}")
    show_inputs(run, first_inputs or (lambda run, example: (
        {"policy": student_prompts(run.tokenizer, [example])[0]}, None)))
    if not checkpoint:
        run.state["before"] = run_evaluation(run, args.eval_k) if args.eval_before else None
        print(f"before: {describe(run.state['before'])}" if args.eval_before else
              "before: not evaluated (--no-eval-before)")
    run.state["wall_seconds"] += time.time() - started
    run.metrics_file = open_metrics(args.out, run.step)
    model.train()
    run.loop_started, run.first_step, run.wall_before = (time.time(), run.step,
                                                         run.state["wall_seconds"])
    return run


RUN_FILES = ("metrics.jsonl", "summary.json")  # a run's, besides its checkpoint-* folders


def make_folder(out):  # --out, made now, before anything slow
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file: give a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"--out {out}: cannot make the folder ({error.strerror})") from None


def prepare_out(args):
    """Make --out this run's folder, one run at a time (`lock`), and log the run in it; return the
    checkpoint --resume continues from (docs/common.md)."""
    out = Path(args.out)
    if any(folder.name.startswith("checkpoint-") for folder in [out, *out.resolve().parents]):
        raise InputError(f"--out {out} is inside a checkpoint, which its run may delete")
    if args.resume and args.overwrite:
        raise InputError("--resume continues the run in --out, --overwrite replaces it: give one")
    make_folder(out)
    lock = check_lock(out)
    existing = sorted(out.glob("checkpoint-*"), reverse=True) + [out / f for f in RUN_FILES
                                                                 if (out / f).exists()]
    if existing and not (args.resume or args.overwrite):
        newest = f"{existing[0].name}, its newest checkpoint" if existing[0].is_dir() else \
            existing[0].name
        raise InputError(f"--out {out} holds a run ({newest}): continue it with --resume, give "
                         "another --out, or replace it with --overwrite")
    existing += [out / "runs.jsonl"] if (out / "runs.jsonl").exists() else []
    for flag in ("model", "data", "eval_data"):  # --overwrite must not remove what this run reads
        used = Path(str(getattr(args, flag))).resolve()
        if args.overwrite and any(path.resolve() in [used, *used.parents] for path in existing):
            raise InputError(f"--overwrite would delete --{flag.replace('_', '-')} "
                             f"{getattr(args, flag)}: give another --out")
    checkpoint = intact_checkpoint(out) if args.resume else None
    if args.resume and not checkpoint:
        raise InputError(f"--resume: no checkpoint in {out} to continue (--save-every N writes "
                         "them during a run): start without --resume")
    if checkpoint:
        saved = json.loads((checkpoint / "args.json").read_text())
        lora_flags = [] if args.full else ["lora_r", "lora_alpha", "dora"]
        for name in ["method", "model", "full"] + lora_flags:
            if name in saved and saved[name] != getattr(args, name):
                what = name if name == "method" else "--" + name.replace("_", "-")
                raise InputError(f"--resume: {checkpoint} was trained with {what} {saved[name]}, "
                                 f"this run has {getattr(args, name)}: resume with the same, or "
                                 "give another --out")
        if saved["steps"] != args.steps and args.schedule != "constant":
            print(f"note: --steps {args.steps}, the run in {checkpoint.name} had {saved['steps']}: "
                  f"the {args.schedule} schedule now spans {args.steps} steps, so the learning "
                  "rate changes at the resume")
    if dist.is_initialized():
        dist.barrier()  # every rank has looked at --out before rank 0 changes it
    if rank() == 0:
        for path in existing if args.overwrite else []:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        with open(out / "runs.jsonl", "a") as runs:
            runs.write(json.dumps({"method": args.method, "command": sys.argv,
                                   "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                   "args": vars(args)}) + "\n")
        lock.write_text(f"{os.getpid()}\n")
        atexit.register(release_lock, out)  # however the process ends, but for a kill
    if dist.is_initialized():
        dist.barrier()  # no rank reads --out before it is ready
    return checkpoint


def check_lock(out):
    """out/run.lock, which a running run holds with its process id: InputError while that process
    lives (one run per --out); the lock of a process gone (killed, its machine lost) is ignored."""
    lock = out / "run.lock"
    try:
        holder = int(lock.read_text().split()[0])
    except (OSError, ValueError, IndexError):  # no lock, or not one of ours
        holder = None
    try:
        os.kill(holder, 0) if holder else None  # signal 0 sends nothing: is the process there?
    except PermissionError:  # it is, another user's
        pass
    except OSError:  # it is gone: killed, or its machine lost
        holder = None
    if holder not in (None, os.getpid()):
        raise InputError(f"--out {out} is in use by a running process (pid {holder}, {lock}): "
                         "wait for it or stop it, or give another --out")
    return lock


def release_lock(out):  # at the run's end: the lock goes if this process holds it
    lock = Path(out) / "run.lock"
    if lock.is_file() and lock.read_text().split() == [str(os.getpid())]:
        lock.unlink()


# ---- Data parallel under torchrun: N ranks of --batch-size B train as one process of N*B ---------

def default_device():  # where the scripts put models (docs/common.md)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def init_distributed():  # join torchrun's process group, if any; only rank 0 prints
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        cuda = default_device().type == "cuda"
        if cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # one GPU per rank
        dist.init_process_group("nccl" if cuda else "gloo")
        if dist.get_rank() != 0:
            sys.stdout = open(os.devnull, "w")


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def global_sum(value, op=dist.ReduceOp.SUM):
    """The sum (or `op`) of a number over all ranks (the number itself in a single process)."""
    if not dist.is_initialized():
        return value
    total = torch.tensor(float(value), dtype=torch.float64,
                         device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(total, op=op)
    return type(value)(total.item())


def global_mean(value):
    """The mean over ranks of a per-rank mean (ranks hold batches of equal size)."""
    return global_sum(value) / world_size()


def gather_objects(value):  # [value of rank 0, value of rank 1, ...] on every rank
    if not dist.is_initialized():
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


# ---- Model and tokenizer -------------------------------------------------------------------------

def model_folder(name_or_path):  # --model as transformers takes it
    return str(TOY_DIR / "model") if name_or_path == "toy" else name_or_path


def check_model_path(name_or_path):
    """InputError at once for a local path that is not there (rather than minutes of hub retries)
    and for an adapter folder given as a model; a path: absolute, ./ ../ ~, or whose first folder
    exists here (a Hugging Face id org/name whose org is a local folder: run elsewhere)."""
    path = Path(name_or_path).expanduser()
    if name_or_path == "toy":
        return
    if not path.exists() and (name_or_path.startswith((".", "~", "/")) or
                              Path(path.parts[0]).is_dir()):
        found = next(parent for parent in path.parents if parent.is_dir())
        raise InputError(f"--model {name_or_path}: no such folder ({found} is a folder here: "
                         "a path, not a Hugging Face id)")
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        raise InputError(f"--model {name_or_path} is a LoRA adapter, not a model: its base is "
                         f"{base} (give that as --model; toy/evaluate.py --adapter evaluates it)")


def cannot_load(name_or_path, error):  # the InputError for a model that does not load
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return InputError(f"cannot load model '{name_or_path}': not a model folder here and not a "
                      f"downloadable Hugging Face model id ({reason})")


def load_tokenizer(name_or_path):
    from transformers import AutoTokenizer
    check_model_path(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(model_folder(name_or_path))
    except (OSError, ValueError) as error:
        raise cannot_load(name_or_path, error) from None


def flash_attention_usable():  # whether flash-attn 2.1+ is installed (docs/common.md)
    try:
        version = importlib.metadata.version("flash_attn")
    except importlib.metadata.PackageNotFoundError:
        return False
    if tuple(int(part) for part in re.findall(r"\d+", version)[:2]) < (2, 1):
        print(f"note: flash-attn {version} is older than 2.1 (causal masks of a shorter query "
              "aligned at the top left): attention runs through SDPA instead")
        return False
    return True


def load_model(name_or_path="toy", dtype="auto", full=False, gradient_checkpointing=False,
               device=None):
    """(model, tokenizer) to compute in `dtype`; --full keeps float32 weights (docs/common.md)."""
    from transformers import AutoModelForCausalLM  # slow import, only when needed
    from transformers.utils.logging import disable_progress_bar
    disable_progress_bar()  # per-file loading bars would drown the one-line-per-step log
    tokenizer, path = load_tokenizer(name_or_path), model_folder(name_or_path)
    device = torch.device(device or default_device())
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    attn = "flash_attention_2" if device.type == "cuda" and flash_attention_usable() else "sdpa"
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32 if full else dtype,
                                                     attn_implementation=attn)
    except (OSError, ValueError) as error:
        raise cannot_load(name_or_path, error) from None
    if unsupported := engine.unsupported_cache_layers(model):
        raise InputError(f"cannot use model '{name_or_path}': its KV cache has "
                         f"{', '.join(unsupported)} layers, and the scripts' sampler and training "
                         "pass handle attention only")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # safe: masks are built from lengths, not pad ids
    tokenizer.padding_side = "left"  # generation appends on the right: prompts align there
    model.to(device)
    if full and dtype != torch.float32:  # mixed precision: products in `dtype`, weights float32
        for part in (model.get_decoder(), model.get_output_embeddings()):  # what the code calls
            part.forward = torch.autocast(device.type, dtype=dtype)(part.forward)
    if gradient_checkpointing:  # non-reentrant: gradients reach LoRA past the frozen embeddings
        if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.x
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable({"use_reentrant": False})
        engine.keep_cache_in_recomputed_layers(model)
    return model, tokenizer


# ---- Data: {"question", "answer": "steps...\n#### 18"} (GSM8K) or {"problem", "solution"} --------

def parse_json(text, path, line=1):  # `line`: the file's line that `text` starts on
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise InputError(f"{path}:{line + error.lineno - 1}: bad JSON ({error.msg})") from None


def read_records(path):  # a .jsonl or .json (a list) file's examples; errors name the line
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        records = parse_json(text, path)
        if not isinstance(records, list):
            raise InputError(f"{path}: expected a JSON list of records")
        numbered = list(enumerate(records, start=1))
    else:
        numbered = [(number, parse_json(line, path, number))
                    for number, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not numbered:
        raise InputError(f"{path}: no records (empty file)")
    return [to_example(record, f"{path}:{number}") for number, record in numbered]


def to_example(record, where):  # -> {"question", "solution", "answer": the final answer}
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected a JSON object")
    question = record.get("question", record.get("problem"))
    solution = record.get("answer", record.get("solution"))  # GSM8K's "answer": worked solution
    if not isinstance(question, str) or not question.strip():
        raise InputError(f"{where}: missing field 'question' (or 'problem')")
    if not isinstance(solution, str) or not solution.strip():
        raise InputError(f"{where}: missing field 'answer' (or 'solution') with a worked solution")
    final = record.get("final_answer", record.get("Answer"))
    final = normalize_answer(str(final)) if final is not None else extract_answer(solution)
    if final is None:
        raise InputError(f"{where}: no final answer: add 'final_answer', or end the solution with "
                         "'#### N' or \\boxed{N}")
    return {"question": question, "solution": solution, "answer": final}


def load_examples(spec, split="train", holdout=500):
    """Examples of `spec` ('toy' or a file), split 'train', 'test' or 'all' (docs/common.md)."""
    if spec == "toy":
        splits = ["train", "test"] if split == "all" else [split]
        return [e for name in splits for e in read_records(TOY_DIR / f"{name}.jsonl")]
    examples = read_records(spec)
    if split == "all":
        return examples
    order = list(range(len(examples)))
    random.Random(1234).shuffle(order)
    num_test = min(holdout, max(1, len(examples) // 10))
    chosen = order[:num_test] if split == "test" else order[num_test:]
    if not chosen:
        raise InputError(f"{spec}: too few records to hold out a test split ({len(examples)})")
    return [examples[i] for i in sorted(chosen)]


def batch_indices(num_examples, batch_size, position, seed):
    """Indices of the examples at positions [position, position + batch_size) (docs/common.md)."""
    indices = []
    for p in range(position, position + batch_size):
        epoch, offset = divmod(p, num_examples)
        generator = torch.Generator().manual_seed(seed * 100003 + epoch)  # the CPU's, everywhere
        indices.append(int(torch.randperm(num_examples, generator=generator, device="cpu")[offset]))
    return indices


def next_batch(run):  # start a step's clock; this rank's examples (docs/common.md)
    args, state = run.args, run.state
    run.step_started, run.generated_before_step = time.time(), state["generated_tokens"]
    first = state["data_position"] + rank() * args.batch_size
    indices = batch_indices(len(run.train_examples), args.batch_size, first, args.seed)
    state["data_position"] += args.batch_size * world_size()
    return [run.train_examples[i] for i in indices]


# ---- Prompts and answer checking -----------------------------------------------------------------

INSTRUCTIONS = {"####": "Solve it step by step and write the final answer after '####'.",
                "boxed": "Please reason step by step, and put your final answer within \\boxed{}."}


def answer_style(solution):  # the data set's style of final answer, from a reference solution
    return "####" if "####" in solution else "boxed"


def student_prompt(question, style="####"):  # what the model solves: no solution shown
    return f"{question}\n{INSTRUCTIONS[style]}"


def student_message(example):  # the problem alone, with its data set's instruction
    return student_prompt(example["question"], answer_style(example["solution"]))


def solution_prompt(question, solution):  # OPSD's teacher prompt (the paper's template)
    return (f"{question}\n\nHere is a reference solution:\n{solution}\n\n"
            "After understanding the reference solution, please try to solve this problem using "
            f"your own approach below.\n{INSTRUCTIONS[answer_style(solution)]}")


def chat_prompt(tokenizer, message, thinking=False):  # the chat template, or plain text
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                             add_generation_prompt=True, enable_thinking=thinking)
    return f"Problem: {message}\nSolution:\n"


def last_boxed(text):  # the content of the last \boxed{...}, nested braces and all, or None
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def normalize_answer(answer):  # equal answers become equal strings (docs/common.md)
    answer = answer.replace("\\$", "").replace("$", "").strip().rstrip(".").strip()
    try:
        value = float(answer.replace(",", ""))  # commas in a number separate thousands
    except ValueError:
        answer = re.sub(r"\\(left|right)\b", "", answer)  # \b: \rightarrow stays
        return answer.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace(" ", "")
    return str(int(value)) if value.is_integer() else repr(value)


VALUE_START = re.compile(r"-?(\.?\d|[\\([])")  # 18, -3, .5, \frac, (1, 2), [0, 1): not a word
NUMBERED_HEADING = re.compile(r"\d+[.)]\s+[A-Za-z]")  # '#### 2. Verification', '#### 1) Set up'
UNITS = re.compile(r"\s+[A-Za-z]{2,}.*")  # from the first word of 2+ letters on; x of 2x + y stays


def extract_answer(text):  # from the last \boxed{} or '####' (docs/common.md), or None
    boxed_at = text.rfind("\\boxed{")
    for marker in reversed(list(re.finditer(r"####(.*)", text))):  # '.' stops at line end
        if marker.start() < boxed_at:
            break  # a \boxed{} comes after this and every earlier '####'
        value = marker.group(1).replace("**", "").replace("\\$", "").replace("$", "").strip()
        if VALUE_START.match(value) and not NUMBERED_HEADING.match(value):  # else a heading
            return normalize_answer(UNITS.sub("", value).removesuffix("%"))  # '50%' answers '50'
    boxed = last_boxed(text)
    return normalize_answer(boxed) if boxed is not None else None


def is_correct(completion, reference_answer):
    predicted = extract_answer(completion)
    return predicted is not None and predicted == normalize_answer(reference_answer)


def judge(texts, examples, group_size):  # [N] bool (CPU): text i answers examples[i // group_size]
    return torch.tensor([is_correct(text, examples[i // group_size]["answer"])
                         for i, text in enumerate(texts)], dtype=torch.bool, device="cpu")


# ---- A step's rollouts ---------------------------------------------------------------------------

def student_prompts(tokenizer, examples, thinking=False):
    return [chat_prompt(tokenizer, student_message(example), thinking) for example in examples]


def sample_rollouts(run, model, prompts, num_samples):  # engine.generate, the script's flags
    rollouts = engine.generate(model, run.tokenizer, prompts, run.args.max_new_tokens,
                               run.args.temperature, run.args.top_p, run.args.top_k, num_samples)
    run.state["generated_tokens"] += global_sum(rollouts["num_generated_tokens"])  # of all ranks
    return rollouts


def rollout_health(rollouts):
    """The rollouts' mean completion length in tokens and the share cut at --max-new-tokens (no
    end token): a run whose answers shrink or run to the limit shows it here first. All ranks."""
    lengths = [len(ids) for ids in rollouts["completions"]]
    cut = [not finished for finished in rollouts["finished"]]
    return {"completion_length": global_mean(sum(lengths) / len(lengths)),
            "truncated_fraction": global_mean(sum(cut) / len(cut))}


BOUNDARY = "⟦|⟧"  # in the inputs shown: where the prompt ends and the completion begins


def show_inputs(run, first_inputs):
    """Print the first example as the model sees it, and write it to --out's inputs.txt:
    `first_inputs(run, example)` -> ({name: prompt text}, the completion's ids, or None to sample
    one from the first prompt), decoded with special tokens, BOUNDARY between prompt and
    completion, token counts. Several prompts must give the completion the same ids
    (`check_boundary`). The random streams are left as they were. --show-inputs: exit here."""
    args, tokenizer, model = run.args, run.tokenizer, run.model
    prompts, completion = first_inputs(run, run.train_examples[0])
    what = "sampled" if completion is None else "trained on"
    if completion is None:
        with torch.random.fork_rng([model.device] if model.device.type == "cuda" else []):
            torch.manual_seed(args.seed)  # every rank the same sample, so the same check result
            completion = engine.generate(model, tokenizer, list(prompts.values())[:1],
                                         args.max_new_tokens, args.temperature, args.top_p,
                                         args.top_k)["completions"][0]
    text = tokenizer.decode(completion)  # special tokens shown
    lines = [f"inputs: the first example as the model sees it ({BOUNDARY}: where the prompt ends)"]
    for name, prompt in prompts.items():
        size = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        lines += [f"== {name} prompt, {size} tokens {BOUNDARY} completion, {len(completion)} "
                  f"tokens ({what}) ==", prompt + BOUNDARY + text]
        what = "the same tokens"
    if len(prompts) > 1:
        check_boundary(tokenizer, prompts, text)
        lines.append(f"== checked: the completion's {len(completion)} token ids are the same after "
                     "each prompt (no merge across the boundary) ==")
    print("\n".join(lines))
    if args.show_inputs:
        sys.exit(0)
    if rank() == 0:
        (Path(args.out) / "inputs.txt").write_text("\n".join(lines) + "\n")


def check_boundary(tokenizer, prompts, completion_text):
    """InputError unless the completion's text tokenises to the same ids after every prompt, and
    each prompt to its own ids: what a teacher scores is then what the student wrote."""
    tails = {}
    for name, prompt in prompts.items():
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        whole = tokenizer(prompt + completion_text, add_special_tokens=False)["input_ids"]
        if whole[:len(prompt_ids)] != prompt_ids:
            raise InputError(f"the {name} prompt's last token merges with the completion's first "
                             f"({tokenizer.decode(prompt_ids[-1:])!r}): the prompts must end "
                             "where a token ends")
        tails[name] = whole[len(prompt_ids):]
    first, *others = tails
    for name in others:
        if tails[name] != tails[first]:
            raise InputError(f"the completion tokenises to other ids after the {name} prompt than "
                             f"after the {first} prompt: the two would not score the same tokens")


def training_batches(prompts, completions, rows, micro_batch_size, tokenizer, device):
    """The given rows of (prompts, completions), lists of token-id lists, as training batches of
    micro_batch_size rows: [(the rows, `engine.pack`'s batch of them)], each prompt run once."""
    return [(chunk, engine.pack([prompts[i] for i in chunk], [completions[i] for i in chunk],
                                tokenizer.pad_token_id, device))
            for chunk in (rows[first:first + micro_batch_size]
                          for first in range(0, len(rows), micro_batch_size))]


def batch_tokens(batch):  # tokens run through the model: distinct prompts and completions
    return int(batch["prompt_mask"].sum() + batch["completion_mask"].sum())


def textbook_logits(model, prompts, completions):
    """Each [prompt | completion] row through the model alone: the logits that predict the
    completion, [N, T, V], zero past a row's end; engine.py does it cheaper (docs/common.md)."""
    width = max(map(len, completions))
    return torch.stack([torch.nn.functional.pad(
        model(input_ids=torch.tensor([prompt + completion], device=model.device)).logits[
            0, len(prompt) - 1:-1], (0, 0, 0, width - len(completion)))
        for prompt, completion in zip(prompts, completions)])


def textbook_logprobs(model, prompts, completions, temperature=1.0):
    """log p(y_t | x, y_<t) = log_softmax(z_t / T)[y_t], z_t from `textbook_logits`: [N, T], zero
    past a row's end; `engine.token_logprobs` gets it without [N, T, V] logits (docs/common.md)."""
    logits = textbook_logits(model, prompts, completions).float() / temperature  # [N, T, V]
    batch = engine.pack(prompts, completions, 0, model.device)  # completion_ids, mask: [N, T]
    return (logits.log_softmax(-1).gather(-1, batch["completion_ids"][..., None])[..., 0]
            * batch["completion_mask"])


def add_logprob_gap(gap, rollouts, rows, trainer_logprobs):  # a micro-batch's, for logprob_gap
    gap[0].append(torch.cat([rollouts["logprobs"][i] for i in rows]))
    gap[1].append(trainer_logprobs.detach())


def logprob_gap(sampler_logprobs, trainer_logprobs):
    """{"logprob_gap_mean", "logprob_gap_max"} of |log p_sampler(y_t) - log p_trainer(y_t)| over a
    step's tokens (lists of [n] per micro-batch), all ranks; why it matters: docs/common.md."""
    gaps = (torch.cat(sampler_logprobs) - torch.cat(trainer_logprobs)).abs() if sampler_logprobs \
        else torch.zeros(0, device="cpu")  # [n]; none when no row was trained
    largest = float(gaps.max()) if gaps.numel() else 0.0
    return {"logprob_gap_mean": global_sum(float(gaps.sum())) / max(1, global_sum(gaps.numel())),
            "logprob_gap_max": global_sum(largest, op=dist.ReduceOp.MAX)}


# ---- The end of a step (optimizer step, log line, evaluation, checkpoint) and of the run ---------

def optimizer_step(run):
    """Clip, step AdamW and the schedule, clear the gradients; return the norm before clipping."""
    trainable = [p for p in run.model.parameters() if p.requires_grad]
    if dist.is_initialized():  # each rank's loss is its part of the batch's: sum the gradients
        for parameter in trainable:
            if parameter.grad is None:  # this rank trained no row this step
                parameter.grad = torch.zeros_like(parameter)
            dist.all_reduce(parameter.grad)
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, run.args.max_grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return float(grad_norm)


def end_step(run, metrics, train_tokens, stalled=None):
    """Count the step; log it; evaluate (--eval-every) and checkpoint (--save-every) when due;
    warn once when nothing trains (`stalled`: the method's reason, else a zero gradient norm)."""
    args, state = run.args, run.state
    run.step += 1
    train_tokens = global_sum(train_tokens)
    state["train_tokens"] += train_tokens
    state["wall_seconds"] = run.wall_before + time.time() - run.loop_started
    step_tokens = state["generated_tokens"] - run.generated_before_step + train_tokens
    metrics = {"step": run.step, **metrics, "lr": run.scheduler.get_last_lr()[0],
               "generated_tokens": state["generated_tokens"],
               "tokens_per_second": round(step_tokens / (time.time() - run.step_started))}
    if args.eval_every and run.step % args.eval_every == 0 and run.step != args.steps \
            and run.eval_examples:  # not the last step: that is finish_run's
        train_seconds = round(state["wall_seconds"] - state["eval_seconds"], 1)  # a plot's x
        result = run_evaluation(run)
        metrics.update(eval_accuracy=result["accuracy"], eval_format=result["format"],
                       train_seconds=train_seconds)
    log_step(run.metrics_file, metrics, args.steps,
             (time.time() - run.loop_started) / (run.step - run.first_step))
    zero_gradient = ("the gradient norm is 0: the loss does not depend on the trained weights "
                     "(look at inputs.txt and the loss)")
    why = stalled or (zero_gradient if metrics.get("grad_norm") == 0 else None)
    run.stalled_steps = run.stalled_steps + 1 if why else 0
    if run.stalled_steps == STALLED_STEPS:  # once a streak, not every step
        print(f"warning: nothing trains for {STALLED_STEPS} steps in a row: {why}", flush=True)
    if args.save_every and run.step % args.save_every == 0 and run.step < args.steps:
        save_checkpoint(run)  # the final one is finish_run's


def open_metrics(out, resumed_step):  # on resume, rows past the checkpoint go (to be redone)
    if rank() != 0:
        return open(os.devnull, "w")  # rank 0 logs for all
    path = Path(out) / "metrics.jsonl"
    lines = path.read_text().splitlines() if resumed_step and path.exists() else []
    rows = [line for line in lines if line.strip() and json.loads(line)["step"] <= resumed_step]
    path.write_text("".join(row + "\n" for row in rows))
    return open(path, "a")


STALLED_STEPS = 3  # steps in a row with nothing trained before end_step warns
WATCHED = ("update", "rollouts", "reward", "loss", "grad_norm", "entropy", "eval_accuracy")


def log_step(metrics_file, metrics, total_steps, seconds_per_step):
    """Write the step's metrics to metrics.jsonl; print those a user watches (WATCHED), the ETA."""
    print(json.dumps(metrics), file=metrics_file, flush=True)
    shown = "  ".join(f"{key} {metrics[key]:.4g}" if isinstance(metrics[key], float) else
                      f"{key} {metrics[key]}" for key in WATCHED if key in metrics)
    eta = format_seconds(seconds_per_step * (total_steps - metrics["step"]))
    print(f"step {metrics['step']:>4}/{total_steps}  {shown}  eta {eta}", flush=True)


def finish_run(run, **extra):
    """Evaluate "after", save the final checkpoint, write summary.json (`extra`: the method's)."""
    args, state, started = run.args, run.state, time.time()
    after = run_evaluation(run, args.eval_k)
    print(f"after: {describe(after)}" + (f", before {state['before']['accuracy']:.3f}"
                                         if after["n"] and state["before"] else ""))
    state["wall_seconds"] += time.time() - started
    folder = save_checkpoint(run)
    print(f"saved {'model' if args.full else 'adapter'} to {folder}")
    metrics = Path(args.out) / "metrics.jsonl"
    rows = metrics.read_text().splitlines() if rank() == 0 and metrics.exists() else []
    summary = {
        "method": args.method, "model": args.model, "data": args.data,
        "eval_data": args.eval_data or ("toy test split" if args.data == "toy"
                                        else f"{args.data} (held-out slice)"),
        "before": state["before"], "after": after, "steps": run.step,
        "final_loss": json.loads(rows[-1]).get("loss") if rows else None,
        "train_tokens": state["train_tokens"], "generated_tokens": state["generated_tokens"],
        "wall_seconds": round(state["wall_seconds"], 1),
        "eval_seconds": round(state["eval_seconds"], 1),
        **{key: value for key, value in extra.items() if value is not None},
        "started": state.get("started"), "ended": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "args": vars(args)}
    if rank() == 0:
        (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        release_lock(args.out)
    print(json.dumps({key: {name: value for name, value in item.items() if name != "correct"}
                      if key in ("before", "after") and item else item  # no per-problem results
                      for key, item in summary.items()}))


# ---- Evaluation ----------------------------------------------------------------------------------

def format_seconds(seconds):
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


def pass_at_k(n, c, k):
    """Unbiased pass@k of n samples, c correct (Chen et al. 2021, arXiv 2107.03374):
    1 - C(n - c, k) / C(n, k) = 1 - prod_{i=n-c+1}^{n} (1 - k / i), without the binomials."""
    if n - c < k:
        return 1.0  # every choice of k contains a correct sample
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def majority_vote(answers):  # the most frequent but None, the first seen of equal counts
    counts = Counter(answer for answer in answers if answer is not None)  # keeps first-seen order
    return max(counts, key=counts.get) if counts else None  # max returns the first of equal counts


def sample_metrics(sampled_answers, references):
    """k answers a problem -> mean@k, pass@j, maj@k, more_than_half@k, format@k (docs/common.md)."""
    k = len(sampled_answers[0])
    pairs = list(zip(sampled_answers, references))
    correct = [sum(answer == reference for answer in answers) for answers, reference in pairs]
    problems = len(references)
    metrics = {f"mean@{k}": sum(correct) / (k * problems)}
    for j in sorted({2 ** i for i in range(k.bit_length()) if 2 ** i <= k} | {k}):
        metrics[f"pass@{j}"] = sum(pass_at_k(k, c, j) for c in correct) / problems
    metrics[f"maj@{k}"] = sum(majority_vote(answers) == ref for answers, ref in pairs) / problems
    metrics[f"more_than_half@{k}"] = sum(2 * c > k for c in correct) / problems
    metrics[f"format@{k}"] = sum(answer is not None for answers in sampled_answers
                                 for answer in answers) / (k * problems)
    return metrics


def evaluate(model, tokenizer, examples, max_new_tokens, batch_size=64, message=None, k=0,
             temperature=1.0, top_p=1.0, top_k=0, seed=0):
    """Greedy accuracy and, with k > 0, `sample_metrics` of k samples a problem (docs/common.md)."""
    if not examples:  # --eval-n 0
        return {"accuracy": None, "n": 0}
    references = [normalize_answer(e["answer"]) for e in examples]
    shard = examples[rank()::world_size()]
    prompts = [chat_prompt(tokenizer, (message or student_message)(e)) for e in shard]
    runs = [("greedy", 1, 0.0)] + ([(f"{k} samples", k, temperature)] if k else [])
    answers = {}  # run name -> [problem][sample] final answers
    with torch.random.fork_rng(devices=[model.device] if model.device.type == "cuda" else []):
        torch.manual_seed(seed)
        for name, num_samples, run_temperature in runs:
            step, start, answers[name] = max(1, batch_size // num_samples), time.time(), []
            for first in range(0, len(shard), step):
                texts = engine.generate(model, tokenizer, prompts[first:first + step],
                                        max_new_tokens, run_temperature, top_p, top_k,
                                        num_samples)["texts"]
                answers[name] += [[extract_answer(text) for text in texts[i:i + num_samples]]
                                  for i in range(0, len(texts), num_samples)]
                done = len(answers[name])
                eta = (time.time() - start) / done * (len(shard) - done)
                if rank() == 0:
                    print(f"\r  eval {name} {done}/{len(shard)}  eta {format_seconds(eta)}",
                          end="", file=sys.stderr, flush=True)
            if rank() == 0:
                print(file=sys.stderr)
    shards = gather_objects(answers)  # problem i was answered by rank i % N, as its (i // N)-th
    answers = {name: [shards[i % len(shards)][name][i // len(shards)] for i in range(len(examples))]
               for name in answers}
    greedy = [answer for answer, in answers["greedy"]]  # one answer per problem
    correct = [int(answer == reference) for answer, reference in zip(greedy, references)]
    result = {"accuracy": sum(correct) / len(examples),
              "format": sum(answer is not None for answer in greedy) / len(examples),
              "n": len(examples), "correct": correct}
    if k:
        result.update({"k": k, "temperature": temperature},
                      **sample_metrics(answers[f"{k} samples"], references))
    return result


def describe(result):  # 'held-out accuracy 0.444 (n=500, format 0.9)  mean@8 0.41 ...'
    if result["n"] == 0:
        return "no held-out evaluation (--eval-n 0)"
    extra = "".join(f"  {key} {value:.3f}" for key, value in result.items() if "@" in key)
    return (f"held-out accuracy {result['accuracy']:.3f} (n={result['n']}, format "
            f"{result['format']:.3f}){extra}")


def run_evaluation(run, k=0):  # `evaluate` with the script's flags, timed
    started, args = time.time(), run.args
    result = evaluate(run.model, run.tokenizer, run.eval_examples, args.max_new_tokens,
                      args.eval_batch_size, k=k, temperature=args.eval_temperature, seed=args.seed)
    run.state["eval_seconds"] += time.time() - started
    return result


# ---- AdamW and its schedule ----------------------------------------------------------------------

def make_optimizer(model, lr, weight_decay):
    """AdamW over the trainable parameters; no weight decay on biases and norm weights (1-D)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.999))


def make_scheduler(optimizer, warmup_steps, total_steps, schedule="cosine"):
    """Linear warmup from 0 to the peak lr, then cosine decay to 0 (or constant)."""
    def lr_factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)


# ---- Checkpoints: out/checkpoint-<step>/, as `save_checkpoint` writes them -----------------------

def save_checkpoint(run):
    """Write out/checkpoint-<step>: adapter or weights, tokenizer, trainer state; docs/common.md."""
    args, model = run.args, run.model
    rng = {"python": random.getstate(), "torch": torch.get_rng_state(),  # its own GPU's too
           "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    rng_states = gather_objects(rng)  # every rank samples from its own stream
    out = Path(args.out)
    final = out / f"checkpoint-{run.step:06d}"
    if rank() == 0:
        tmp = out / f".tmp-{final.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if args.full:
            model.save_pretrained(tmp)
        else:  # PEFT's AutoPeftModel loads the base from the path or hub id recorded here
            save_lora(model, tmp, base_model=model_folder(args.model))
        run.tokenizer.save_pretrained(tmp)  # the folder alone is enough to evaluate or serve it
        torch.save({"optimizer": run.optimizer.state_dict(),
                    "scheduler": run.scheduler.state_dict(), "rng": rng_states,
                    "method_tensors": run.method_tensors}, tmp / "trainer_state.pt")
        (tmp / "state.json").write_text(json.dumps({"step": run.step, **run.state}, indent=2))
        (tmp / "args.json").write_text(json.dumps(vars(args), indent=2))
        for file in tmp.iterdir():  # make the bytes durable before the rename publishes them
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in sorted(folder for folder in out.glob("checkpoint-*")  # sorted by step;
                          if folder.name <= final.name)[:-args.keep_checkpoints]:  # not newer ones
            shutil.rmtree(old)
    if dist.is_initialized():
        dist.barrier()  # no rank goes on before the checkpoint is in place
    return final


def latest_checkpoint(out):
    return max(Path(out).glob("checkpoint-*"), default=None)


def intact_checkpoint(out):
    """The newest checkpoint in `out` whose files are whole (`checkpoint_damage`), or None if
    there is none; newer damaged ones are named in one line and left as they are (InputError if
    every one is damaged)."""
    damaged = []
    for folder in sorted(Path(out).glob("checkpoint-*"), reverse=True):
        if not (damage := checkpoint_damage(folder)):
            if damaged:
                print(f"{'; '.join(damaged)}: resuming from {folder}, the newest intact checkpoint")
            return folder
        damaged.append(damage)
    if damaged:
        raise InputError(f"--resume: no intact checkpoint in {out} ({'; '.join(damaged)})")
    return None


def checkpoint_damage(folder):
    """'FILE is missing' or 'FILE is damaged' for the first bad file of a checkpoint, or None, read
    without loading: safetensors checks each header against its file's size, trainer_state.pt's
    zip directory (at its end: a cut file has none), the JSON files parsed."""
    from safetensors import SafetensorError, safe_open
    config = "config.json" if (folder / "config.json").is_file() else "adapter_config.json"
    weights = sorted(folder.glob("*.safetensors")) or [folder / "adapter_model.safetensors"]
    for path in weights + [folder / name for name in (config, "trainer_state.pt", "state.json",
                                                       "args.json")]:
        if not path.is_file():
            return f"{path} is missing"
        try:
            if path.suffix == ".safetensors":
                with safe_open(path, "pt"):
                    pass
            elif path.suffix == ".pt":
                zipfile.ZipFile(path).close()
            else:
                json.loads(path.read_text())
        except (SafetensorError, ValueError, zipfile.BadZipFile):
            return f"{path} is damaged"
    return None


def load_checkpoint(folder, run):  # restore what save_checkpoint saved in `folder`
    from safetensors.torch import load_file
    model = run.model
    if run.args.full:
        weights = {name: tensor for file in sorted(Path(folder).glob("*.safetensors"))
                   for name, tensor in load_file(file, device=str(model.device)).items()}
        missing, unexpected = model.load_state_dict(weights, strict=False)
        tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
        if unexpected or set(missing) - tied:
            raise InputError(f"{folder}: weights do not match the model ({missing or unexpected})")
    else:
        load_lora(model, folder)
    trainer_state = torch.load(Path(folder) / "trainer_state.pt", weights_only=True,
                               map_location="cpu")  # not the saving GPU; load_state_dict moves it
    run.optimizer.load_state_dict(trainer_state["optimizer"])
    run.scheduler.load_state_dict(trainer_state["scheduler"])
    if len(trainer_state["rng"]) != world_size():
        raise InputError(f"{folder}: saved by {len(trainer_state['rng'])} processes, resumed by "
                         f"{world_size()}: resume with as many (the data order depends on it)")
    rng = trainer_state["rng"][rank()]
    random.setstate(rng["python"])
    torch.set_rng_state(rng["torch"])
    if isinstance(rng["cuda"], torch.Tensor) and torch.cuda.is_available():  # (older: a list)
        torch.cuda.set_rng_state(rng["cuda"])  # the current device: this rank's GPU
    run.method_tensors = {name: tensor.to(model.device) for name, tensor
                          in trainer_state.get("method_tensors", {}).items()}
    run.state = json.loads((Path(folder) / "state.json").read_text())
    run.step = run.state.pop("step")
