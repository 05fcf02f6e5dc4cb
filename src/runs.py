"""Housekeeping of the tracking store: end the runs a dead process left RUNNING.

    uv run python -m src.runs reap --older-than 1h            # mark them FAILED
    uv run python -m src.runs reap --older-than 30m --dry-run # list them only

A run is stale when it is RUNNING and has shown no activity (start, metric, param or tag)
for longer than `--older-than`: a process killed with SIGKILL, out of memory or on a lost
machine cannot end its own run. Campaign workers end their dead peers' runs themselves
(`src.campaigns`); this command is for everything else.
"""

from __future__ import annotations

import argparse
import logging
import re
import time

import mlflow
from omegaconf import OmegaConf

from src import tracking
from src.cli import exit_on_user_error
from src.config import CONFIG_DIR
from src.errors import UserError

log = logging.getLogger(__name__)

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def seconds(text: str) -> float:
    """`90s`, `30m`, `1h`, `2d` in seconds."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", text.strip())
    if not match:
        raise UserError(f"--older-than must be a duration like 90s, 30m, 1h or 2d, got {text!r}")
    return float(match[1]) * UNITS[match[2]]


def last_activity_ms(client: mlflow.MlflowClient, run) -> int:
    """The latest of the run's start and its metrics' timestamps, in ms since the epoch."""
    latest = run.info.start_time or 0
    for key in run.data.metrics:
        history = client.get_metric_history(run.info.run_id, key)
        latest = max([latest, *(point.timestamp for point in history)])
    return latest


def stale_runs(experiment_ids: list[str], older_than_s: float) -> list:
    client = mlflow.MlflowClient()
    now_ms = time.time() * 1000
    running = client.search_runs(experiment_ids, filter_string="attributes.status = 'RUNNING'", max_results=5000)
    return [run for run in running if now_ms - last_activity_ms(client, run) > older_than_s * 1000]


def reap(experiment_ids: list[str], older_than_s: float, dry_run: bool = False) -> list:
    """Mark the stale runs FAILED (tagged with why); return them."""
    client = mlflow.MlflowClient()
    stale = stale_runs(experiment_ids, older_than_s)
    for run in stale:
        idle_min = (time.time() * 1000 - last_activity_ms(client, run)) / 60000
        log.info("%s run %s (%s): RUNNING, idle %.0f min", "Would end" if dry_run else "Ending",
                 run.info.run_id, run.info.run_name, idle_min)
        if not dry_run:
            tracking.fail_run(run.info.run_id, f"src.runs reap: no activity for {idle_min:.0f} min")
    log.info("%d stale run(s) %s", len(stale), "found" if dry_run else "marked FAILED")
    return stale


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    defaults = OmegaConf.load(CONFIG_DIR / "config.yaml").tracking
    parser = argparse.ArgumentParser(prog="python -m src.runs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    reaper = commands.add_parser("reap", help="mark runs a dead process left RUNNING as FAILED")
    reaper.add_argument("--older-than", default="1h", help="idle time that makes a RUNNING run stale (default: 1h)")
    reaper.add_argument("--experiment", default=defaults.experiment, help="MLflow experiment (default: %(default)s)")
    reaper.add_argument("--tracking-uri", default=defaults.uri,
                        help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db at the project root")
    reaper.add_argument("--dry-run", action="store_true", help="list the stale runs, change nothing")
    args = parser.parse_args(argv)
    with exit_on_user_error():
        idle = seconds(args.older_than)
        experiment_id = tracking.connect(args.tracking_uri, args.experiment, create=False)
        if experiment_id is None:
            raise UserError(f"no experiment '{args.experiment}' in {tracking.tracking_uri(args.tracking_uri)}")
        reap([experiment_id], idle, args.dry_run)


if __name__ == "__main__":
    main()
