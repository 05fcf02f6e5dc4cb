"""Train one bandit agent on MovieLens and track it in MLflow.

    uv run python -m src.train agent=linucb training=quick
    uv run python -m src.train -m agent=linucb,lints training.seed=0,1,2   # a Hydra multirun

Hydra composes `conf/`; `src.training.train` does the run. The Hydra entry point returns the
configured objective, which Hydra's Optuna sweeper reads in a single-process sweep.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
import numpy as np
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from src import config
from src.cli import exit_on_user_error, run_and_exit, stop_on_termination_signals, uncollected, writable_folder
from src.errors import UserError

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path=str(config.CONFIG_DIR), config_name="config")
def main(cfg: DictConfig) -> float:
    # Loaded here, after cli() has said so: TensorFlow, MLflow and Optuna take seconds.
    with uncollected():
        from src.campaigns import trials
        from src.replicas import train_group
        from src.training import train

    def run() -> float:
        if cfg.training.replicas > 1:
            if trials.trial_tags():
                raise UserError("training.replicas must be 1 in a campaign: a trial is one run (train the seeds of one configuration as a group with python -m src.train training.replicas=R)")
            finals = train_group(cfg)
            return float(np.mean([final[cfg.objective] for final, _ in finals]))  # over the seeds
        final, run_id = train(cfg, trials.trial_tags())
        trials.record_run(run_id)
        return final[cfg.objective]

    if HydraConfig.get().mode == RunMode.MULTIRUN:
        try:
            return run()  # a failed trial must fail alone; the sweeper records it and goes on
        except Exception as error:
            trials.record_error(error)
            raise
    with exit_on_user_error():
        return run()


def cli() -> None:
    """`python -m src.train [overrides]`: an unknown group option is one line, before Hydra
    would print a page about it; SIGTERM stops a run like Ctrl-C."""
    # Hydra replaces this logging set-up with its own once it starts the job.
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    with exit_on_user_error():
        for override in sys.argv[1:]:  # Hydra writes its logs there, and fails with a page if it cannot
            key, _, folder = override.partition("=")
            if key in ("hydra.run.dir", "hydra.sweep.dir"):
                writable_folder(Path(folder), key)
        single_run = config.check_command_line(sys.argv[1:])
        if single_run is not None:
            config.check_run(single_run)  # a typo costs a second, not TensorFlow's start-up
    log.info("Loading TensorFlow, MLflow and Optuna...")
    stop_on_termination_signals()
    # Hydra then hands us what ends a multirun, to say in one line rather than as its trace.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    with exit_on_user_error():
        try:
            main()
        except Exception as error:
            from src.campaigns import trials

            failed = trials.every_trial_failed()
            if failed is not None:
                raise UserError(f"every trial of the sweep failed; the last because: {failed}") from None
            if isinstance(error, hydra.errors.HydraException):  # a multirun's overrides, which Hydra composes
                raise UserError(config.composition_error(error)) from None
            raise


if __name__ == "__main__":
    run_and_exit(cli)
