"""Where a single tracked default run's wall time goes: the README's main command, timed phase by
phase from its own log lines, median of `--repeats` runs one after another.

    uv run python -m benchmarks.default_run --data-dir /path/to/ml-100k [--repeats 3] [overrides...]

Each run is `uv run python -m src.train agent=linucb data.dir=<dir>`, the policy and its servable
model saved (the defaults), into one SQLite store as a user's runs go: a first run, which makes
the store (MLflow creates its tables by running its 67 schema migrations, 1.5 s), is reported
apart, then `--repeats` timed. Phases: start-up (uv, Python, Hydra's
composition and the config checks, to "Loading TensorFlow"), imports (to "Reading MovieLens"),
set-up (data, environment, the MLflow run), training (the run's own "Done in" span: tracing and
every loop), finishing (tables, plot, policy, servable model), exit (the process's end after
its last line). Target (issue: many runs): training at least 60% of the wall time.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np

from src.paths import PROJECT_ROOT

# The log line that ends each phase; the phases between are named after what happens in them.
MARKS = {"start-up": "Loading TensorFlow", "imports": "Reading MovieLens", "set-up": "Training ",
         "training": "Done in", "finishing": " finished: run "}
STAMP = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]")


def timed_run(data_dir: Path, store: Path, overrides: list[str]) -> dict[str, float]:
    """Seconds spent in each phase of one run tracked in the SQLite `store`, and the training span
    the run reports."""
    command = ["uv", "run", "python", "-m", "src.train", "agent=linucb", f"data.dir={data_dir}",
               f"tracking.uri=sqlite:///{store}", f"hydra.run.dir={store.parent}/outputs", *overrides]
    started = time.time()
    result = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True)
    ended = time.time()
    if result.returncode:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        sys.exit(f"the run failed ({result.returncode}): {last}")
    marks, previous = {}, started
    for phase, text in MARKS.items():
        line = next(line for line in result.stderr.splitlines() if text in line)
        at = datetime.strptime(STAMP.match(line).group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        marks[phase], previous = at - previous, at
    marks["exit"] = ended - previous
    reported = float(re.search(r"Done in ([\d.]+) s", result.stderr).group(1))
    return {**marks, "wall": ended - started, "reported training": reported}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True, help="MovieLens 100K directory")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="more overrides for every run, e.g. training=quick")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        store = Path(scratch) / "mlflow.db"
        first = timed_run(args.data_dir.resolve(), store, args.overrides)
        print(f"first run, into a new store: {first['wall']:.1f} s", file=sys.stderr)
        runs = []
        for repeat in range(args.repeats):
            runs.append(timed_run(args.data_dir.resolve(), store, args.overrides))
            print(f"run {repeat + 1} of {args.repeats}: {runs[-1]['wall']:.1f} s", file=sys.stderr)
    median = {phase: float(np.median([run[phase] for run in runs])) for phase in runs[0]}
    print(f"\nA tracked default run into an existing store, median of {args.repeats}: seconds per phase and "
          f"share of the wall time\n")
    for phase, seconds in median.items():
        print(f"{phase:>20} {seconds:6.2f} s {seconds / median['wall']:6.1%}")
    outside = 1 - median["training"] / median["wall"]
    print(f"\noutside training: {outside:.1%} of the wall time (target: at most 40%)")
    print(f"The first run into a new store (MLflow makes its tables): imports {first['imports']:.2f} s, "
          f"wall {first['wall']:.2f} s, {1 - first['training'] / first['wall']:.1%} outside training.")
    print("The table above is the result (nothing is written); rerun to reproduce.")


if __name__ == "__main__":
    main()
