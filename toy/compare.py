"""The comparison of finished runs: a Markdown table (mean ± sd over seeds, grouped by method and by
the settings that differ) and, with --plot, a plot of held-out greedy accuracy against generated
tokens and against training time (matplotlib: requirements-dev.txt). A run's curves: toy/plot.py.

    python toy/compare.py out/study/sft-* out/study/grpo-* out/study/opsd-* --plot toy/compare.png

It reads only the runs' summary.json and metrics.jsonl, and an eval.json that toy/evaluate.py wrote
afterwards into a run's folder or its final checkpoint (its sampled metrics; see
`later_evaluation`), so it works for any runs; the README's two studies are what it was written
for. A run trained with --eval-k 0 and evaluated once afterwards, the real-model study's way:

    python toy/evaluate.py --model M --adapter out/real/grpo-1/checkpoint-000030 --eval-k 4 \
        --out out/real/grpo-1 ...       # the run's own --eval-n, --max-new-tokens, --seed
    python toy/evaluate.py --model M --eval-k 4 --out out/real/base ...
    python toy/compare.py out/real/*-[0-9] --base out/real/base
"""
import argparse
import importlib.util
import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402


def read_run(folder):
    """summary.json and metrics.jsonl of a finished run folder; its eval.json, when there, adds
    sampled metrics to the summary's "after" (`later_evaluation`)."""
    folder = Path(folder)
    if not (folder / "summary.json").is_file():
        raise common.InputError(f"{folder}: no summary.json (not a finished run)")
    metrics = folder / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] \
        if metrics.is_file() else []
    summary = json.loads((folder / "summary.json").read_text())
    summary["after"] = later_evaluation(folder, summary["after"],
                                        folder / f"checkpoint-{summary['steps']:06d}")
    return summary, rows


def later_evaluation(folder, greedy, checkpoint=None):
    """`greedy` (a run's evaluation result) with the metrics of folder/eval.json added, when it
    is there (else checkpoint/eval.json: `toy/evaluate.py --adapter CHECKPOINT` writes it there):
    `toy/evaluate.py --eval-k K` of the same model, the way a run trained with --eval-k 0 gets
    mean@K, pass@K and maj@K (one sampled evaluation instead of one before and one after every
    run). Its greedy accuracy must be the run's: the same model."""
    path = next((place / "eval.json" for place in (Path(folder), checkpoint)
                 if place and (place / "eval.json").is_file()), None)
    if path is None:
        return greedy
    result = json.loads(path.read_text())
    if (result["accuracy"], result["n"]) != (greedy["accuracy"], greedy["n"]):
        raise common.InputError(f"{path}: greedy accuracy {result['accuracy']} on {result['n']} "
                                f"problems, not {greedy['accuracy']} on {greedy['n']}: "
                                "an evaluation of another model")
    return {**greedy, **result}


def spread(values, scale=1.0, digits=1):
    """'mean ± sample standard deviation' of the values that exist (None: missing) over seeds."""
    values = [value * scale for value in values if value is not None]
    if not values:
        return "–"
    text = f"{statistics.mean(values):,.{digits}f}"
    return text + (f" ± {statistics.stdev(values):,.{digits}f}" if len(values) > 1 else "")


def per_problem(results):
    """Each held-out problem's greedy accuracy, averaged over the runs' results (seeds): [n], or
    None when a result has no per-problem record (`common.evaluate`'s "correct"; older runs)."""
    if not results or any("correct" not in result for result in results):
        return None
    return [statistics.mean(column) for column in zip(*(result["correct"] for result in results))]


def paired_change(first, second):
    """first - second on the same problems, in points, with its 95% interval: the mean of the
    per-problem differences d_i, +- 1.96 sd(d) / sqrt(n) (the normal approximation; a paired
    comparison, so what two runs both solve or both miss adds no noise). 'mean ± half width'."""
    if first is None or second is None or len(first) != len(second):
        return "–"
    differences = [a - b for a, b in zip(first, second)]
    half_width = 1.96 * statistics.stdev(differences) / math.sqrt(len(differences))
    return f"{100 * statistics.mean(differences):+.1f} ± {100 * half_width:.1f}"


# Arguments that do not change what a run learns: runs that differ only in these are one group.
NOT_SETTINGS = {"seed", "out", "resume", "overwrite", "save_every", "keep_checkpoints",
                "eval_every", "micro_batch_size", "chunk_size", "eval_batch_size",
                "gradient_checkpointing"}


def group_names(summaries, ignore=()):
    """Each run's group: its method, and its value of every setting in which runs of that method
    differ (summary.json's "args"; summaries written before it recorded them have none), e.g.
    "sft --steps 2"; seeds are what a group averages over, and so are the settings in `ignore`."""
    differing = {}  # method -> the settings its runs differ in
    for method in {summary["method"] for summary in summaries}:
        runs = [summary.get("args", {}) for summary in summaries if summary["method"] == method]
        differing[method] = sorted(
            name for name in set().union(*runs) if name not in NOT_SETTINGS | set(ignore)
            and len({json.dumps(run.get(name)) for run in runs}) > 1)
    return [" ".join([summary["method"]] + [f"--{name.replace('_', '-')} "
                                            f"{summary.get('args', {}).get(name)}"
                                            for name in differing[summary["method"]]])
            for summary in summaries]


def compare_command(args):
    """Print a Markdown table of finished runs, grouped by method and the settings that differ
    (mean ± sd over their seeds); with --plot, plot held-out accuracy against generated tokens."""
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise common.InputError("--plot needs matplotlib: pip install -r requirements-dev.txt")
    runs = [read_run(folder) for folder in args.runs]
    if args.base and not (Path(args.base) / "eval.json").is_file():
        raise common.InputError(f"--base {args.base}: no eval.json (write one with toy/evaluate.py "
                                "--out there)")
    base_result = json.loads((Path(args.base) / "eval.json").read_text()) if args.base else None
    for summary, _ in runs:  # a run trained with --no-eval-before starts from --base's result
        if summary["before"] is None and base_result is None:
            raise common.InputError(f"{summary['args']['out']}: not evaluated before training "
                                    "(--no-eval-before): give --base")
        summary["before"] = summary["before"] or {key: base_result[key] for key in
                                                  ("accuracy", "format", "n", "correct")
                                                  if key in base_result}
    methods = {"base (before)": [({**summary, "generated_tokens": 0, "train_tokens": 0,
                                   "wall_seconds": 0, "eval_seconds": 0,
                                   "after": later_evaluation(args.base, summary["before"])
                                   if args.base else summary["before"]}, [])
                                 for summary, _ in runs]}  # every run starts from the same base
    for name, (summary, rows) in zip(group_names([summary for summary, _ in runs], args.ignore),
                                     runs):
        methods.setdefault(name, []).append((summary, rows))
    k = max(summary["after"].get("k", 0) for summary, _ in runs)
    accuracies = ["accuracy", "format"] + ([f"mean@{k}", f"pass@{k}", f"maj@{k}", f"format@{k}"]
                                           if k else [])
    header = (["method", "runs", "greedy accuracy (%)", "change vs base (points, 95%)",
               "greedy format (%)"]
              + [f"{name} (%)" for name in accuracies[2:]]
              + ["generated tokens", "training tokens", "wall time w/o eval (s)"])
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    base = per_problem([summary["before"] for summary, _ in runs])
    problems = {}  # method -> per-problem accuracy after, averaged over its runs
    for method, group in methods.items():
        summaries = [summary for summary, _ in group]
        problems[method] = per_problem([s["after"] for s in summaries])
        cells = [spread([s["after"].get(name) for s in summaries], 100) for name in accuracies]
        cells.insert(1, "–" if method == "base (before)" else paired_change(problems[method], base))
        cells += [spread([s[key] for s in summaries], digits=0)
                  for key in ["generated_tokens", "train_tokens"]]
        cells.append(spread([s["wall_seconds"] - s.get("eval_seconds", 0) for s in summaries],
                            digits=0))  # evaluation time left out: every run evaluates alike
        lines.append(f"| {method} | {len(group)} | " + " | ".join(cells) + " |")
    names = list(problems)[1:]
    if len(names) > 1:  # each pair of methods on the same problems
        lines += ["", "| pair of methods | first - second (points, 95%) |", "| --- | --- |"]
        lines += [f"| {first} - {second} | {paired_change(problems[first], problems[second])} |"
                  for i, first in enumerate(names) for second in names[i + 1:]]
    print("\n".join(lines))
    if args.plot:
        plot_runs(list(methods.items())[1:], args.plot)


def plot_runs(methods, path):
    """Held-out greedy accuracy of each run, one line from its start through its --eval-every
    points to its end: against the tokens it had generated (left) and against its seconds of
    training, evaluation left out (right; eval points of runs older than this measure are
    skipped)."""
    import matplotlib
    matplotlib.use("Agg")  # a file, no display
    import matplotlib.pyplot as plt
    figure, (by_tokens, by_time) = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for index, (method, group) in enumerate(methods):
        for run, (summary, rows) in enumerate(group):
            points = ([(0, 0, summary["before"]["accuracy"])]
                      + [(row["generated_tokens"], row.get("train_seconds"), row["eval_accuracy"])
                         for row in rows if "eval_accuracy" in row]
                      + [(summary["generated_tokens"],
                          summary["wall_seconds"] - summary.get("eval_seconds", 0),
                          summary["after"]["accuracy"])])
            points = [point for point in points if point[2] is not None]  # --eval-n 0: none
            style = dict(marker="o", markersize=3, color=f"C{index}", alpha=0.8,
                         label=method if run == 0 else None)
            by_tokens.plot([x for x, _, _ in points], [100 * y for _, _, y in points], **style)
            timed = [(x, y) for _, x, y in points if x is not None]
            by_time.plot([x for x, _ in timed], [100 * y for _, y in timed], **style)
    by_tokens.set(xlabel="generated tokens (sampling cost)", ylabel="held-out greedy accuracy (%)")
    by_time.set(xlabel="seconds of training (evaluation left out)")
    for axes in (by_tokens, by_time):
        axes.grid(alpha=0.3)
    by_tokens.legend()
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("runs", nargs="+", help="output folders of finished runs")
    parser.add_argument("--base", default=None,
                        help="folder of toy/evaluate.py's eval.json for the starting model: its "
                             "sampled metrics for the base row")
    parser.add_argument("--plot", default=None, metavar="PNG",
                        help="also draw accuracy against generated tokens and seconds to this PNG "
                             "(needs matplotlib: requirements-dev.txt)")
    parser.add_argument("--ignore", nargs="+", default=[], metavar="SETTING",
                        help="settings (as in summary.json's args, e.g. model) whose values do "
                             "not separate groups, like the seed: e.g. each seed of an arm "
                             "starting from its own checkpoint")
    compare_command(parser.parse_args(argv))


if __name__ == "__main__":
    common.run_cli(main)
