"""Optuna sweeps and grids, every trial a tracked training run (see `src.campaigns`).

    uv run python -m src.sweep work hparams_search=linucb [overrides]   # one worker; start many
    uv run python -m src.sweep prepare hparams_search=linucb            # what multirun.sh calls first
    uv run python -m src.sweep summarise hparams_search=linucb          # exit 0 once the study is complete
    uv run python -m src.sweep ray 127.0.0.1:6379 4 hparams_search=linucb   # 4 workers as Ray tasks

`multirun.sh` starts N workers on one machine, or with `--ray` as tasks on a Ray cluster
(src.campaigns.ray_cluster); a worker started by hand on another machine,
with the same overrides and `hydra.sweeper.storage` (or `$OPTUNA_STORAGE`) pointing at the
shared database, joins the same study under the same MLflow parent run.

A single-process `python -m src.train -m hparams_search=...` runs the trials through Hydra's
Optuna sweeper instead; `SweepTracking` prepares and summarises its study the same way.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from src.campaigns import study, summary, worker
from src.campaigns.trials import COMPLETE
from src.cli import exit_on_user_error, stop_on_termination_signals
from src.errors import UserError

log = logging.getLogger(__name__)

# Where `prepare` writes the study's name for multirun.sh.
STATE_FILE = "SWEEP_STATE_FILE"

USAGE = ("usage: python -m src.sweep {prepare|work|summarise} hparams_search=NAME [overrides...]\n"
         "       python -m src.sweep ray ADDRESS WORKERS hparams_search=NAME [overrides...]")
LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"


class SweepTracking(Callback):
    """Prepares and summarises the study around a single-process `python -m src.train -m` sweep."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        with exit_on_user_error():
            if config.sweep.batch != 1:
                raise UserError(f"sweep.batch={config.sweep.batch} batches the trials of ./multirun.sh's workers; "
                                "python -m src.train -m runs one trial at a time (sweep.batch=1)")
            study.prepare(config)
        # Hydra skips on_multirun_end when the sweep raises (every trial failed, Ctrl-C);
        # the parent run must still end, as FAILED.
        atexit.register(self._end_abandoned, config)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        atexit.unregister(self._end_abandoned)
        with exit_on_user_error():
            summary.summarise(config)

    @staticmethod
    def _end_abandoned(config: DictConfig) -> None:
        summary.summarise(config, failed=True)


def work_on_ray(address: str, workers: str, overrides: list[str]) -> None:
    """Run `workers` campaign workers as tasks of the Ray cluster at `address`; one fails alone."""
    from src.campaigns import ray_cluster

    if not workers.isdigit() or int(workers) < 1:
        raise UserError(f"ray: WORKERS must be a positive integer, got '{workers}'")
    outcomes = ray_cluster.run_tasks(address, worker.as_ray_task, [(overrides, index) for index in range(int(workers))],
                                     describe=lambda args: f"worker {args[1]}")
    for index, (done, error) in enumerate(outcomes):
        log.info(done or f"worker {index} stopped: {error}")


def main(argv: list[str]) -> None:
    if {"-h", "--help"} & set(argv):  # after a subcommand too: they share one usage
        print(f"{USAGE}\n{__doc__}")
        sys.exit(0)
    if (not argv or argv[0] not in ("prepare", "work", "summarise", "ray", "check-ray")
            or len(argv) < {"ray": 3, "check-ray": 2}.get(argv[0], 1)):
        print(USAGE, file=sys.stderr)
        sys.exit(2)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    command, overrides = argv[0], argv[1:]
    if command == "check-ray":  # multirun.sh --ray, before the study and its parent run are made
        from src.campaigns import ray_cluster

        with exit_on_user_error():
            ray_cluster.check_address(overrides[0])
        return
    if command == "ray":
        (address, workers), overrides = overrides[:2], overrides[2:]
    with exit_on_user_error():
        cfg = study.compose_sweep(overrides)
        if "study_name" not in cfg.hydra.sweeper:
            raise UserError("no sweep configured: pass hparams_search=NAME")
        if command == "prepare":
            prepared = study.prepare(cfg, overrides)
            # The study's name for multirun.sh, in a file of its own: what this process prints
            # (MLflow's lines among it) is never read as shell code.
            if os.environ.get(STATE_FILE):
                Path(os.environ[STATE_FILE]).write_text(prepared.study_name + "\n")
        elif command == "work":
            stop_on_termination_signals()
            worker.work(overrides, worker=int(os.environ.get("SWEEP_WORKER", "0")))
        elif command == "ray":
            stop_on_termination_signals()
            work_on_ray(address, workers, overrides)
        else:
            summarised = study.load_study(cfg)
            best = summary.summarise_if_done(cfg, summarised)
            if best is not None:
                print(f"best {cfg.objective}={best.value:.6g} trial={best.number} {summary.shown_params(best.params)}")
            complete = len(summarised.get_trials(deepcopy=False, states=(COMPLETE,)))
            if complete < study.target(cfg, summarised):
                raise UserError(f"study '{summarised.study_name}' holds {complete} of its "
                                f"{study.target(cfg, summarised)} trials complete")


if __name__ == "__main__":
    main(sys.argv[1:])
