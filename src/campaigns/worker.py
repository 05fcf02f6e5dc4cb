"""A campaign's worker: it takes trials from the study until the study holds its `n_trials`
COMPLETE ones (counting those running on other workers), trains each as a child run of the
study's parent run, and summarises the study if it ends the last trial."""

from __future__ import annotations

import copy
import functools
import logging
import os
import socket
import time
import warnings
import zlib

import mlflow
import numpy as np
import optuna
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from src import config, tracking
from src.campaigns.repair import RetryDeadWorkersTrial
from src.campaigns.storage import POLL_SECONDS, StorageLost, in_chain
from src.campaigns.study import (GRID_ATTR, failed_for_good, is_grid, load_study, prepare, search_space,
                                 split_overrides, target)
from src.campaigns.summary import shown_params, summarise_if_done
from src.campaigns.trials import COMPLETE, ERROR_ATTR, FAIL, PARENT_RUN_ATTR, PRUNED, RUN_ATTR, RUNNING, WAITING
from src.errors import UserError, one_line

log = logging.getLogger(__name__)
# Hydra's sampler config still sets TPE options Optuna 4 deprecated (at their defaults).
warnings.filterwarnings("ignore", message=r".*has been deprecated in v4\.", category=FutureWarning)


class TrackingServerLost(UserError):
    """The tracking server stopped answering mid-trial: the worker stops, as every trial
    would fail the same way; a worker started later ends the trial's run."""


class Pruned(tracking.RunStopped, optuna.TrialPruned):
    """The pruner stopped the trial: PRUNED in Optuna, KILLED and tagged in MLflow."""


def sampler_seed(base: int, worker: int, trials: int) -> int:
    """A seed of the worker's own: invocations of one sweep on several machines (or twice on one)
    number their workers alike and may find as many trials, and with one seed they would
    propose identical trials. The host and process make it theirs."""
    return int(np.random.SeedSequence([base, worker, trials, os.getpid(),
                                       zlib.crc32(socket.gethostname().encode())]).generate_state(1)[0])


def work(overrides: list[str], worker: int = 0) -> None:
    """Run trials of the study `overrides` configure until it holds its `n_trials` COMPLETE
    trials (or too many have failed); then summarise it if no other worker is still busy."""
    fixed, _ = split_overrides(overrides)
    cfg = config.compose(fixed, with_hydra=True)
    tracking.be_patient(cfg.sweep.storage_patience_s)
    study = prepare(cfg, overrides)
    seed = sampler_seed(cfg.hydra.sweeper.sampler.get("seed") or 0, worker, len(study.trials))
    sampler = None if is_grid(cfg) else instantiate(cfg.hydra.sweeper.sampler, seed=seed)
    study = load_study(cfg, sampler=sampler)
    space = search_space(cfg, overrides)
    trials = [fixed_override for fixed_override in fixed if not fixed_override.startswith("hydra.")]
    log.info("Worker %d: loading TensorFlow for its trials...", worker)
    from src import training  # noqa: F401  (here, where the line above says what the wait is)
    try:
        while run_next(cfg, study, space, trials):
            pass
    except (TrackingServerLost, StorageLost):
        raise  # nothing more can reach MLflow, or the study
    except BaseException:
        summarise_if_done(cfg, study, interrupted=True)
        raise
    summarise_if_done(cfg, study)


def as_ray_task(overrides: list[str], index: int) -> str:
    """`work` as a Ray task (src.campaigns.ray_cluster), on whichever node the cluster gives it;
    what it did."""
    # Ray passes a task's lines on to the driver's console: the worker's own (a trial's start and
    # end) and any warning, as multirun.sh shows from its local workers' logs.
    logging.basicConfig(level=logging.WARNING, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    log.setLevel(logging.INFO)
    work(overrides, worker=index)
    return f"worker {index} on {socket.gethostname()} (pid {os.getpid()}) found nothing left to do"


def run_next(cfg: DictConfig, study: optuna.Study, space: dict, overrides: list[str]) -> bool:
    """Run one trial, or wait while others run; False once there is nothing left to do."""
    goal = target(cfg, study)
    complete = len(study.get_trials(states=(COMPLETE,)))
    running = len(study.get_trials(states=(RUNNING,)))
    if complete >= goal:
        return False
    failed = failed_for_good(study)
    if failed >= cfg.sweep.max_failures:
        last = study.get_trials(states=(FAIL,))[-1]
        raise UserError(f"study '{study.study_name}' stopped: {failed} trials failed (sweep.max_failures="
                        f"{cfg.sweep.max_failures}); the last, trial {last.number}, because: "
                        f"{last.user_attrs.get(ERROR_ATTR, 'its worker died')}")
    if not complete:
        check_not_failing_alike(study)
    waiting = len(study.get_trials(states=(WAITING,)))
    if GRID_ATTR in study.user_attrs and not waiting and not running:
        return False  # every grid point has run; failed ones are reported, not replaced
    if (complete + running >= goal or GRID_ATTR in study.user_attrs) and not waiting:
        time.sleep(POLL_SECONDS)  # the last trials run elsewhere; take over if their worker dies
        optuna.storages.fail_stale_trials(study)
        return True
    try:
        # Optuna fails the trial (and records why) before re-raising.
        study.optimize(lambda trial: objective(cfg, trial, space, overrides, goal), n_trials=1,
                       callbacks=[functools.partial(announce, cfg.objective)])
    except TrackingServerLost:
        raise
    except Exception as error:
        # Optuna's own bookkeeping may fail on the lost storage too, hiding the cause.
        lost = in_chain(error, StorageLost)
        if lost is not None:
            raise lost from None
        # A failed trial counts towards sweep.max_failures; others replace it.
    return True


def check_not_failing_alike(study: optuna.Study) -> None:
    """Stop a study none of whose trials has completed once two fail for the same reason: a
    config error fails every trial alike, and sweep.max_failures more would say nothing new."""
    reasons = [trial.user_attrs.get(ERROR_ATTR) for trial in study.get_trials(states=(FAIL,))[-2:]]
    if len(reasons) == 2 and reasons[0] is not None and reasons[0] == reasons[1]:
        raise UserError(f"study '{study.study_name}' stopped: its trials fail alike and none has completed: "
                        f"{reasons[0]}")


def announce(objective_name: str, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """One line per trial that ends COMPLETE or PRUNED, which multirun.sh passes on to its console
    (Optuna's own line says why a trial failed)."""
    if trial.state == COMPLETE:
        log.info("Trial %d finished: %s = %.6g (run %s)", trial.number, objective_name, trial.value,
                 trial.user_attrs.get(RUN_ATTR))
    elif trial.state == PRUNED and not trial.user_attrs.get("surplus"):
        log.info("Trial %d pruned", trial.number)


def objective(cfg: DictConfig, trial: optuna.Trial, space: dict, overrides: list[str], goal: int) -> float:
    """Train the trial's configuration; its MLflow run is a child of the study's parent run."""
    from src.training import train  # TensorFlow loads where trials run, not to prepare or summarise

    study = trial.study
    trials = study.get_trials(deepcopy=False)
    if sum(t.number < trial.number and t.state in (COMPLETE, RUNNING) for t in trials) >= goal:
        # Another worker took the last place a moment before this one.
        trial.set_user_attr("surplus", True)
        raise optuna.TrialPruned(f"surplus: the study already has its {goal} trials")
    try:
        values = suggest(trial, space)
        trial_cfg = trial_config(overrides, values)
        tags = {"sweep.study": study.study_name, "sweep.trial": str(trial.number),
                "mlflow.parentRunId": study.user_attrs[PARENT_RUN_ATTR]}
        retry_of = RetryDeadWorkersTrial.retried_trial_number(next(t for t in trials if t.number == trial.number))
        if retry_of is not None:
            tags["sweep.retry_of"] = str(retry_of)
        log.info("Trial %d started: %s", trial.number, shown_params(values))
        final, run_id = train(trial_cfg, tags, pruning_reporter(trial, cfg.objective) if cfg.sweep.pruner else None)
    except StorageLost:
        raise
    except Exception as error:
        if tracking.is_unreachable(error):
            lost = TrackingServerLost(
                f"the MLflow tracking server at {mlflow.get_tracking_uri()} stopped answering during trial "
                f"{trial.number} for {cfg.sweep.storage_patience_s:.0f} s ({tracking.why_unreachable(error)}); the "
                f"trial failed, and a worker started when the server is back ends its run")
            trial.set_user_attr(ERROR_ATTR, str(lost))
            raise lost from None
        trial.set_user_attr(ERROR_ATTR, one_line(error))
        raise
    trial.set_user_attr(RUN_ATTR, run_id)
    return final[trial_cfg.objective]


def suggest(trial: optuna.Trial, space: dict) -> dict:
    """The trial's value for every dimension (an enqueued or retried trial's are fixed)."""
    values = {}
    for name, distribution in space.items():
        if isinstance(distribution, optuna.distributions.CategoricalDistribution):
            values[name] = trial.suggest_categorical(name, distribution.choices)
        elif isinstance(distribution, optuna.distributions.IntDistribution):
            values[name] = trial.suggest_int(name, distribution.low, distribution.high, step=distribution.step,
                                             log=distribution.log)
        else:
            values[name] = trial.suggest_float(name, distribution.low, distribution.high, step=distribution.step,
                                               log=distribution.log)
    return values


def trial_config(overrides: list[str], values: dict) -> DictConfig:
    """The trial's config: the sweep's overrides and the trial's values, with light artifacts
    (the best trial gets its plot and policy at the end). Composed once per choice of config groups (a
    grid's agent), since Hydra's compose costs more than a quick trial may spend beyond training."""
    groups = tuple(f"{name}={value}" for name, value in values.items() if "." not in name)
    trial_cfg = copy.deepcopy(_composed((*overrides, *groups, "tracking.artifacts=light")))
    for name, value in values.items():
        if "." in name:
            OmegaConf.update(trial_cfg, name, value)
    return trial_cfg


@functools.lru_cache(maxsize=32)
def _composed(overrides: tuple[str, ...]) -> DictConfig:
    return config.compose(overrides)


def pruning_reporter(trial: optuna.Trial, objective_name: str):
    """Tells the trial's pruner each chunk's objective; stops the run when it says so."""

    def report(step: int, value: float, run_id: str) -> None:
        trial.report(value, step)
        if trial.should_prune():
            mlflow.MlflowClient().set_tag(run_id, "sweep.pruned", f"at {step} interactions")
            raise Pruned(f"pruned at {step} interactions ({objective_name} = {value:.4g})")

    return report


class QuietExpectedFailures(logging.Filter):
    """Optuna logs each failed trial with its traceback; for a user's error or a Ctrl-C, the
    one-line message says it all."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], (UserError, KeyboardInterrupt)):
            record.exc_info = None
        return True


logging.getLogger("optuna.study._optimize").addFilter(QuietExpectedFailures())  # where trials are logged
