"""A run's curves against the step, from its metrics.jsonl: one PNG, one panel per logged number.

    python toy/plot.py out/grpo                        # -> out/grpo/curves.png
    python toy/plot.py out/opsd out/opsd-ema --out out/curves.png    # several runs, overlaid

The panels come in the order a run is watched: the loss, the reward (GRPO) and held-out accuracy
(--eval-every; before and after from summary.json), the gradient norm, the student's token
entropy, the completion length and the share of completions cut at --max-new-tokens, then the
method's own numbers (GRPO's zero_std_fraction and clip_fraction, OPSD's uncapped_divergence, the
sampler/trainer logprob_gap, ...); past 20 steps a running mean over a tenth of the run shows the
trend over the thin line of each step. It reads only a run's files, never its model, so it draws
a run that is still going. Needs matplotlib (requirements-dev.txt).
"""
import argparse
import importlib.util
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402

FIRST = ["loss", "reward", "eval_accuracy", "grad_norm", "entropy", "completion_length",
         "truncated_fraction"]  # what tells whether a run trains, in this order; the rest follow
BOOKKEEPING = {"step", "lr", "generated_tokens", "tokens_per_second", "train_seconds",
               "eval_format"}  # logged, but not the run's health


def read_metrics(folder):
    """A run folder's metrics.jsonl as a list of rows (dicts), one per step; a finished run's
    held-out accuracy before and after (summary.json) joins them as eval_accuracy at its steps."""
    path, summary = Path(folder) / "metrics.jsonl", Path(folder) / "summary.json"
    if not path.is_file():
        raise common.InputError(f"{folder}: no metrics.jsonl (not a run folder)")
    rows = [common.parse_json(line, path, number)
            for number, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    if summary.is_file():
        result = json.loads(summary.read_text())
        rows = ([{"step": 0, "eval_accuracy": result["before"]["accuracy"]}]
                if result.get("before") else []) + rows + \
            [{"step": result["steps"], "eval_accuracy": result["after"]["accuracy"]}]
    return rows


def running_mean(values, window):
    """The mean of each value and the window - 1 before it (fewer at the start)."""
    return [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1])
            for i in range(len(values))]


def panel_names(runs):
    """The numbers to draw: FIRST's that any run logged, then the others' numeric fields."""
    logged = {}  # name -> None, in the order first seen
    for rows in runs:
        for row in rows:
            logged.update({name: None for name, value in row.items()
                           if isinstance(value, (int, float)) and not isinstance(value, bool)
                           and name not in BOOKKEEPING})
    return [name for name in FIRST if name in logged] + [name for name in logged
                                                         if name not in FIRST]


def plot_curves(folders, path):
    """Draw each run's numbers against the step, a panel per number, the runs overlaid."""
    import matplotlib
    matplotlib.use("Agg")  # a file, no display
    import matplotlib.pyplot as plt
    runs = [read_metrics(folder) for folder in folders]
    names = panel_names(runs)
    if not names:
        raise common.InputError(f"{', '.join(map(str, folders))}: no step logged yet")
    columns = min(3, len(names))
    rows_of_panels = -(-len(names) // columns)  # ceiling division
    figure, axes = plt.subplots(rows_of_panels, columns, figsize=(4.2 * columns,
                                                                   2.8 * rows_of_panels),
                                squeeze=False)
    for panel, name in zip(axes.flat, names):
        for index, (folder, rows) in enumerate(zip(folders, runs)):
            points = [(row["step"], row[name]) for row in rows if row.get(name) is not None]
            steps, values = [step for step, _ in points], [value for _, value in points]
            if len(points) < 20:
                panel.plot(steps, values, marker="o", markersize=3, color=f"C{index}",
                           label=Path(folder).name)
                continue
            panel.plot(steps, values, color=f"C{index}", alpha=0.3, linewidth=0.8)  # each step
            panel.plot(steps, running_mean(values, max(2, len(points) // 10)), color=f"C{index}",
                       label=Path(folder).name)  # the trend: a running mean of a tenth of a run
        panel.set_title(name, fontsize=10)
        panel.grid(alpha=0.3)
    for panel in axes.flat[len(names):]:
        panel.axis("off")
    for panel in axes[-1]:
        panel.set_xlabel("step")
    if len(folders) > 1:
        axes.flat[0].legend(fontsize=8)
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    print(f"wrote {path} ({len(names)} panels: {', '.join(names)})")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders (--out of sft.py, grpo.py, opsd.py)")
    parser.add_argument("--out", default=None,
                        help="the PNG; if none, RUN/curves.png for one run, else out/curves.png")
    args = parser.parse_args(argv)
    if importlib.util.find_spec("matplotlib") is None:
        raise common.InputError("toy/plot.py needs matplotlib: pip install -r requirements-dev.txt")
    out = args.out or (Path(args.runs[0]) / "curves.png" if len(args.runs) == 1
                       else Path("out") / "curves.png")
    plot_curves(args.runs, out)


if __name__ == "__main__":
    common.run_cli(main)
