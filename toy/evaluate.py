"""toy/evaluate.py: greedy accuracy, mean@k, pass@k and maj@k of a model (+ a LoRA adapter).

    python toy/evaluate.py                       # the toy base on the toy test split, k = 8
    python toy/evaluate.py --adapter out/opsd/checkpoint-000150 --eval-temperature 0.7
    python toy/evaluate.py --view teacher --eval-k 0   # with the reference solution in view
    torchrun --nproc-per-node 2 toy/evaluate.py  # the problems shared out among the processes

The metrics are common.evaluate's, the same the training scripts report before and after training,
and the flags have the training scripts' names, meanings and toy settings (--eval-k, --eval-n,
--eval-temperature, --eval-batch-size, --out a folder).
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402
from lora import load_lora  # noqa: E402


# The training scripts' toy settings of these flags (sft.py's, grpo.py's and opsd.py's TOY_SETTINGS).
TOY_SETTINGS = {"max_new_tokens": 64, "eval_batch_size": 256, "eval_temperature": 0.7}


def evaluate_model(args):
    """Evaluate a model (+ adapter) on held-out problems; print the metrics and write them as JSON.
    Under torchrun the problems are shared out among the processes."""
    common.init_distributed()
    out = Path(args.out or args.adapter or "out")
    common.make_folder(out)  # before the slow part: no result is lost
    examples = common.load_examples(args.data, args.split)[:args.eval_n]
    if args.adapter and not (Path(args.adapter) / "adapter_config.json").is_file():
        raise common.InputError(f"{args.adapter}: no adapter_config.json (a --full checkpoint "
                                "is a model folder: pass it as --model)")
    model, tokenizer = common.load_model(args.model, args.dtype)
    if args.adapter:
        try:
            load_lora(model, args.adapter)
        except (ValueError, RuntimeError):  # an adapter of another base model (its keys, shapes)
            raise common.InputError(
                f"--adapter {args.adapter} does not fit --model {args.model}: its "
                f"adapter_config.json names {adapter_base(args.adapter)} as its base") from None
    teacher_view = args.view == "teacher"  # OPSD's premise: how much better the teacher answers
    result = common.evaluate(model, tokenizer, examples, args.max_new_tokens,
                             args.eval_batch_size, k=args.eval_k,
                             temperature=args.eval_temperature, seed=args.seed,
                             message=(lambda e: common.solution_prompt(e["question"], e["solution"]))
                             if teacher_view else None)
    result.update(model=args.model, adapter=args.adapter, data=args.data, split=args.split,
                  view=args.view)
    if common.rank() == 0:
        (out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    print(common.describe(result))
    print(f"wrote {out / 'eval.json'}")


def adapter_base(adapter):
    """The base model an adapter folder names (PEFT's base_model_name_or_path), 'toy' for the
    toy's; None if it names none."""
    config = Path(adapter) / "adapter_config.json"
    base = json.loads(config.read_text()).get("base_model_name_or_path") if config.is_file() \
        else None
    return "toy" if base == common.model_folder("toy") else base


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--model", default=None, help="Hugging Face model id or local folder; 'toy' = built-in; "
        "if none, the --adapter's base model (its adapter_config.json names it), else toy")
    add("--adapter", default=None, help="a LoRA checkpoint folder (adapter_model.safetensors)")
    add("--data", default="toy", help="'toy' (its test split) or a local .jsonl/.json file")
    add("--split", choices=["all", "test"], default="all",
        help="of a file: all records, or the held-out slice the training scripts keep")
    add("--view", choices=["student", "teacher"], default="student",
        help="the problem alone, or OPSD's teacher prompt with the reference solution shown")
    add("--eval-k", type=int, default=8, help="samples per problem (0: greedy accuracy only)")
    add("--eval-temperature", type=float, default=1.0, help="sampling temperature of --eval-k")
    add("--max-new-tokens", type=int, default=1024, help="longest completion, in tokens")
    add("--eval-n", type=int, default=500, help="problems to evaluate on (the first N)")
    add("--eval-batch-size", type=int, default=64, help="rows per generate call")
    add("--dtype", choices=["auto", "bfloat16", "float32"], default="auto",
        help="compute precision (auto: bfloat16 on CUDA, float32 on CPU)")
    add("--seed", type=int, default=0, help="the samples' random stream")
    add("--out", default=None, help="folder for eval.json; if none, the adapter's folder, else out")
    adapter = parser.parse_known_args(argv)[0].adapter
    base = (adapter_base(adapter) if adapter else None) or "toy"
    args = common.parse_args(parser, argv, {"model": base}, TOY_SETTINGS)
    if adapter and args.model == base != "toy":
        print(f"model {base}: the adapter's base, from its adapter_config.json")
    args.split = "test" if args.data == "toy" else args.split
    evaluate_model(args)


if __name__ == "__main__":
    common.run_cli(main)
