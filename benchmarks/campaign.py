"""What a campaign costs beyond training, what pruning saves, and what a second worker buys.

    uv run python -m benchmarks.campaign --data-dir /path/to/ml-100k --out campaign.json
    uv run python -m benchmarks.campaign --only overhead,pruning      # skip the slow grid and batch

Three measurements, each against a baseline measured in the same run:
  overhead  a 20-trial quick LinUCB sweep in one worker: wall time against the sum of its
            trials' `train/seconds`, per trial; and the fixed cost of a job alone: each
            trial's duration in Optuna less its training (no worker start-up, study summary)
  pruning   a 30-trial quick LinUCB sweep with `sweep.pruner=median` against the same sweep
            without: wall time and best value
  grid      `./multirun.sh grid` (10 agents x 3 seeds, quick) on 2 workers against 1 worker
  grid_batch  the grid on 2 workers with `sweep.batch=3` (an agent's seeds together) against 1
  batch     `./multirun.sh linucb --workers 2 --trials 48` (quick) with `sweep.batch=8` against
            the same sweep a trial at a time: wall time and best value
Tracking goes to a temporary SQLite store and study unless `--tracking-uri`/`--storage` name
others (e.g. the stack's: eval "$(./stack.sh up)" exports both).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import mlflow
import optuna

from src.campaigns import worker
from src.paths import PROJECT_ROOT

log = logging.getLogger("benchmarks.campaign")

QUICK = ["training=quick"]


def sweep(name: str, trials: int, data: list[str], storage: str, tracking_uri: str, *extra: str) -> dict:
    """Run a LinUCB sweep in this process; its wall time, trials' training time and best value."""
    study = f"{name}-{uuid.uuid4().hex[:6]}"
    overrides = ["hparams_search=linucb", f"hydra.sweeper.study_name={study}", f"hydra.sweeper.n_trials={trials}",
                 f"hydra.sweeper.storage={storage}", f"tracking.uri={tracking_uri}",
                 f"tracking.experiment=bench-{study}", *QUICK, *data, *extra]
    started = time.perf_counter()
    worker.work(overrides)
    wall = time.perf_counter() - started
    client = mlflow.MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(f"bench-{study}")
    trained = {int(run.data.tags["sweep.trial"]): run.data.metrics["train/seconds"]
               for run in client.search_runs([experiment.experiment_id]) if "train/seconds" in run.data.metrics}
    result = optuna.load_study(study_name=study, storage=storage)
    states = [trial.state.name for trial in result.trials]
    job_costs = [(trial.datetime_complete - trial.datetime_start).total_seconds() - trained[trial.number]
                 for trial in result.trials if trial.number in trained and trial.datetime_complete]
    return {"study": study, "wall_s": wall, "train_s": sum(trained.values()),
            "job_cost_s": statistics.median(job_costs) if job_costs else None,
            "trials": len(states), "complete": states.count("COMPLETE"), "pruned": states.count("PRUNED"),
            "best": result.best_value}


def grid(workers: int, data: list[str], storage: str, tracking_uri: str, batch: int = 1) -> float:
    """Wall time of `./multirun.sh grid` (10 agents x 3 seeds, quick) on `workers` workers."""
    study = f"grid-{workers}w-b{batch}-{uuid.uuid4().hex[:6]}"
    started = time.perf_counter()
    subprocess.run([str(PROJECT_ROOT / "multirun.sh"), "grid", "--workers", str(workers), "--storage", storage,
                    f"hydra.sweeper.study_name={study}", f"tracking.uri={tracking_uri}",
                    f"tracking.experiment=bench-{study}", f"sweep.batch={batch}", *QUICK, *data],
                   cwd=PROJECT_ROOT, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def multirun_sweep(batch: int, data: list[str], storage: str, tracking_uri: str) -> dict:
    """Wall time and best value of `./multirun.sh linucb --workers 2 --trials 48` (quick) with `sweep.batch`."""
    study = f"batch{batch}-{uuid.uuid4().hex[:6]}"
    started = time.perf_counter()
    subprocess.run([str(PROJECT_ROOT / "multirun.sh"), "linucb", "--workers", "2", "--trials", "48", "--storage",
                    storage, f"hydra.sweeper.study_name={study}", f"tracking.uri={tracking_uri}",
                    f"tracking.experiment=bench-{study}", f"sweep.batch={batch}", *QUICK, *data],
                   cwd=PROJECT_ROOT, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    result = optuna.load_study(study_name=study, storage=storage)
    return {"study": study, "wall_s": wall, "best": result.best_value,
            "complete": sum(trial.state.name == "COMPLETE" for trial in result.trials)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, help="MovieLens 100K directory; data=synthetic when omitted")
    parser.add_argument("--storage", help="Optuna storage URL (default: a temporary SQLite file)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: a temporary SQLite store)")
    parser.add_argument("--only", default="overhead,pruning,grid,grid_batch,batch", help="comma-separated measurements")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    wanted = set(args.only.split(","))
    data = [f"data.dir={args.data_dir.resolve()}"] if args.data_dir else ["data=synthetic"]
    figures = {}
    with tempfile.TemporaryDirectory() as scratch:
        storage = args.storage or f"sqlite:///{scratch}/optuna.db"
        tracking_uri = args.tracking_uri or f"sqlite:///{scratch}/mlflow.db"
        if "overhead" in wanted:
            run = sweep("overhead", 20, data, storage, tracking_uri)
            run["overhead_per_trial_s"] = (run["wall_s"] - run["train_s"]) / run["trials"]
            figures["overhead"] = run
            log.info("20 trials: %.1f s wall, %.1f s training: %.2f s per trial beyond training, of which "
                     "%.2f s (median) per job and the rest the worker's start-up and the study's summary",
                     run["wall_s"], run["train_s"], run["overhead_per_trial_s"], run["job_cost_s"])
        if "pruning" in wanted:
            plain = sweep("unpruned", 30, data, storage, tracking_uri)
            pruned = sweep("pruned", 30, data, storage, tracking_uri, "sweep.pruner=median")
            figures["pruning"] = {"without": plain, "median": pruned,
                                  "wall_ratio": pruned["wall_s"] / plain["wall_s"]}
            log.info("30 trials: %.0f s without pruning (best %.1f), %.0f s with the median pruner (best %.1f, "
                     "%d pruned): %.2fx the wall time", plain["wall_s"], plain["best"], pruned["wall_s"],
                     pruned["best"], pruned["pruned"], pruned["wall_s"] / plain["wall_s"])
        if "grid" in wanted:
            one, two = grid(1, data, storage, tracking_uri), grid(2, data, storage, tracking_uri)
            figures["grid"] = {"one_worker_s": one, "two_workers_s": two, "speedup": one / two}
            log.info("10 agents x 3 seeds, quick: %.0f s on 1 worker, %.0f s on 2 (%.2fx)", one, two, one / two)
        if "grid_batch" in wanted:
            alone, batched = (grid(2, data, storage, tracking_uri, batch) for batch in (1, 3))
            figures["grid_batch"] = {"batch_1_s": alone, "batch_3_s": batched, "wall_ratio": batched / alone}
            log.info("10 agents x 3 seeds, quick, 2 workers: %.0f s a point at a time, %.0f s an agent's 3 seeds "
                     "at a time (%.2fx)", alone, batched, batched / alone)
        if "batch" in wanted:
            alone, batched = (multirun_sweep(batch, data, storage, tracking_uri) for batch in (1, 8))
            figures["batch"] = {"batch_1": alone, "batch_8": batched, "wall_ratio": batched["wall_s"] / alone["wall_s"]}
            log.info("48 quick LinUCB trials on 2 workers: %.0f s a trial at a time (best %.1f), %.0f s in batches "
                     "of 8 (best %.1f): %.2fx the wall time", alone["wall_s"], alone["best"], batched["wall_s"],
                     batched["best"], batched["wall_s"] / alone["wall_s"])
    figures["cpus"] = os.cpu_count()
    print(json.dumps(figures, indent=2))
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
