"""Whether a change leaves the toy defaults' results the same, token for token: a refactor's check.

    python toy/same_results.py 55ee0c1                 # the three toy defaults, at that commit and here
    python toy/same_results.py 55ee0c1 --scripts opsd  # only some of them
    python toy/same_results.py --runs out/a out/b      # two finished run folders
    python toy/same_results.py 323ff77 --close loss    # the loss equal to float32 rounding

With a commit, it runs `python sft.py`, `python grpo.py` and `python opsd.py` (their toy defaults,
seed 0) in a git worktree of that commit and in this working tree, one after another, into
out/same_results/<reference|working>/<script>, then compares each pair. Two runs are the same when
every row of metrics.jsonl is equal field for field except the time fields (TIME_FIELDS), and
summary.json's results are equal (SUMMARY_FIELDS: accuracies and each held-out problem's result,
steps, final loss, token counts). Floats must be equal, not close: a refactor that keeps the
arithmetic keeps every bit. The exception, named on the command line: `--close FIELD...` compares
those fields (and with `loss`, summary.json's final_loss) to a relative CLOSE_TOLERANCE, for a change
that rounds a logged value differently (a loss divided by the step's count instead of averaged
and reweighted), and lists how far they moved. A field only one side has (a new metric) is listed,
not failed. It prints each difference and exits with 1 if there is one.
"""
import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = ("sft", "grpo", "opsd")
TIME_FIELDS = {"tokens_per_second", "train_seconds"}
SUMMARY_FIELDS = ("before", "after", "steps", "final_loss", "train_tokens", "generated_tokens")
CLOSE_TOLERANCE = 1e-6  # relative: float32 rounds at about 6e-8


def equal(first, second, close):
    """first == second, or within CLOSE_TOLERANCE of each other when `close` and both are numbers."""
    if close and isinstance(first, float) and isinstance(second, float):
        return math.isclose(first, second, rel_tol=CLOSE_TOLERANCE, abs_tol=1e-30)
    return first == second


def differences(reference, working, close=()):
    """The differences between two finished run folders: (list of failures, list of notes);
    the fields in `close` are compared to CLOSE_TOLERANCE."""
    failures, notes, moved = [], [], {}
    rows = [[json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines()
             if line.strip()] for folder in (reference, working)]
    if len(rows[0]) != len(rows[1]):
        failures.append(f"metrics.jsonl: {len(rows[0])} rows against {len(rows[1])}")
    for first, second in zip(*rows):
        for key in sorted((set(first) | set(second)) - TIME_FIELDS):
            if key not in first or key not in second:
                notes.append(f"step {first['step']}: {key} only in the "
                             f"{'working' if key in second else 'reference'} run")
            elif not equal(first[key], second[key], key in close):
                failures.append(f"step {first['step']}: {key} {first[key]!r} against {second[key]!r}")
            elif first[key] != second[key]:  # close, not equal
                change = abs(first[key] - second[key]) / max(abs(first[key]), 1e-30)
                moved[key] = max(moved.get(key, 0.0), change)
    summaries = [json.loads((Path(folder) / "summary.json").read_text())
                 for folder in (reference, working)]
    for key in SUMMARY_FIELDS:
        if not equal(summaries[0].get(key), summaries[1].get(key),
                     key == "final_loss" and "loss" in close):
            failures.append(f"summary.json: {key} differs")
    notes += [f"{key} moved by at most {change:.1e} relative (--close)"
              for key, change in moved.items()]
    return failures, sorted(set(notes))


def run_defaults(source, out, scripts):
    """Each script's toy defaults, run from the folder `source`, into out/<script>."""
    for script in scripts:
        print(f"{source}: python {script}.py", flush=True)
        with open(out / f"{script}.log", "w") as log:
            subprocess.run([sys.executable, f"{script}.py", "--out", str(out / script),
                            "--overwrite"], cwd=source, stdout=log, stderr=subprocess.STDOUT,
                           check=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("commit", nargs="?", help="the reference commit (a git revision)")
    parser.add_argument("--scripts", nargs="+", choices=SCRIPTS, default=list(SCRIPTS))
    parser.add_argument("--runs", nargs=2, metavar=("REFERENCE", "WORKING"),
                        help="compare two finished run folders instead of running anything")
    parser.add_argument("--out", default=str(REPO / "out" / "same_results"))
    parser.add_argument("--close", nargs="+", default=[], metavar="FIELD",
                        help=f"fields compared to {CLOSE_TOLERANCE} relative, not bit for bit")
    args = parser.parse_args(argv)
    if args.runs:
        pairs = [tuple(args.runs)]
    elif args.commit:
        out = Path(args.out).resolve()
        pairs = []
        with tempfile.TemporaryDirectory() as worktree:
            subprocess.run(["git", "worktree", "add", "--detach", worktree, args.commit], cwd=REPO,
                           check=True, capture_output=True)
            try:
                for side, source in (("reference", Path(worktree)), ("working", REPO)):
                    shutil.rmtree(out / side, ignore_errors=True)
                    (out / side).mkdir(parents=True)
                    run_defaults(source, out / side, args.scripts)
            finally:
                subprocess.run(["git", "worktree", "remove", "--force", worktree], cwd=REPO,
                               check=True, capture_output=True)
        pairs = [(out / "reference" / script, out / "working" / script) for script in args.scripts]
    else:
        parser.error("give a reference commit, or --runs REFERENCE WORKING")
    failed = False
    for reference, working in pairs:
        failures, notes = differences(reference, working, set(args.close))
        print(f"{working} against {reference}: "
              f"{'the same' if not failures else f'{len(failures)} differences'}")
        for line in failures[:20] + [f"note: {note}" for note in notes]:
            print(f"  {line}")
        failed |= bool(failures)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
