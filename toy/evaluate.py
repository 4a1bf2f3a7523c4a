"""toy/evaluate.py: greedy accuracy, mean@k, pass@k and maj@k of a model (+ a LoRA adapter).

    python toy/evaluate.py                       # the toy base on the toy test split, k = 8
    python toy/evaluate.py --adapter out/opsd/checkpoint-000150 --temperature 0.7
    torchrun --nproc-per-node 2 toy/evaluate.py  # the problems shared out among the processes

The metrics are common.evaluate's, the same the training scripts report before and after training.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402
from lora import load_lora  # noqa: E402


def evaluate_model(args):
    """Evaluate a model (+ adapter) on held-out problems; print the metrics and write them as JSON.
    Under torchrun the problems are shared out among the processes."""
    common.init_distributed()
    examples = common.load_examples(args.data, args.split)[:args.eval_n]
    if args.adapter and not (Path(args.adapter) / "adapter_config.json").is_file():
        raise common.InputError(f"{args.adapter}: no adapter_config.json (a --full checkpoint "
                                "is a model folder: pass it as --model)")
    model, tokenizer = common.load_model(args.model, args.dtype)
    if args.adapter:
        load_lora(model, args.adapter)
    result = common.evaluate(model, tokenizer, examples, args.max_new_tokens, args.batch_size,
                             k=args.k, temperature=args.temperature, top_p=args.top_p,
                             top_k=args.top_k, seed=args.seed)
    result.update(model=args.model, adapter=args.adapter, data=args.data, split=args.split)
    out = Path(args.out or Path(args.adapter or "out") / "eval.json")
    if common.rank() == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    print(common.describe(result))
    print(f"wrote {out}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--model", default="toy", help="Hugging Face model id or local folder; 'toy' = built-in")
    add("--adapter", default=None, help="a LoRA checkpoint folder (adapter_model.safetensors)")
    add("--data", default="toy", help="'toy' (its test split) or a local .jsonl/.json file")
    add("--split", choices=["all", "test"], default="all",
        help="of a file: all records, or the held-out slice the training scripts keep")
    add("--k", type=int, default=8, help="samples per problem (0: greedy only)")
    add("--temperature", type=float, default=1.0)
    add("--top-p", type=float, default=1.0)
    add("--top-k", type=int, default=0, help="0: no top-k")
    add("--max-new-tokens", type=int, default=1024)
    add("--eval-n", type=int, default=500, help="problems to evaluate on (the first N)")
    add("--batch-size", type=int, default=64, help="rows per generate call")
    add("--dtype", choices=["auto", "bfloat16", "float32"], default="auto",
        help="compute precision (auto: bfloat16 on CUDA, float32 on CPU)")
    add("--seed", type=int, default=0)
    add("--out", default=None, help="JSON file (default: ADAPTER/eval.json, else out/eval.json)")
    args = common.parse_args(parser, argv, {"batch_size": 256})
    if args.k > 0 and args.temperature <= 0:
        raise common.InputError("--k samples: give it --temperature > 0 (greedy accuracy is "
                                "always measured)")
    args.split = "test" if args.data == "toy" else args.split
    evaluate_model(args)


if __name__ == "__main__":
    common.run_cli(main)
