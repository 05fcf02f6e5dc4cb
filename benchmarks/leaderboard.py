"""The leaderboard: every entry of conf/leaderboard.yaml trained with 10 seeds at TF-Agents'
example size on both environments, into one MLflow experiment, then ranked by final regret.

    uv run python -m benchmarks.leaderboard --data-dir /path/to/ml-100k
    uv run python -m benchmarks.leaderboard --data-dir /path/to/ml-100k --seeds 2 --loops 500 --out /tmp/lb
    uv run python -m benchmarks.leaderboard --tables-only   # rebuild the tables from the tracked runs
    uv run python -m benchmarks.leaderboard --lineup conf/lineups/environments.yaml --data-dir /path/to/ml-100k
    uv run python -m benchmarks.leaderboard --data-dir /path/to/ml-100k --ray 127.0.0.1:6379   # on a Ray cluster

Each run is `src.training.train` on the config `python -m src.train agent=<agent> env=<env>
training.seed=<seed>` would compose, with the line-up's overrides, tagged `leaderboard.entry`
with its row's label, `--workers` runs at a time (default 2, in processes of their own); an
entry's seeds train as one replica group where replicas share a compiled loop (src.replicas:
LinUCB and LinTS without drift, arrivals or delay), each still a run of its own. A run of the
same entry and configuration (seed included; where it is stored aside) that already FINISHED in
the experiment is not trained again: an interrupted leaderboard resumes. The tables take exactly the runs of the line-up the command describes,
so a cheap run (`--loops 500`) and the full one may share an experiment.

Then (src/leaderboard.py), per environment, one row per entry: the final cumulative regret, mean over seeds with
the 95% Student t-interval of the mean (src.comparison's alignment and statistics), the mean of
the runs' `train/interactions_per_s`, and the seeds; a figure of the regret curves in their
bands (src.plots); each entry's hyperparameters against its agent's defaults; the package
versions the runs were trained with, the command and its wall time. Written to `--out`
(leaderboard.md, regret_<env>.png, leaderboard.csv) and logged to a run tagged
`bandits.role=comparison` in the same experiment.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import mlflow
from omegaconf import DictConfig, OmegaConf

from src import comparison, config, tracking
from src.cli import exit_on_user_error, stop_on_termination_signals, writable_folder
from src.errors import UserError, require
from src.leaderboard import (LINEUP, LOG_FORMAT, POOL_TAG, Identity, Job, end_runs_left_running, failed_runs,
                             identities, in_groups, jobs, markdown, members, pool_runs, standings, train_in_processes,
                             train_job, write)

log = logging.getLogger("benchmarks.leaderboard")

# Experiment tags: what trained the leaderboard's runs, so that --tables-only can say it too.
COMMAND_TAG = "leaderboard.command"
WALL_TAG = "leaderboard.wall_time"
RAY_TASK_LOST = "its Ray task's worker or node died (or the board was stopped)"


def finished(experiment_id: str) -> set[Identity]:
    """The identities of the leaderboard runs already FINISHED in the experiment."""
    runs = mlflow.search_runs([experiment_id], filter_string="attributes.status = 'FINISHED'")
    return set(identities(runs).dropna())


def train_all(todo: list[Job], workers: int, experiment_id: str, ray_address: str | None = None) -> int:
    """Train `todo`, `workers` jobs (runs, or replica groups) at a time, each in a process of its
    own, or with `ray_address` as tasks of that Ray cluster, one CPU each; return how many runs
    failed (a diverged agent fails alone, a job whose worker is killed alone: src.leaderboard's
    train_in_processes). A job takes about one core (training.threads), so two workers on two
    cores take about half the wall time of one."""
    if not todo:
        return 0
    for job in todo:  # a wrong value fails now, not after an hour of training
        config.check_run(job.cfg)
    runs = len(todo)
    # The replica groups first: the longest jobs, so that the last to finish are single runs and
    # a worker that runs out of work waits seconds, not a group's minute, for the other.
    todo = sorted(in_groups(todo), key=lambda job: -job.cfg.training.replicas)
    progress = Progress(runs)
    if ray_address:
        from src.campaigns import ray_cluster

        # A task whose node died runs again elsewhere, as new runs: those of its first try were
        # left RUNNING, and end FAILED once the job is done, found by the board's tag.
        board = {POOL_TAG: uuid.uuid4().hex}

        def done(index: int, outcome, lost: str | None) -> None:
            job = todo[index]
            runs_of_job = [run for run in pool_runs(experiment_id, board) if run[0] in set(members(job))]
            left_running = end_runs_left_running(runs_of_job, RAY_TASK_LOST)
            if left_running:
                log.warning("%s: %d runs of a try whose node died ended FAILED", job, left_running)
            progress.add(job, *(outcome or (None, lost)))  # a task lost beyond Ray's retries has no outcome

        try:
            ray_cluster.run_tasks(ray_address, train_job, [(job, 1, board) for job in todo],
                                  describe=lambda args: str(args[0]), on_done=done)
        finally:  # stopped: the runs of the tasks cancelled on the cluster
            end_runs_left_running(pool_runs(experiment_id, board), RAY_TASK_LOST)
        return progress.failed
    train_in_processes(todo, workers, experiment_id, progress.add)
    return progress.failed


class Progress:
    """The runs done and failed so far, each job's outcome said as it comes."""

    def __init__(self, runs: int):
        self.runs, self.done, self.failed = runs, 0, 0
        self.started = time.perf_counter()

    def add(self, job: Job, finals: list[float | None] | None, error: str | None) -> None:
        self.done += job.cfg.training.replicas
        failed = failed_runs(job, finals)
        self.failed += failed
        if error:
            log.warning("Runs up to %d of %d (%s): %d failed, the others go on: %s", self.done, self.runs, job,
                        failed, error)
        if finals is not None:
            elapsed = time.perf_counter() - self.started
            log.info("Runs up to %d of %d done: %s, cumulative regret %s; about %.0f min left", self.done, self.runs,
                     job, ", ".join("failed" if final is None else f"{final:.1f}" for final in finals),
                     elapsed / self.done * (self.runs - self.done) / 60)


def duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes} min {seconds} s" if minutes else f"{seconds} s"


def parser(lineup: DictConfig) -> argparse.ArgumentParser:
    names = argparse.ArgumentParser(prog="python -m benchmarks.leaderboard", description=__doc__,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
    names.add_argument("--lineup", type=Path, default=LINEUP,
                       help="the line-up: entries, environments, seeds (default: conf/leaderboard.yaml)")
    names.add_argument("--data-dir", help="a local ml-100k directory (default: download into data/ on first use)")
    names.add_argument("--seeds", type=int, default=lineup.seeds, help="seeds 0..N-1 per entry (default: %(default)s)")
    names.add_argument("--loops", type=int, help="training loops per run (default: conf/training/default.yaml)")
    names.add_argument("--agents", type=lambda text: text.split(","), help="comma-separated agents to keep")
    names.add_argument("--envs", type=lambda text: text.split(","), help="comma-separated environments to keep")
    names.add_argument("--experiment", default=lineup.experiment, help="MLflow experiment (default: %(default)s)")
    names.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, "
                                              "else sqlite:///mlflow.db at the project root)")
    names.add_argument("--workers", type=int, default=lineup.workers,
                       help="runs trained at a time, each in its own process (default: %(default)s)")
    names.add_argument("--out", type=Path, default=Path(lineup.get("out", "docs/leaderboard")), help="default: %(default)s")
    names.add_argument("--tables-only", action="store_true", help="rebuild the outputs from the runs already tracked")
    names.add_argument("--ray", metavar="ADDRESS", help="train the runs as tasks of the Ray cluster at ADDRESS "
                       "(host:port; ./ray_cluster.sh), one CPU each, instead of --workers processes here")
    names.add_argument("overrides", nargs="*", help="more config overrides for every run, e.g. env.rank_k=10")
    return names


def read_lineup(argv: list[str] | None) -> DictConfig:
    """The line-up `--lineup` names (default conf/leaderboard.yaml), which sets the other options' defaults."""
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--lineup", type=Path, default=LINEUP)
    path = first.parse_known_args(argv)[0].lineup
    with exit_on_user_error():
        if not path.is_file():
            raise UserError(f"--lineup {path}: no such file")
        return OmegaConf.load(path)


def main(argv: list[str] | None = None) -> None:
    started = time.perf_counter()
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    lineup = read_lineup(argv)
    args = parser(lineup).parse_args(argv)
    command = shlex.join(["uv", "run", "python", "-m", "benchmarks.leaderboard",
                          *(sys.argv[1:] if argv is None else argv)])
    with exit_on_user_error():
        require(args.seeds >= 1, "--seeds", args.seeds, "an integer >= 1")
        require(args.loops is None or args.loops >= 1, "--loops", args.loops, "an integer >= 1")
        require(args.workers >= 1, "--workers", args.workers, "an integer >= 1")
        # Before any training: a board that cannot be written, or data that is not there, was found
        # only after every run had trained, or every worker had started.
        require(args.data_dir is None or Path(args.data_dir).is_dir(), "--data-dir", args.data_dir,
                "a folder holding MovieLens 100K")
        writable_folder(args.out, "--out")
        if args.ray:
            from src.campaigns import ray_cluster

            ray_cluster.check_address(args.ray)  # before any run or experiment is made
        overrides = [*([f"data.dir={args.data_dir}"] if args.data_dir else []),
                     *([f"training.loops={args.loops}"] if args.loops else []),
                     *([f"tracking.uri={args.tracking_uri}"] if args.tracking_uri else []),
                     f"tracking.experiment={args.experiment}", *args.overrides]
        planned = jobs(lineup, args.agents, args.envs, args.seeds, overrides)
        if args.tables_only:
            experiment_id = comparison.open_experiment(args.tracking_uri, args.experiment)
            report = standings(experiment_id, {job.identity() for job in planned})
            tags = mlflow.get_experiment(experiment_id).tags
            trained_by = tags.get(COMMAND_TAG, "runs tracked in this experiment")
            wall = tags.get(WALL_TAG, "wall time unknown")
        else:
            experiment_id = tracking.connect(args.tracking_uri, args.experiment)
            done = finished(experiment_id)
            todo = [job for job in planned if job.identity() not in done]
            log.info("%d runs in the line-up, %d already finished in experiment '%s'; training %d",
                     len(planned), len(planned) - len(todo), args.experiment, len(todo))
            failures = train_all(todo, args.workers, experiment_id, args.ray)
            report = standings(experiment_id, {job.identity() for job in planned})
            seconds = time.perf_counter() - started
            trained_by = command
            placed = f"on the Ray cluster at {args.ray}" if args.ray else \
                f"on {os.cpu_count()} CPU cores, {args.workers} runs at a time"
            wall = (f"wall time {duration(seconds)} {placed}, "
                    f"{datetime.now(timezone.utc):%Y-%m-%d}, for {len(todo)} runs trained ({failures} failed) "
                    f"beside {len(planned) - len(todo)} already tracked, and the tables")
            client = mlflow.MlflowClient()
            client.set_experiment_tag(experiment_id, COMMAND_TAG, command)
            client.set_experiment_tag(experiment_id, WALL_TAG, wall)
        title = lineup.get("title", "Leaderboard")
        write(report, args.out, trained_by, wall, title)
        comparison.log_comparison(experiment_id, args.out, {"leaderboard": trained_by, "runs": int(report.table["n"].sum())})
    print(markdown(report.table, trained_by, wall, title))


if __name__ == "__main__":
    stop_on_termination_signals()
    main()
