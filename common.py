"""common.py: what sft.py, grpo.py and opsd.py share, as plain functions.

Model and tokenizer loading, data, prompts and answer checking, generation, the training forward
pass (each prompt once) and log-probabilities a chunk at a time, evaluation, AdamW and the
learning-rate schedule, checkpointing and logging. Nothing here knows which method is running.
"""
import argparse
import importlib.util
import json
import math
import os
import random
import re
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers.cache_utils import (DummyLayer, DynamicCache, DynamicLayer,
                                      DynamicSlidingWindowLayer)

from lora import apply_lora, load_lora, save_lora

REPO = Path(__file__).resolve().parent
TOY_DIR = REPO / "toy"  # the built-in task (train.jsonl, test.jsonl) and model (toy/model)
# transformers' KV-cache layers that `completion_hidden` replaces by its own: attention, plain or
# with a sliding window. Besides those, `load_model` accepts only DummyLayer (a layer that reads
# another layer's keys and values: Gemma 4), not linear attention or other recurrent state.
ATTENTION_CACHE_LAYERS = (DynamicLayer, DynamicSlidingWindowLayer)


class InputError(Exception):
    """Bad input from the user (file, field, model name): the scripts print it as one line."""


def exit_with_error(message):
    """One line on stderr and exit code 2: what bad input gets, from argparse or from our checks."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def run_cli(main):
    """Run a script's main(), turning an InputError into a one-line message and exit code 2."""
    try:
        main()
    except InputError as error:
        exit_with_error(error)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# Arguments shared by the three scripts (same flag, same meaning everywhere)

def add_common_args(parser):
    add = parser.add_argument
    add("--model", default="toy", help="Hugging Face model id or local folder; 'toy' = built-in")
    add("--data", default="toy", help="'toy' or a local .jsonl/.json file of problems")
    add("--eval-data", default=None,
        help="held-out file; if none, a fixed slice of --data (of the toy: its test split)")
    add("--out", default=None, help="output folder; if none, out/<method>")
    add("--overwrite", action="store_true",
        help="replace the run already in --out (its checkpoints, metrics and summary)")
    add("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    add("--save-every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    add("--keep-checkpoints", type=int, default=2, help="the newest N checkpoints are kept")
    add("--steps", type=int, default=100,
        help="training steps, each on --batch-size new prompts")
    add("--batch-size", "--prompts-per-step", type=int, default=32,
        help="prompts per step (per process under torchrun)")
    add("--micro-batch-size", type=int, default=16,
        help="rows per forward and backward pass; a step accumulates the gradients of its "
             "micro-batches (0: all rows of the step at once)")
    add("--lr", type=float, default=5e-6, help="peak learning rate of AdamW")
    add("--warmup-steps", type=int, default=0, help="steps of linear warmup from 0 to --lr")
    add("--schedule", choices=["cosine", "constant"], default="cosine",
        help="the learning rate after warmup: cosine decay to 0, or constant")
    add("--weight-decay", type=float, default=0.0, help="AdamW's decoupled weight decay")
    add("--max-grad-norm", type=float, default=1.0, help="gradient norm clipping")
    add("--seed", type=int, default=0, help="data order, LoRA initialisation and sampling")
    add("--full", action="store_true", help="full fine-tuning instead of LoRA")
    add("--lora-r", type=int, default=64, help="LoRA rank")
    add("--lora-alpha", type=int, default=128, help="LoRA scale numerator: updates scale by alpha/r")
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
    add("--chunk-size", type=int, default=128,
        help="completion positions per chunk of the output layer and loss (memory: a few "
             "[chunk, vocabulary] float32 tensors)")
    add("--temperature", type=float, default=1.0, help="sampling of the model's own completions")
    add("--top-p", type=float, default=1.0, help="nucleus sampling of them (1: off)")
    add("--top-k", type=int, default=0, help="top-k sampling of them (0: off)")
    add("--eval-n", type=int, default=500, help="held-out problems to evaluate on (0: none)")
    add("--eval-batch-size", type=int, default=64, help="rows per generate call in evaluation")
    add("--eval-every", type=int, default=0, help="greedy held-out accuracy every N steps (0: off)")
    add("--eval-k", type=int, default=0,
        help="before and after training, also sample K completions per held-out problem: "
             "mean@K, pass@K, maj@K (0: greedy accuracy only)")
    add("--eval-temperature", type=float, default=1.0, help="sampling temperature of --eval-k")


# Toy settings that every script shares: short answers, and 256 rows per generate call (measured
# fastest on 2 CPU cores: larger batches spend their time on padding after most rows have stopped).
# And the whole step in one pass, nothing recomputed: a 1M-parameter model's activations are small.
TOY_COMMON_SETTINGS = {"max_new_tokens": 64, "eval_batch_size": 256, "eval_temperature": 0.7,
                     "micro_batch_size": 0, "gradient_checkpointing": False}

# What each number must be, for every script that has the flag: name -> (test, what it must be).
# A script adds the ranges of its own flags. Checked before anything slow (`parse_args`).
RANGES = {
    "steps": (lambda v: v >= 1, "at least 1"),
    "batch_size": (lambda v: v >= 1, "at least 1"),
    "micro_batch_size": (lambda v: v >= 0, "at least 0 (0: all rows of a step at once)"),
    "lr": (lambda v: v > 0, "positive"),
    "warmup_steps": (lambda v: v >= 0, "at least 0"),
    "weight_decay": (lambda v: v >= 0, "at least 0"),
    "max_grad_norm": (lambda v: v > 0, "positive"),
    "save_every": (lambda v: v >= 0, "at least 0 (0: only at the end)"),
    "keep_checkpoints": (lambda v: v >= 1, "at least 1"),
    "lora_r": (lambda v: v >= 1, "at least 1"),
    "lora_alpha": (lambda v: v > 0, "positive"),
    "lora_dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "max_new_tokens": (lambda v: v >= 1, "at least 1"),
    "chunk_size": (lambda v: v >= 1, "at least 1"),
    "temperature": (lambda v: v >= 0, "at least 0 (0: greedy)"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "top_k": (lambda v: v >= 0, "at least 0 (0: off)"),
    "eval_n": (lambda v: v >= 0, "at least 0 (0: no held-out evaluation)"),
    "eval_batch_size": (lambda v: v >= 1, "at least 1"),
    "eval_every": (lambda v: v >= 0, "at least 0 (0: off)"),
    "eval_k": (lambda v: v >= 0, "at least 0 (0: greedy accuracy only)"),
    "eval_temperature": (lambda v: v > 0, "positive"),
}


def parse_args(parser, argv, toy_settings, ranges=None):
    """Parse the command line; with the built-in toy model, `toy_settings` replace the defaults
    (flags given on the command line still win). Every number is checked against RANGES and the
    script's own `ranges`: a bad one stops here, in one line, before anything slow.

    The defaults of the scripts follow the papers' settings for real LLMs; a 1M-parameter model needs
    others (a higher learning rate, a smaller LoRA rank, a lower sampling temperature). --help
    shows both.
    """
    toy = {**toy_settings, **TOY_COMMON_SETTINGS}
    for action in parser._actions:  # --help: "... (default: 5e-06; toy: 0.0005)"
        if action.help and action.dest in toy:
            action.help += f" (default: %(default)s; toy: {toy[action.dest]})"
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter  # the others' defaults
    parser.error = lambda message: exit_with_error(f"{message} (see --help)")  # one line
    args = parser.parse_args(argv)
    if args.model == "toy":
        settings = {key: value for key, value in toy.items() if hasattr(args, key)}
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


# ----------------------------------------------------------------------------------------------
# Data parallel under torchrun: every rank holds the whole model, takes its own share of each
# step's prompts (and samples its own rollouts), and the gradients are summed across ranks before
# the optimizer step. Every loss is normalised by counts over all ranks (`global_sum`), so N ranks
# with --batch-size B compute the gradient that one process with --batch-size N*B computes.

def init_distributed():
    """Join torchrun's process group (NCCL on CUDA, gloo on CPU); a no-op in a single process.
    Ranks other than 0 print nothing: rank 0 logs for all."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # one GPU per rank
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if dist.get_rank() != 0:
            sys.stdout = open(os.devnull, "w")


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def global_sum(value):
    """The sum of a number over all ranks (the number itself in a single process)."""
    if not dist.is_initialized():
        return value
    total = torch.tensor(float(value), dtype=torch.float64,
                         device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(total)
    return type(value)(total.item())


def global_mean(value):
    """The mean over ranks of a per-rank mean (ranks hold batches of equal size)."""
    return global_sum(value) / world_size()


def gather_objects(value):
    """[value of rank 0, value of rank 1, ...] on every rank ([value] in a single process)."""
    if not dist.is_initialized():
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


# ----------------------------------------------------------------------------------------------
# Model and tokenizer

def compute_dtype(dtype, device):
    """--dtype as a torch dtype: 'auto' is bfloat16 on CUDA and float32 on a CPU."""
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]


def load_model(name_or_path="toy", dtype="auto", full=False, gradient_checkpointing=False,
               device=None):
    """Load (model, tokenizer) to compute in `dtype`; Flash Attention 2 when installed, else SDPA.

    full=True (full fine-tuning) keeps the weights in float32 and runs the forward pass under
    autocast to `dtype`: AdamW then updates float32 "master" weights. Updating bfloat16 weights
    directly loses most updates at LLM learning rates (5e-6 * a weight of 0.02 is below bfloat16's
    resolution of 2^-8 relative). Otherwise the frozen base is stored in `dtype` and LoRA keeps its
    own weights in float32 (lora.py).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer  # slow import, only when needed
    from transformers.modeling_layers import GradientCheckpointingLayer
    from transformers.utils.logging import disable_progress_bar
    disable_progress_bar()  # per-file loading bars would drown the one-line-per-step log
    path = str(TOY_DIR / "model") if name_or_path == "toy" else name_or_path
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = compute_dtype(dtype, device)
    has_flash = device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32 if full else dtype,
            attn_implementation="flash_attention_2" if has_flash else "sdpa")
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"cannot load model '{name_or_path}': not a model folder here and not a "
                         f"downloadable Hugging Face model id ({reason})") from None
    cache_layers = {type(layer).__name__ for layer in DynamicCache(config=model.config).layers}
    unsupported = sorted(cache_layers - {kind.__name__ for kind in (*ATTENTION_CACHE_LAYERS, DummyLayer)})
    if unsupported:
        raise InputError(f"cannot use model '{name_or_path}': its KV cache has {', '.join(unsupported)}"
                         " layers, and the scripts' sampler and training pass handle attention only")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # safe: masks are built from lengths, not pad ids
    tokenizer.padding_side = "left"  # generation appends on the right, so prompts align on the right
    model.to(device)
    if full and dtype != torch.float32:
        # Mixed precision: matrix products in `dtype`, weights and their gradients in float32.
        # On the two parts the code calls: the decoder and the output layer (`completion_hidden`,
        # `output_logits`; model(...) calls both). Norm weights stay float32, so some
        # activations are float32 too. (Do not deepcopy such a model: the copy's wrappers would
        # still call the original's modules.)
        for part in (model.get_decoder(), model.get_output_embeddings()):
            part.forward = torch.autocast(device.type, dtype=dtype)(part.forward)
    if gradient_checkpointing:
        # Non-reentrant checkpointing lets gradients reach LoRA weights even though the frozen
        # embedding output does not require grad (the reentrant variant fails there).
        if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.x
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # Keep the cache in recomputed layers. Safe here: the only cache used with gradients is
        # completion_hidden's, which a recompute reads (SharedPromptLayer) or writes the same
        # again (PromptRecorder); `generate` runs without gradients, where nothing is recomputed.
        for layer in model.modules():
            if isinstance(layer, GradientCheckpointingLayer):
                layer._can_checkpoint_with_cache = True
    return model, tokenizer


def device_of(model):
    return next(model.parameters()).device


# ----------------------------------------------------------------------------------------------
# Data: records in GSM8K form {"question", "answer": "steps...\n#### 18"} or {"problem", "solution"}

def read_records(path):
    """Read a .jsonl (one object a line) or .json (a list of objects) file; errors name the line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as error:
            raise InputError(f"{path}:{error.lineno}: bad JSON ({error.msg})") from None
        if not isinstance(records, list):
            raise InputError(f"{path}: expected a JSON list of records")
        numbered = list(enumerate(records, start=1))
    else:
        numbered = []
        for line_number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                numbered.append((line_number, json.loads(line)))
            except json.JSONDecodeError as error:
                raise InputError(f"{path}:{line_number}: bad JSON ({error.msg})") from None
    if not numbered:
        raise InputError(f"{path}: no records (empty file)")
    return [to_example(record, f"{path}:{number}") for number, record in numbered]


def to_example(record, where):
    """One record -> {"question", "solution", "answer"}; `answer` is the short final answer."""
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected a JSON object")
    question = record.get("question", record.get("problem"))
    solution = record.get("answer", record.get("solution"))  # GSM8K's "answer" is the worked solution
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
    """Examples of `spec` ('toy' or a file) for split 'train', 'test' or 'all'.

    A single file is split by a fixed-seed shuffle: the test split is min(holdout, 10%) of it, the
    same on every run and machine, and never overlaps the train split.
    """
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
    """Indices of the examples at data positions [position, position + batch_size).

    Each epoch is a fresh permutation seeded by (seed, epoch), so the data order is a pure function
    of the position: resuming only needs the position, and no sampler state.
    """
    indices = []
    for p in range(position, position + batch_size):
        epoch, offset = divmod(p, num_examples)
        generator = torch.Generator().manual_seed(seed * 100003 + epoch)
        indices.append(int(torch.randperm(num_examples, generator=generator)[offset]))
    return indices


def next_batch(examples, args, state):
    """This rank's --batch-size examples of the next step; advances state["data_position"].

    Rank r of N takes the positions [p + r*B, p + (r+1)*B) of the step's N*B: together the ranks
    see the examples that one process with --batch-size N*B sees, in the same order.
    """
    first = state["data_position"] + rank() * args.batch_size
    indices = batch_indices(len(examples), args.batch_size, first, args.seed)
    state["data_position"] += args.batch_size * world_size()
    return [examples[i] for i in indices]


# ----------------------------------------------------------------------------------------------
# Prompts and answer checking

INSTRUCTIONS = {
    "####": "Solve it step by step and write the final answer after '####'.",
    "boxed": "Please reason step by step, and put your final answer within \\boxed{}.",
}


def answer_style(solution):
    """The data set's style of final answer, read from a reference solution: '####' or 'boxed'."""
    return "####" if "####" in solution else "boxed"


def student_prompt(question, style="####"):
    """What the model sees when it solves a problem (SFT, GRPO, the OPSD student): no solution."""
    return f"{question}\n{INSTRUCTIONS[style]}"


def student_message(example):
    """The problem alone, with the instruction in its data set's answer style."""
    return student_prompt(example["question"], answer_style(example["solution"]))


def chat_prompt(tokenizer, message):
    """The text the model continues: its chat template when it has one, else a plain format."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True,
            enable_thinking=False)  # Qwen3: answer directly, no <think> block (as OPSD's 1k budget)
    return f"Problem: {message}\nSolution:\n"


def last_boxed(text):
    """Content of the last \\boxed{...} in text, with nested braces; None if there is none."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def normalize_answer(answer):
    r"""Canonical form of a final answer, so that equal answers compare equal as strings.

    Numbers: '$1,080.00' -> '1080', ' 18. ' -> '18', '0.50' -> '0.5'. Anything else (a fraction
    '3/4', LaTeX) loses '$', spaces, and \left / \right, and \dfrac and \tfrac become \frac:
    '$\left( 1, 2 \right)$' -> '(1,2)'. '3/4' and '\frac{3}{4}' stay different answers.
    """
    answer = answer.replace("\\$", "").replace("$", "").strip().rstrip(".").strip()
    try:
        value = float(answer.replace(",", ""))  # commas in a number separate thousands
    except ValueError:
        answer = re.sub(r"\\(left|right)\b", "", answer)  # \b: \rightarrow stays
        return answer.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace(" ", "")
    return str(int(value)) if value.is_integer() else repr(value)


VALUE_START = re.compile(r"-?(\.?\d|[\\([])")  # 18, -3, .5, \frac, (1, 2), [0, 1): not a word
NUMBERED_HEADING = re.compile(r"\d+[.)]\s+[A-Za-z]")  # '#### 2. Verification', '#### 1) Set up'
# Units or a remark after a value, from its first word of two or more letters on (' dollars',
# ' cups of flour.'); a lone letter may be a variable (2x + y) and stays.
UNITS = re.compile(r"\s+[A-Za-z]{2,}.*")


def hash_value(line):
    """The answer written after one '####' (the rest of its line), or None if it is no value."""
    value = line.replace("**", "").replace("\\$", "").replace("$", "").strip()  # **bold**, $18
    if not VALUE_START.match(value) or NUMBERED_HEADING.match(value):
        return None  # words ('#### Step 2: check', '#### 2. Check'): a Markdown heading; or nothing
    return normalize_answer(UNITS.sub("", value).removesuffix("%"))  # '50%' answers '50'



def extract_answer(text):
    r"""Final answer of a solution or completion, normalised (normalize_answer); None if it has none.

    The final answer is the last answer marker in the text, whichever kind comes last:
      - \boxed{...}, nested braces allowed: 'so \boxed{\dfrac{1}{2}}' -> '\frac{1}{2}';
      - '####' followed, on its line, by a value: a number, a fraction or an expression, that is
        text starting with a digit, '-', '.', '\', '(' or '['. Markdown bold, '$' and trailing
        units (the line from its first word of two or more letters on) are stripped:
        '#### **18**', '#### $18.00', '#### 18 dollars' -> '18'; '#### 3/4' -> '3/4'.
    A '####' followed by words, or by a numbered title ('#### 2. Check'), is a Markdown heading,
    not a marker: in '#### 18\n#### Step 2: check' the answer is '18'. A trailing '%' is dropped. No marker, no answer: the text's last number does not count, as
    writing the answer in the asked format is part of the task.
    """
    boxed_at = text.rfind("\\boxed{")
    for marker in reversed(list(re.finditer(r"####(.*)", text))):  # '.' stops at line end
        if marker.start() < boxed_at:
            break  # a \boxed{} comes after this and every earlier '####'
        value = hash_value(marker.group(1))
        if value is not None:
            return value
    boxed = last_boxed(text)
    return normalize_answer(boxed) if boxed is not None else None


def is_correct(completion, reference_answer):
    """Whether the completion's final answer (extract_answer) is the reference answer, normalised."""
    predicted = extract_answer(completion)
    return predicted is not None and predicted == normalize_answer(reference_answer)


# ----------------------------------------------------------------------------------------------
# Generation

def end_token_ids(model, tokenizer):
    """The token ids that end a completion: the tokenizer's EOS and every id of the model's
    generation config (real checkpoints list several: Qwen3 <|im_end|> and <|endoftext|>)."""
    configured = getattr(model.generation_config, "eos_token_id", None)
    configured = [configured] if isinstance(configured, int) else list(configured or [])
    return sorted({tokenizer.eos_token_id, *configured} - {None})


def sample_next_token(logits, temperature=0.0, top_p=1.0, top_k=0):
    """One token per row from next-token logits [N, V], from exactly the distribution the flags name.

    temperature 0: the argmax (greedy). Otherwise p = softmax(logits / temperature), restricted to the
    top_k most likely tokens (0: no restriction), then to the most likely tokens whose total
    probability reaches top_p (nucleus sampling, Holtzman et al. 2019, arXiv 1904.09751; 1: all),
    and renormalised: the order transformers applies them in. Nothing else changes the
    distribution: no repetition penalty or other default from a checkpoint's generation_config.json.
    """
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth_largest = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # [N, 1]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1)  # ascending
        tail = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p  # least likely, total <= 1 - top_p
        tail[:, -1] = False  # the most likely token always stays
        logits = logits.masked_fill(tail.scatter(1, order, tail), float("-inf"))  # back in vocab order
    return torch.multinomial(logits.softmax(-1), num_samples=1).squeeze(1)


class PreallocatedLayer(DynamicLayer):
    """One attention layer's KV cache in buffers of [rows, heads, capacity, head_dim], written in
    place. transformers' DynamicLayer concatenates instead, which copies the whole cache at every
    token (a fifth of a small model's sampling time). When full, the buffers double (up to
    `max_length`), so each position is copied about once more in all, and the cache grows only as
    long as the longest row. keys / values are views of the first `length` positions: attention
    sees only those. Only what `generate` calls is adapted (update, repeating and selecting rows);
    DynamicLayer's crop, reset and offloading do not know the buffers."""

    def __init__(self, max_length):
        super().__init__()
        self.max_length, self.length = max_length, 0

    def lazy_initialization(self, key_states, value_states):
        self.key_buffer, self.value_buffer = key_states[:, :, :0], value_states[:, :, :0]
        self.device, self.is_initialized = key_states.device, True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, self.length = self.length, self.length + key_states.shape[-2]
        if self.length > self.key_buffer.shape[2]:  # full: double
            capacity = min(max(2 * self.key_buffer.shape[2], self.length), self.max_length)
            self.reallocate(torch.arange(key_states.shape[0], device=self.device), capacity, start)
        self.key_buffer[:, :, start:self.length] = key_states
        self.value_buffer[:, :, start:self.length] = value_states
        self.keys = self.key_buffer[:, :, :self.length]  # views: no copy
        self.values = self.value_buffer[:, :, :self.length]
        return self.keys, self.values

    def batch_repeat_interleave(self, repeats):
        rows = torch.arange(self.key_buffer.shape[0], device=self.device)
        self.batch_select_indices(rows.repeat_interleave(repeats))

    def batch_select_indices(self, indices):
        self.reallocate(indices, self.key_buffer.shape[2], self.length)
        self.keys = self.key_buffer[:, :, :self.length]
        self.values = self.value_buffer[:, :, :self.length]

    def reallocate(self, rows, capacity, filled):
        """New buffers of `capacity` positions holding the first `filled` positions of `rows`."""
        for name in ("key_buffer", "value_buffer"):
            old = getattr(self, name)
            new = old.new_empty(len(rows), old.shape[1], capacity, old.shape[3])
            new[:, :, :filled] = old[rows, :, :filled]
            setattr(self, name, new)


@torch.inference_mode()  # no autograd bookkeeping at all: 4% faster than no_grad on the tiny model
def generate(model, tokenizer, prompts, max_new_tokens, temperature=0.0, top_p=1.0, top_k=0,
             num_samples=1):
    """Sample `num_samples` completions per prompt with the model's KV cache (`sample_next_token`).

    Each prompt is prefilled once and its cache copied to its samples; a row stops at the first of
    the model's end tokens (`end_token_ids`) and leaves the batch, so finished rows cost nothing.
    temperature 0 is greedy decoding. Returns a dict with prompt_ids [N, P] (left padded),
    prompt_mask [N, P], completion_ids [N, T] (right padded), completion_mask [N, T] (1 up to and
    including the end token), finished [N] (ended with an end token, not cut by max_new_tokens),
    texts (N decoded completions) and num_generated_tokens; N = len(prompts) * num_samples, rows of
    one prompt adjacent.
    """
    device = device_of(model)
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left",
                        add_special_tokens=False).to(device)
    prompt_ids, prompt_mask = encoded["input_ids"], encoded["attention_mask"]  # [prompts, P]
    end_ids = torch.tensor(end_token_ids(model, tokenizer), device=device)
    was_training = model.training
    model.eval()  # no dropout while sampling
    cache = DynamicCache(config=model.config)  # full-attention layers preallocated, others as they are
    max_length = prompt_ids.shape[1] + max_new_tokens
    cache.layers = [PreallocatedLayer(max_length) if type(layer) is DynamicLayer else layer
                    for layer in cache.layers]
    decoder = model.get_decoder()

    def next_token_logits(input_ids, attention_mask, position_ids):  # [rows, V]: at the last position
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, cache=cache, use_cache=True).last_hidden_state
        return output_logits(model, hidden[:, -1])

    positions = (prompt_mask.cumsum(1) - 1).clamp(min=0)  # real tokens only: padding shifts nothing
    logits = next_token_logits(prompt_ids, prompt_mask, positions)
    cache.batch_repeat_interleave(num_samples)  # the samples of a prompt share its prefix
    logits = logits.repeat_interleave(num_samples, 0)  # [N, V]
    num_rows, prompt_length = logits.shape[0], prompt_ids.shape[1]
    attention_mask = torch.cat([prompt_mask.repeat_interleave(num_samples, 0),
                                prompt_mask.new_ones(num_rows, max_new_tokens)], 1)  # [N, P + T]
    next_position = positions[:, -1:].repeat_interleave(num_samples, 0) + 1  # [N, 1]
    completion_ids = torch.full((num_rows, max_new_tokens), tokenizer.pad_token_id, device=device)
    lengths = torch.zeros(num_rows, dtype=torch.long, device=device)
    finished = torch.zeros(num_rows, dtype=torch.bool, device=device)
    active = torch.arange(num_rows, device=device)  # the rows still generating
    for t in range(max_new_tokens):
        tokens = sample_next_token(logits, temperature, top_p, top_k)  # [active rows]
        completion_ids[active, t] = tokens
        lengths[active] += 1
        ended = torch.isin(tokens, end_ids)
        finished[active[ended]] = True
        if ended.all() or t + 1 == max_new_tokens:
            break
        if ended.any():  # finished rows leave the batch, and their cache rows with them
            going_on = (~ended).nonzero().flatten()
            cache.batch_select_indices(going_on)
            active, tokens = active[going_on], tokens[going_on]
            attention_mask, next_position = attention_mask[going_on], next_position[going_on]
        logits = next_token_logits(tokens[:, None], attention_mask[:, :prompt_length + t + 1],
                                   next_position)
        next_position = next_position + 1
    model.train(was_training)
    completion_ids = completion_ids[:, :int(lengths.max())]
    # The mask comes from lengths, not from token equality: pad may equal an end token.
    completion_mask = (torch.arange(completion_ids.shape[1], device=device) < lengths[:, None]).long()
    rollouts = {
        "prompt_ids": prompt_ids.repeat_interleave(num_samples, 0),
        "prompt_mask": prompt_mask.repeat_interleave(num_samples, 0),
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "finished": finished,
        "texts": [tokenizer.decode(ids[:n], skip_special_tokens=True)
                  for ids, n in zip(completion_ids.tolist(), lengths.tolist())],
        "num_generated_tokens": int(lengths.sum()),
    }
    with torch.inference_mode(False):  # callers train on these: copies that autograd accepts
        return {key: value.clone() if torch.is_tensor(value) else value
                for key, value in rollouts.items()}


def sample_rollouts(model, tokenizer, examples, args, state):
    """The student's rollouts of a training step: args.num_generations completions per example
    from its student prompt, in one `generate` call with the script's sampling flags. Adds the
    tokens generated on all ranks to state["generated_tokens"], the sampling cost the methods are
    compared on."""
    prompts = [chat_prompt(tokenizer, student_message(e)) for e in examples]
    rollouts = generate(model, tokenizer, prompts, args.max_new_tokens, args.temperature,
                        args.top_p, args.top_k, num_samples=args.num_generations)
    state["generated_tokens"] += global_sum(rollouts["num_generated_tokens"])  # of all ranks
    return rollouts


def unpadded(ids, mask):
    """The rows of a padded [N, L] tensor as N lists of token ids, without their padding."""
    return [row[keep.bool()].tolist() for row, keep in zip(ids, mask)]


# ----------------------------------------------------------------------------------------------
# The training forward pass: each prompt once, its keys and values shared by its completions

def pack(prompts, completions, pad_id, device):
    """A training batch from N rows of token-id lists, row i = prompts[i] + completions[i]: each
    distinct prompt once (the G samples of a prompt share it), left padded, and every completion
    right padded. Returns a dict of prompt_ids, prompt_mask [M, P] (M distinct prompts),
    completion_ids, completion_mask [N, T] and prompt_of_row [N] (row i continues prompt
    prompt_of_row[i]). The masks come from lengths, never from token equality, so an EOS equal to
    the pad token is still trained.
    """
    distinct = {}  # prompt -> its index, in order of first appearance
    prompt_of_row = [distinct.setdefault(tuple(prompt), len(distinct)) for prompt in prompts]

    def padded(rows, left):
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, row in enumerate(rows):
            columns = slice(width - len(row), width) if left else slice(0, len(row))
            ids[i, columns], mask[i, columns] = torch.tensor(row, dtype=torch.long), 1
        return ids.to(device), mask.to(device)

    prompt_ids, prompt_mask = padded(list(distinct), left=True)
    completion_ids, completion_mask = padded(completions, left=False)
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
            "completion_mask": completion_mask,
            "prompt_of_row": torch.tensor(prompt_of_row, device=device)}


class PromptRecorder(DynamicLayer):
    """An attention layer's cache in the prompt pass of `completion_hidden`: no earlier positions;
    it keeps the prompts' keys and values for the completion pass. (A layer that gradient
    checkpointing recomputes writes the same ones again.)"""

    def update(self, key_states, value_states, *args, **kwargs):
        self.keys, self.values = key_states, value_states  # [M, heads, P, head_dim]
        return key_states, value_states


class SharedPromptLayer(DynamicLayer):
    """An attention layer's cache in the completion pass of `completion_hidden`: the keys and values
    of the M prompts and which prompt each of the N rows continues. update() returns each row's
    prompt followed by the row's new positions, and stores nothing, so a layer that gradient
    checkpointing recomputes sees exactly what it saw the first time. The rows' copies of their
    prompt are made inside update(), so checkpointing recomputes them instead of keeping them."""

    def __init__(self, prompt_keys, prompt_values, prompt_of_row):
        super().__init__()
        self.keys, self.values, self.prompt_of_row = prompt_keys, prompt_values, prompt_of_row
        self.is_initialized = True  # get_seq_length() is the prompt length, for the attention mask

    def update(self, key_states, value_states, *args, **kwargs):
        # index_select, not keys[rows]: its backward adds up the rows of a prompt in a fixed
        # order; that of indexing does not on several threads (runs would differ in the 7th digit)
        return (torch.cat([self.keys.index_select(0, self.prompt_of_row), key_states], -2),
                torch.cat([self.values.index_select(0, self.prompt_of_row), value_states], -2))


def completion_hidden(model, batch):
    """The final hidden states (after the last norm, before the output layer) that predict each
    completion token of `batch` (`pack`): [N, T, H], row i position t predicts completion token t.

    Two passes through the decoder. First the M distinct prompts, once each, keeping every layer's
    keys and values; then the N completions, each attending to its own prompt's keys and values and
    to itself. So the G samples of a prompt share one prompt pass: on the toy, a prompt of 184
    tokens and 8 completions of 48 are 568 positions instead of 8 x 232 = 1,856. The hidden states,
    and their gradients, which flow through the shared keys and values into the prompt pass, are
    those of one pass over each [prompt | completion] row. Position ids count real tokens only, so
    left padding shifts nothing. With gradient checkpointing, the prompts' keys and values are
    kept from one pass to the other (about one layer input's worth per prompt position and layer).

    The output layer is not applied here: at a real vocabulary its logits are the largest tensor of
    a step ([N, T, V]; with Qwen3's V = 151,936 one row of 1024 positions is 620 MB in float32), so
    the losses apply it a chunk of completion positions at a time (`chunked`, `target_logprobs`).
    """
    decoder, prompt_mask, rows = model.get_decoder(), batch["prompt_mask"], batch["prompt_of_row"]

    def run(input_ids, attention_mask, position_ids, layers):
        cache = DynamicCache(config=model.config)
        cache.layers = layers
        return decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       cache=cache, use_cache=False).last_hidden_state  # the cache is ours, read only

    # Attention layers (plain or sliding-window) get ours; a layer that reads another layer's keys
    # and values (DummyLayer: Gemma 4's KV sharing) stays as it is (`load_model` checks the rest).
    prompt_layers = [PromptRecorder() if type(layer) in ATTENTION_CACHE_LAYERS else layer
                     for layer in DynamicCache(config=model.config).layers]
    prompt_hidden = run(batch["prompt_ids"], prompt_mask, (prompt_mask.cumsum(1) - 1).clamp(min=0),
                        prompt_layers)  # [M, P, H]
    completion_layers = [SharedPromptLayer(layer.keys, layer.values, rows)
                         if isinstance(layer, PromptRecorder) else layer for layer in prompt_layers]
    completion_mask = batch["completion_mask"]
    positions = prompt_mask.sum(1)[rows, None] + torch.arange(completion_mask.shape[1],
                                                              device=rows.device)  # [N, T]
    hidden = run(batch["completion_ids"], torch.cat([prompt_mask[rows], completion_mask], 1),
                 positions, completion_layers)  # [N, T, H]
    last = prompt_hidden[:, -1:].index_select(0, rows)  # [N, 1, H]: predicts completion token 0
    return torch.cat([last, hidden[:, :-1]], 1)


# ----------------------------------------------------------------------------------------------
# Log-probabilities from hidden states: the output layer a chunk of positions at a time

def output_logits(model, hidden):
    """The model's logits from its final hidden states [..., H] -> [..., V]: the output layer (tied
    to the embeddings or not), then what some models do to their final logits: Cohere multiplies
    by logit_scale, Granite divides by logits_scaling, Gemma 2 soft-caps, cap * tanh(logits / cap).
    What model(...).logits holds."""
    config = model.config.get_text_config()
    logits = model.get_output_embeddings()(hidden)
    scale, scaling = getattr(config, "logit_scale", None), getattr(config, "logits_scaling", None)
    logits = logits * scale if scale else logits  # Cohere
    logits = logits / scaling if scaling else logits  # Granite
    cap = getattr(config, "final_logit_softcapping", None)  # Gemma 2
    return cap * torch.tanh(logits / cap) if cap else logits


class RowwiseChunks(torch.autograd.Function):
    """`chunked`'s forward and backward passes. The outputs y [n] are one number per row, and row i
    of y depends on row i of each input x only (a position's loss on its own hidden state), so

        dL/dx_i = dL/dy_i * dy_i/dx_i,    dy_i/dx_i = row i of d(sum_j y_j)/dx    ([n, H] in all)

    The forward pass computes y and those rows a chunk at a time, while the chunk's logits exist,
    and frees them: the backward pass is one product, with nothing recomputed. Liger-Kernel's fused
    linear cross-entropy does the same in Triton. A trainable output layer (full fine-tuning) needs
    dL/dy before its own gradient can be summed over rows, so that gradient is recomputed a chunk at
    a time in the backward pass.
    """

    @staticmethod
    def forward(context, function, chunk_size, num_tensors, *tensors_and_parameters):
        tensors, parameters = tensors_and_parameters[:num_tensors], tensors_and_parameters[num_tensors:]
        needs_grad = context.needs_input_grad[3:]  # after the 3 non-tensor arguments above
        trained = [p for p, needs in zip(parameters, needs_grad[num_tensors:]) if needs]
        outputs, jacobians = [], [[] for _ in tensors]
        for start in range(0, tensors[0].shape[0] or 1, chunk_size):  # n = 0: one empty chunk
            chunk = [tensor[start:start + chunk_size].detach().requires_grad_(needs)
                     for tensor, needs in zip(tensors, needs_grad)]
            differentiated = [x for x in chunk if x.requires_grad]
            with torch.enable_grad():
                output = function(*chunk)  # [c]
                grads = iter(torch.autograd.grad(output.sum(), differentiated)
                             if differentiated else ())
            outputs.append(output.detach())  # the chunk's logits are freed here
            for jacobian, x in zip(jacobians, chunk):
                jacobian.append(next(grads) if x.requires_grad else None)
        context.function, context.chunk_size, context.trained = function, chunk_size, trained
        context.num_tensors = num_tensors
        context.save_for_backward(*[torch.cat(rows) if rows[0] is not None else None
                                    for rows in jacobians],
                                  *(tensors if trained else ()))  # inputs: only to recompute
        return torch.cat(outputs)

    @staticmethod
    def backward(context, grad_output):  # grad_output: dL/dy [n]
        saved, num_tensors = context.saved_tensors, context.num_tensors
        jacobians, tensors = saved[:num_tensors], saved[num_tensors:]  # tensors: if it trains
        tensor_grads = [None if jacobian is None else  # dL/dy_i times row i, in float32
                        (grad_output.view(-1, *[1] * (jacobian.dim() - 1)).float()
                         * jacobian.float()).to(jacobian.dtype)
                        for jacobian in jacobians]
        parameter_grads = [torch.zeros_like(p) for p in context.trained]
        if context.trained:  # a trainable output layer: its gradient, recomputed a chunk at a time
            for start in range(0, tensors[0].shape[0], context.chunk_size):
                chunk = [tensor[start:start + context.chunk_size].detach() for tensor in tensors]
                with torch.enable_grad():
                    grads = torch.autograd.grad(context.function(*chunk), context.trained,
                                                grad_output[start:start + context.chunk_size])
                for total, grad in zip(parameter_grads, grads):
                    total += grad
        parameter_grads = iter(parameter_grads)
        return (None, None, None, *tensor_grads,
                *[next(parameter_grads) if needs else None
                  for needs in context.needs_input_grad[3 + num_tensors:]])


def chunked(function, tensors, chunk_size, parameters):
    """function(*chunk) on `chunk_size` rows of the [n, ...] `tensors` at a time; the chunks' [c]
    outputs concatenated: [n]. Output i may depend on row i of the tensors only. `parameters`: every
    parameter `function` uses (the output layer's); one left out gets no gradient if it trains.

    The fused linear + loss of Liger-Kernel (its fused linear cross-entropy and JSD, there in
    Triton): `function` makes a chunk's logits from hidden states and reduces them to one number
    per position at once, so only [chunk_size, V] logits ever exist, and their gradient with respect
    to the hidden states is taken at once too (`RowwiseChunks`). Peak: a few [chunk_size, V] float32
    tensors, and one [n, H] tensor per differentiated input.
    """
    return RowwiseChunks.apply(function, chunk_size, len(tensors), *tensors, *parameters)


def target_logprobs(model, hidden, targets, temperature=1.0, chunk_size=128):
    """log p(target) under softmax(logits / temperature), logits = output_logits(model, hidden):

        log p(y | h) = z_y / T - log sum_v exp(z_v / T),    z = W h    (W: the output layer)

    hidden [n, H], targets [n] -> [n] float32, computed `chunk_size` positions at a time (`chunked`).
    RL needs the log-probs of the policy that sampled, so pass the sampling temperature.
    """
    def chunk_logprobs(hidden_chunk, target_chunk):
        logits = output_logits(model, hidden_chunk).float() / temperature  # [c, V]
        return -F.cross_entropy(logits, target_chunk, reduction="none")  # [c]
    return chunked(chunk_logprobs, [hidden, targets], chunk_size,
                   list(model.get_output_embeddings().parameters()))


def token_logprobs(model, batch, temperature=1.0, chunk_size=128):
    """log p(completion token t | prompt, completion tokens before t) of each row of `batch`
    (`pack`): [N, T] float32, 0 on padding. The output layer runs on completion positions only
    (`target_logprobs`), never on the prompt.
    """
    mask = batch["completion_mask"].bool()
    logprobs = target_logprobs(model, completion_hidden(model, batch)[mask],
                               batch["completion_ids"][mask], temperature, chunk_size)
    return torch.zeros(mask.shape, device=mask.device).masked_scatter(mask, logprobs)


# ----------------------------------------------------------------------------------------------
# Evaluation

def format_seconds(seconds):
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


def pass_at_k(n, c, k):
    """Unbiased pass@k (Chen et al. 2021, arXiv 2107.03374): the chance that at least one of k
    samples drawn without replacement from n, of which c are correct, is correct.

        pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n-c+1}^{n} (1 - k / i)

    The product form never builds the binomials, which overflow floats for large n.
    """
    if n - c < k:
        return 1.0  # every choice of k contains a correct sample
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def majority_vote(answers):
    """The most frequent final answer among samples (None = no readable answer, never a vote).

    Tie rule: among the answers with the highest count, the one that appears first in `answers`
    (the earliest sample) wins. Returns None when no sample has a readable answer.
    """
    counts = Counter(answer for answer in answers if answer is not None)  # keeps first-seen order
    return max(counts, key=counts.get) if counts else None  # max returns the first of equal counts


def sample_metrics(sampled_answers, references):
    """Metrics over problems from k sampled final answers each (normalized, or None).

    mean@k: average accuracy of the samples (the OPSD paper's Avg@k; equals pass@1).
    pass@j: unbiased estimate for j = 1, 2, 4, ... up to k (see `pass_at_k`).
    maj@k: the majority-voted answer (`majority_vote`) is correct.
    more_than_half@k: more than k/2 of the samples are correct (the "5 of 8" some comparisons
    report as "majority@8": a different and stricter metric than maj@k).
    format@k: the share of samples with a readable final answer, right or wrong.
    """
    k = len(sampled_answers[0])
    correct = [sum(answer == reference for answer in answers)
               for answers, reference in zip(sampled_answers, references)]
    problems = len(references)
    metrics = {f"mean@{k}": sum(correct) / (k * problems)}
    for j in sorted({2 ** i for i in range(k.bit_length()) if 2 ** i <= k} | {k}):
        metrics[f"pass@{j}"] = sum(pass_at_k(k, c, j) for c in correct) / problems
    metrics[f"maj@{k}"] = sum(majority_vote(answers) == reference for answers, reference
                              in zip(sampled_answers, references)) / problems
    metrics[f"more_than_half@{k}"] = sum(2 * c > k for c in correct) / problems
    metrics[f"format@{k}"] = sum(answer is not None for answers in sampled_answers
                                 for answer in answers) / (k * problems)
    return metrics


def evaluate(model, tokenizer, examples, max_new_tokens, batch_size=64, message=None, k=0,
             temperature=1.0, top_p=1.0, top_k=0, seed=0):
    """Greedy accuracy on `examples`, and with k > 0 the `sample_metrics` of k samples per problem.

    Returns {"accuracy", "format", "n"} (+ "k", "temperature", "mean@k", "pass@j", "maj@k", ...);
    format is the share of greedy completions with a readable final answer (`extract_answer`).
    message(example) -> the user message; default `student_message` (the problem alone).
    batch_size counts rows of a generate call: batch_size // k problems at a time when sampling.
    The samples come from a random stream of their own, seeded by `seed`, and the caller's random
    state is put back afterwards: evaluating in the middle of a run does not change its training.
    Under torchrun each rank evaluates every N-th problem and the answers are gathered, so all
    ranks return the same result. Shows progress with an ETA on stderr (rank 0's share).
    """
    if not examples:  # --eval-n 0
        return {"accuracy": None, "n": 0}
    references = [normalize_answer(e["answer"]) for e in examples]
    shard = examples[rank()::world_size()]
    prompts = [chat_prompt(tokenizer, (message or student_message)(e)) for e in shard]
    runs = [("greedy", 1, 0.0)] + ([(f"{k} samples", k, temperature)] if k else [])
    answers = {}  # run name -> [problem][sample] final answers
    device = device_of(model)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for name, num_samples, run_temperature in runs:
            step, start, answers[name] = max(1, batch_size // num_samples), time.time(), []
            for first in range(0, len(shard), step):
                texts = generate(model, tokenizer, prompts[first:first + step], max_new_tokens,
                                 run_temperature, top_p, top_k, num_samples)["texts"]
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
    result = {"accuracy": sum(a == r for a, r in zip(greedy, references)) / len(examples),
              "format": sum(answer is not None for answer in greedy) / len(examples),
              "n": len(examples)}
    if k:
        result.update({"k": k, "temperature": temperature},
                      **sample_metrics(answers[f"{k} samples"], references))
    return result


def describe(result):
    """One line for an `evaluate` result: 'held-out accuracy 0.444 (n=500)  mean@8 0.41 ...'."""
    if result["n"] == 0:
        return "no held-out evaluation (--eval-n 0)"
    extra = "".join(f"  {key} {value:.3f}" for key, value in result.items() if "@" in key)
    return (f"held-out accuracy {result['accuracy']:.3f} (n={result['n']}, format "
            f"{result['format']:.3f}){extra}")


# ----------------------------------------------------------------------------------------------
# Optimiser and schedule

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


# ----------------------------------------------------------------------------------------------
# Checkpoints: out/checkpoint-<step>/ holds the adapter (PEFT layout) or full weights, plus
# trainer_state.pt (optimizer, scheduler, RNG), state.json (step, data position, ...), args.json.

def rng_state():
    """The random states of this process: Python, the CPU and its own GPU (one GPU per rank)."""
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_state(state):
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if isinstance(state["cuda"], torch.Tensor) and torch.cuda.is_available():  # (older: a list)
        torch.cuda.set_rng_state(state["cuda"])  # the current device: this rank's GPU


def save_checkpoint(out, step, model, tokenizer, optimizer, scheduler, state, args):
    """Write checkpoint-<step> atomically: into a temporary folder, then one rename.

    A crash while writing leaves only the temporary folder, which resume ignores; the previous
    checkpoint is deleted only after the new one is in place. Under torchrun rank 0 writes (the
    weights are the same on every rank) with the random-number states of all ranks.
    """
    rng_states = gather_objects(rng_state())  # every rank samples from its own stream
    out = Path(out)
    final = out / f"checkpoint-{step:06d}"
    if rank() == 0:
        write_checkpoint(out, final, step, model, tokenizer, optimizer, scheduler, state, args,
                         rng_states)
    if dist.is_initialized():
        dist.barrier()  # no rank goes on before the checkpoint is in place
    return final


def write_checkpoint(out, final, step, model, tokenizer, optimizer, scheduler, state, args,
                     rng_states):
    tmp = out / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if args.full:
        model.save_pretrained(tmp)
    else:  # PEFT's AutoPeftModel loads the base from the path or hub id recorded here
        save_lora(model, tmp, base_model=str(TOY_DIR / "model") if args.model == "toy" else args.model)
    tokenizer.save_pretrained(tmp)  # the folder alone is enough to evaluate or serve it
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": rng_states}, tmp / "trainer_state.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2))
    (tmp / "args.json").write_text(json.dumps(vars(args), indent=2))
    for file in tmp.iterdir():  # make the bytes durable before the rename publishes them
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(out.glob("checkpoint-*"))[:-args.keep_checkpoints]:  # names sort by step
        shutil.rmtree(old)


def save_every(args, step, model, tokenizer, optimizer, scheduler, state):
    """The periodic checkpoint of --save-every (the final one is written by finish_run)."""
    if args.save_every and step % args.save_every == 0 and step < args.steps:
        save_checkpoint(args.out, step, model, tokenizer, optimizer, scheduler, state, args)


def latest_checkpoint(out):
    folders = sorted(Path(out).glob("checkpoint-*"))
    return folders[-1] if folders else None


def load_checkpoint(folder, model, optimizer, scheduler, full):
    """Restore weights, optimizer, scheduler and RNG from `folder`; return its state.json dict."""
    from safetensors.torch import load_file
    if full:
        weights = {}
        for file in sorted(Path(folder).glob("*.safetensors")):
            weights.update(load_file(file, device=str(device_of(model))))
        missing, unexpected = model.load_state_dict(weights, strict=False)
        tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
        if unexpected or set(missing) - tied:
            raise InputError(f"{folder}: weights do not match the model ({missing or unexpected})")
    else:
        load_lora(model, folder)
    # Onto the CPU first: load_state_dict moves the optimizer state to each parameter's device
    # (without map_location every rank would first put its copy on the GPU it was saved from).
    trainer_state = torch.load(Path(folder) / "trainer_state.pt", weights_only=True,
                               map_location="cpu")
    optimizer.load_state_dict(trainer_state["optimizer"])
    scheduler.load_state_dict(trainer_state["scheduler"])
    if len(trainer_state["rng"]) != world_size():
        raise InputError(f"{folder}: saved by {len(trainer_state['rng'])} processes, resumed by "
                         f"{world_size()}: resume with as many (the data order depends on it)")
    set_rng_state(trainer_state["rng"][rank()])
    return json.loads((Path(folder) / "state.json").read_text())


# ----------------------------------------------------------------------------------------------
# The parts of a run that every method shares: before the first step, the optimizer step, the end

RUN_FILES = ("metrics.jsonl", "summary.json")  # a run's, besides its checkpoint-* folders


def make_folder(out):
    """--out as a folder, made now, before anything slow: one line if it is a file or cannot be."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file: give a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"--out {out}: cannot make the folder ({error.strerror})") from None


def prepare_out(args):
    """Make --out this run's folder without touching another run's files.

    A folder that holds a run (checkpoints, metrics, summary) stops the script in one line unless
    --resume continues that run or --overwrite replaces it (removing those files, no others).
    --resume refuses a checkpoint of another method, model or LoRA shape. Then this run's method,
    command line, start time and arguments are appended to runs.jsonl: every run of the folder,
    resumed ones too.
    """
    out = Path(args.out)
    if any(folder.name.startswith("checkpoint-") for folder in [out, *out.resolve().parents]):
        raise InputError(f"--out {out} is inside a checkpoint, which its run may delete")
    if args.resume and args.overwrite:
        raise InputError("--resume continues the run in --out, --overwrite replaces it: give one")
    make_folder(out)
    existing = sorted(out.glob("checkpoint-*")) + [out / name for name in RUN_FILES
                                                   if (out / name).exists()]
    if existing and not (args.resume or args.overwrite):
        raise InputError(f"--out {out} holds a run ({existing[0].name}): continue it with --resume, "
                         "give another --out, or replace it with --overwrite")
    existing += [out / "runs.jsonl"] if (out / "runs.jsonl").exists() else []
    for flag in ("model", "data", "eval_data"):  # --overwrite must not remove what this run reads
        used = Path(str(getattr(args, flag))).resolve()
        if args.overwrite and any(path.resolve() in [used, *used.parents] for path in existing):
            raise InputError(f"--overwrite would delete --{flag.replace('_', '-')} "
                             f"{getattr(args, flag)}: give another --out")
    checkpoint = latest_checkpoint(out) if args.resume else None
    if checkpoint and (checkpoint / "args.json").exists():
        saved = json.loads((checkpoint / "args.json").read_text())
        compared = ["method", "model", "full"] + ([] if args.full else ["lora_r", "lora_alpha",
                                                                       "dora"])
        for name in compared:
            if name in saved and saved[name] != getattr(args, name):
                what = name if name == "method" else "--" + name.replace("_", "-")
                raise InputError(f"--resume: {checkpoint} was trained with {what} {saved[name]}, "
                                 f"this run has {getattr(args, name)}: resume with the same, or "
                                 "give another --out")
    if dist.is_initialized():
        dist.barrier()  # every rank has looked at --out before rank 0 changes it
    if rank() == 0:
        for path in existing if args.overwrite else []:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        with open(out / "runs.jsonl", "a") as runs:
            runs.write(json.dumps({"method": args.method, "command": sys.argv, "started":
                                   time.strftime("%Y-%m-%dT%H:%M:%S%z"), "args": vars(args)}) + "\n")
    if dist.is_initialized():
        dist.barrier()  # no rank reads --out before it is ready


def start_run(args, updates_per_step=1):
    """Data, model (+ LoRA unless --full), optimizer and schedule; then resume from the latest
    checkpoint in --out, or evaluate the starting model on the held-out split ("before").
    The schedule spans args.steps * updates_per_step optimizer updates.

    Returns model, tokenizer, train_examples, eval_examples, optimizer, scheduler, step, state;
    `state` is what a checkpoint's state.json keeps (data position, token counters, "before").
    """
    started = time.time()
    init_distributed()
    prepare_out(args)  # before anything slow
    random.seed(args.seed)
    torch.manual_seed(args.seed)  # the same LoRA initialisation on every rank
    train_examples = load_examples(args.data, "train")  # bad data fails before the slow load
    separate_eval_file = args.eval_data not in (None, "toy")  # all of it is held out
    eval_examples = load_examples(args.eval_data or args.data,
                                  "all" if separate_eval_file else "test")[:args.eval_n]
    model, tokenizer = load_model(args.model, args.dtype, args.full, args.gradient_checkpointing)
    if not args.full:
        apply_lora(model, args.lora_r, args.lora_alpha, args.lora_dropout, dora=args.dora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    adapter = "full" if args.full else f"{'DoRA' if args.dora else 'LoRA'} r={args.lora_r}"
    print(f"model {args.model}: {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{trainable:,} trainable ({adapter})")
    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    scheduler = make_scheduler(optimizer, args.warmup_steps, args.steps * updates_per_step,
                               args.schedule)
    if world_size() > 1:
        print(f"data parallel: {world_size()} processes, {args.batch_size} prompts each per step")
        random.seed(args.seed + rank())
        torch.manual_seed(args.seed + rank())  # each rank samples its rollouts from its own stream

    step, state = 0, {"data_position": 0, "train_tokens": 0, "generated_tokens": 0,
                      "wall_seconds": 0.0, "eval_seconds": 0.0,
                      "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    checkpoint = latest_checkpoint(args.out) if args.resume else None
    if checkpoint:
        state = load_checkpoint(checkpoint, model, optimizer, scheduler, args.full)
        step = state.pop("step")
        print(f"resumed from {checkpoint} at step {step}")
    else:
        if args.resume:
            print(f"no checkpoint in {args.out}: starting from step 0")
        state["before"] = run_evaluation(args, model, tokenizer, eval_examples, state, args.eval_k)
        print(f"before: {describe(state['before'])}")
    state["wall_seconds"] += time.time() - started
    return model, tokenizer, train_examples, eval_examples, optimizer, scheduler, step, state


def run_evaluation(args, model, tokenizer, eval_examples, state, k=0):
    """`evaluate` with the script's flags; its time goes to state["eval_seconds"]."""
    started = time.time()
    result = evaluate(model, tokenizer, eval_examples, args.max_new_tokens, args.eval_batch_size,
                      k=k, temperature=args.eval_temperature, seed=args.seed)
    state["eval_seconds"] += time.time() - started
    return result


def periodic_evaluation(args, step, model, tokenizer, eval_examples, state):
    """Every --eval-every steps (not the last: finish_run evaluates it), the greedy held-out
    accuracy and format share for the step's metrics, with the run's seconds so far that were not
    spent evaluating (the x of an accuracy-against-time plot); else {}."""
    if not args.eval_every or step % args.eval_every or step == args.steps or not eval_examples:
        return {}
    train_seconds = round(state["wall_seconds"] - state["eval_seconds"], 1)
    result = run_evaluation(args, model, tokenizer, eval_examples, state)
    return {"eval_accuracy": result["accuracy"], "eval_format": result["format"],
            "train_seconds": train_seconds}


def optimizer_step(model, optimizer, scheduler, max_grad_norm):
    """Clip the gradient norm, step AdamW and the schedule, clear gradients; return the norm
    before clipping (worth logging: a loss near 0 can still come with a large gradient)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if dist.is_initialized():
        # Each rank's loss is its part of the whole batch's loss (normalised by counts over all
        # ranks), so the sum of the ranks' gradients is the gradient of the whole batch.
        for parameter in trainable:
            if parameter.grad is None:  # this rank had no rows (e.g. --skip-zero-std dropped all)
                parameter.grad = torch.zeros_like(parameter)
            dist.all_reduce(parameter.grad)
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(grad_norm)


def finish_run(args, model, tokenizer, optimizer, scheduler, step, state, eval_examples):
    """Evaluate "after", save the final checkpoint and write summary.json: what was trained on
    what, with which arguments, the result before and after, the last step's loss, the cost."""
    started = time.time()
    after = run_evaluation(args, model, tokenizer, eval_examples, state, args.eval_k)
    print(f"after: {describe(after)}" + (f", before {state['before']['accuracy']:.3f}"
                                         if after["n"] else ""))
    state["wall_seconds"] += time.time() - started
    folder = save_checkpoint(args.out, step, model, tokenizer, optimizer, scheduler, state, args)
    print(f"saved {'model' if args.full else 'adapter'} to {folder}")
    metrics = Path(args.out) / "metrics.jsonl"
    rows = metrics.read_text().splitlines() if rank() == 0 and metrics.exists() else []
    write_summary(args.out, {
        "method": args.method, "model": args.model, "data": args.data,
        "eval_data": args.eval_data or ("toy test split" if args.data == "toy"
                                        else f"{args.data} (held-out slice)"),
        "before": state["before"], "after": after, "steps": step,
        "final_loss": json.loads(rows[-1]).get("loss") if rows else None,
        "train_tokens": state["train_tokens"], "generated_tokens": state["generated_tokens"],
        "wall_seconds": round(state["wall_seconds"], 1),
        "eval_seconds": round(state["eval_seconds"], 1),
        **({"cut_solutions": state["cut_solutions"]} if "cut_solutions" in state else {}),
        "started": state.get("started"), "ended": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "args": vars(args)})


# ----------------------------------------------------------------------------------------------
# Logging: one line per step on stdout, one JSON object per step in metrics.jsonl

def open_metrics(out, resumed_step):
    """metrics.jsonl in `out`; on resume, drop rows past the checkpoint (they will be redone)."""
    if rank() != 0:
        return open(os.devnull, "w")  # rank 0 logs for all
    path = Path(out) / "metrics.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    if resumed_step and path.exists():
        rows = [line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= resumed_step]
    path.write_text("".join(row + "\n" for row in rows))
    return open(path, "a")


def log_step(metrics_file, metrics, total_steps, seconds_per_step):
    """Print one line for the step and append its metrics as JSON."""
    metrics_file.write(json.dumps(metrics) + "\n")
    metrics_file.flush()
    shown = "  ".join(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
                      for key, value in metrics.items() if key != "step")
    eta = format_seconds(seconds_per_step * (total_steps - metrics["step"]))
    print(f"step {metrics['step']:>4}/{total_steps}  {shown}  eta {eta}", flush=True)


def write_summary(out, summary):
    if rank() == 0:
        (Path(out) / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))
