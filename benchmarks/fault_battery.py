"""The hostile battery by hand: bad input and faults through the real command line, one fresh
process each, counted as the fault-battery issue asks (inputs tried, clean errors, tracebacks,
runs left RUNNING, FAILED runs from config errors).

    uv run python -m benchmarks.fault_battery            # on generated data, ~10 s a case
    uv run python -m benchmarks.fault_battery --out faults.json

A clean error is a non-zero exit whose stderr has exactly one ERROR line and no traceback; a
valid input (VALID_INPUTS: what once crashed) is clean when it trains and exits 0.
The signals (Ctrl-C bursts, SIGTERM, SIGHUP), dead workers and lost servers are in the test
suite (tests/test_faults.py, test_train.py, campaigns/test_workers_on_services.py), which needs real
timing.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import mlflow

from src.paths import PROJECT_ROOT

HANG_S = 300  # a case's whole process, TensorFlow's start-up included, on a busy machine

BAD_INPUTS = [
    "agent=nope", "env=nope", "foo=1", "agent.alhpa=3", "training.loops=[1",
    "agent.alpha=inf", "agent.alpha=-inf", "agent.alpha=nan", "agent.alpha=1e308", "agent.alpha=-1",
    "agent.alpha=abc", "agent.tikhonov_weight=0", "env.rank_k=2.5", "env.rank_k=500", "env.num_movies=0",
    "env.num_movies=100000", "env.reward_rank=abc", "training.threads.intra_op=-1", "training.seed=4294967296",
    "training.seed=-1", "training.loops=0", "training.batch_size=1e308", "data=movielens data.sha256=null", "data=movielens ~data.sha256",
    "tracking.save_policy=maybe", "tracking.log_every=0", "tracking.artifacts=heavy", "objective=train/nothing",
    "agent=epsilon_greedy agent.learning_rate=inf", "agent=epsilon_greedy agent.layers=3",
    "agent=lints agent.alpha=0", "agent=dropout_ts agent.min_dropout_rate=2", "agent=epsilon_greedy agent.epsilon=1.5",
    "agent=epsilon_greedy agent.layers=[0]",
    "data=movielens data.dir=/nonexistent", "tracking.uri=http://127.0.0.1:9",
    # The second battery's (issue 28): sizes, threads, unknown keys, float32 zeros, folders, stores.
    "training.steps_per_loop=2147483647", "training.chunk_loops=2147483647", "training.threads.inter_op=100000",
    "training.loops=2000000000", "+agent.alpah=3", "+foo=1", "agent=epsilon_greedy agent.learning_rate=1e-300",
    "data=movielens data.dir=''", "hydra.run.dir=/proc/forbidden", "tracking.uri=sqlite:///{scratch}/not-a-db.db",
]
# Valid input that crashed or was refused before (issue 28): each must train and exit 0.
VALID_INPUTS = ["tracking.log_every=150", "tracking.log_every=15 training.chunk_loops=5",
                "hparams_search=linucb env=movielens_ratings", "hparams_search=lints env=movielens_ratings"]


def run_case(case: str, tracking_uri: str, scratch: Path, valid: bool = False) -> dict:
    """One fresh `src.train`; a hang is a case that has not ended after HANG_S."""
    args = ["data=synthetic", "training=quick", "training.loops=20", f"tracking.uri={tracking_uri}",
            *case.format(scratch=scratch).split()]
    try:
        done = subprocess.run([sys.executable, "-m", "src.train", *args], cwd=scratch, capture_output=True,
                              text=True, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}, timeout=HANG_S)
    except subprocess.TimeoutExpired:
        print(f"HANG  {case}", flush=True)
        return {"case": case, "exit": None, "clean": False, "traceback": False, "hang": True, "accepted": False}
    errors = [line for line in done.stderr.splitlines() if "[ERROR]" in line]
    clean = (done.returncode == 0) if valid else (done.returncode != 0 and len(errors) == 1)
    clean = clean and "Traceback" not in done.stderr
    print(f"{'clean' if clean else 'NOT CLEAN'}  exit {done.returncode}  {case}: "
          f"{errors[-1].split('] - ', 1)[-1] if errors else done.stderr.strip()[-300:]}", flush=True)
    return {"case": case, "exit": done.returncode, "clean": clean, "traceback": "Traceback" in done.stderr,
            "hang": False, "accepted": not valid and done.returncode == 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write the cases and counts as JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        tracking_uri = f"sqlite:///{Path(scratch) / 'mlflow.db'}"
        (Path(scratch) / "not-a-db.db").write_text("not a database\n" * 100)
        cases = [run_case(case, tracking_uri, Path(scratch)) for case in BAD_INPUTS]
        cases += [run_case(case, tracking_uri, Path(scratch), valid=True) for case in VALID_INPUTS]
        statuses = collections.Counter()
        if (Path(scratch) / "mlflow.db").exists():
            client = mlflow.MlflowClient(tracking_uri)
            experiments = [experiment.experiment_id for experiment in client.search_experiments()]
            statuses.update(run.info.status for run in client.search_runs(experiments))
    counts = {"inputs_tried": len(cases), "clean": sum(c["clean"] for c in cases),
              "tracebacks": sum(c["traceback"] for c in cases), "hangs": sum(c["hang"] for c in cases),
              "bad_values_accepted": sum(c["accepted"] for c in cases), "runs_left_running": statuses["RUNNING"],
              "failed_runs_from_config_errors": statuses["FAILED"], "runs_created": sum(statuses.values())}
    print(json.dumps(counts, indent=2))
    if args.out:
        args.out.write_text(json.dumps({"counts": counts, "cases": cases}, indent=2))


if __name__ == "__main__":
    main()
