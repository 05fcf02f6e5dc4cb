"""A campaign's worker: it takes trials from the study until the study holds its `n_trials`
COMPLETE ones (counting those running on other workers), trains each as a child run of the
study's parent run, and summarises the study if it ends the last trial."""

from __future__ import annotations

import contextlib
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
from optuna.storages._heartbeat import get_heartbeat_thread

from src import config, tracking
from src.campaigns.repair import RetryDeadWorkersTrial
from src.campaigns.storage import POLL_SECONDS, StorageLost, in_chain
from src.campaigns.study import (GRID_ATTR, failed_for_good, is_grid, load_study, most_pruned, prepare,
                                 search_space, split_overrides, target)
from src.campaigns.summary import shown_params, summarise_if_done
from src.campaigns.trials import COMPLETE, ERROR_ATTR, FAIL, PARENT_RUN_ATTR, PRUNED, RUN_ATTR, RUNNING, WAITING
from src.errors import UserError, one_line

log = logging.getLogger(__name__)
BATCH_ATTR = "batched_with"  # an enqueued trial's: the trial whose shape-changing values it shares
# Hydra's sampler config still sets TPE options Optuna 4 deprecated (at their defaults).
warnings.filterwarnings("ignore", message=r".*has been deprecated in v4\.", category=FutureWarning)
# Optuna warns that heartbeats are meant for `study.optimize`; a batch's trials beat as its do (run_batch).
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")


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


def work(overrides: list[str], worker: int = 0, cores: int | None = None) -> None:
    """Run trials of the study `overrides` configure until it holds its `n_trials` COMPLETE
    trials (or too many have failed); then summarise it if no other worker is still busy. A batch
    of trials (sweep.batch) trains on `cores` threads: by default this machine's cores shared among
    the workers multirun.sh started on it (SWEEP_WORKERS)."""
    cores = cores or config.cores_share(int(os.environ.get("SWEEP_WORKERS", "1")))
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
        while run_next(cfg, study, space, trials, cores):
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
    work(overrides, worker=index, cores=1)  # the task holds one CPU
    return f"worker {index} on {socket.gethostname()} (pid {os.getpid()}) found nothing left to do"


def run_next(cfg: DictConfig, study: optuna.Study, space: dict, overrides: list[str], cores: int) -> bool:
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
    pruned = sum(not trial.user_attrs.get("surplus") for trial in study.get_trials(states=(PRUNED,)))
    if pruned >= (most := most_pruned(cfg, goal)):
        raise UserError(f"study '{study.study_name}' stopped: {pruned} trials pruned (sweep.max_pruned={most}) and "
                        f"{complete} of {goal} COMPLETE: the pruner stops nearly every new trial; widen the search, "
                        f"or set sweep.pruner=null")
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
        if cfg.sweep.batch > 1:
            slots = waiting if GRID_ATTR in study.user_attrs else max(goal - complete - running, 1)
            run_batch(cfg, study, space, overrides, goal, min(cfg.sweep.batch, slots), cores)
        else:
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

    if surplus(trial.study, trial, goal):
        raise optuna.TrialPruned(f"surplus: the study already has its {goal} trials")
    try:
        values = suggest(trial, space)
        trial_cfg = trial_config(overrides, values)
        log.info("Trial %d started: %s", trial.number, shown_params(values))
        reporter = pruning_reporter(trial, cfg.objective) if cfg.sweep.pruner else None
        final, run_id = train(trial_cfg, trial_tags(trial.study, trial), reporter)
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


# Values the trials of a batch may hold apart and still share one compiled loop (src.replicas).
PER_REPLICA_DIMENSIONS = ("training.seed", *(f"agent.{name}" for name in config.PER_REPLICA_HYPERPARAMETERS))


def run_batch(cfg: DictConfig, study: optuna.Study, space: dict, overrides: list[str], goal: int, size: int,
              cores: int) -> None:
    """Ask for `size` trials and train them together (src.replicas.train_members), each its own
    run, reported to its pruner and told to Optuna on its own; a trial whose config is refused
    fails alone. Ask-and-tell does what `study.optimize` does for one trial: stale trials failed
    first, a heartbeat per trial while it runs, every trial left untold FAIL if the batch dies."""
    from src.replicas import train_members

    optuna.storages.fail_stale_trials(study)
    untold: dict[int, optuna.Trial] = {}
    with contextlib.ExitStack() as heartbeats:
        try:
            batch = ask_batch(cfg, study, space, overrides, size, untold, heartbeats)
            runnable = [(trial, values, trial_cfg) for trial, values, trial_cfg in batch
                        if not refused(cfg, study, trial, trial_cfg, goal, untold)]
            if not runnable:
                return
            for trial, values, _ in runnable:
                log.info("Trial %d started: %s", trial.number, shown_params(values))
            reporters = [pruning_reporter(trial, cfg.objective) if cfg.sweep.pruner else None
                         for trial, _, _ in runnable]
            trained = train_members([trial_cfg for _, _, trial_cfg in runnable],
                                    [trial_tags(study, trial) for trial, _, _ in runnable], reporters, cores)
        except StorageLost:
            raise
        except BaseException as error:
            if not tracking.is_unreachable(error):
                for trial in list(untold.values()):
                    tell(cfg, study, untold, trial, FAIL, error=one_line(error))
                raise
            lost = TrackingServerLost(
                f"the MLflow tracking server at {mlflow.get_tracking_uri()} stopped answering during trials "
                f"{', '.join(str(number) for number in untold)} for {cfg.sweep.storage_patience_s:.0f} s "
                f"({tracking.why_unreachable(error)}); the trials failed, and a worker started when the server "
                f"is back ends their runs")
            for trial in list(untold.values()):
                tell(cfg, study, untold, trial, FAIL, error=str(lost))
            raise lost from None
        for (trial, _, trial_cfg), result in zip(runnable, trained):
            if result.stopped is None:
                trial.set_user_attr(RUN_ATTR, result.run_id)
                tell(cfg, study, untold, trial, COMPLETE, value=result.final[trial_cfg.objective])
            elif isinstance(result.stopped, optuna.TrialPruned):
                tell(cfg, study, untold, trial, PRUNED)
            else:
                tell(cfg, study, untold, trial, FAIL, error=one_line(result.stopped))


def ask_batch(cfg: DictConfig, study: optuna.Study, space: dict, overrides: list[str], size: int,
              untold: dict[int, optuna.Trial], heartbeats: contextlib.ExitStack) -> list:
    """`size` trials with their values and configs, each beating from when it is asked. When the
    first's agent can share its loop and the search holds per-replica values, the others are
    enqueued with its other values (Optuna samples the rest), so that the batch trains as one loop;
    a grid's trials are its points, and retried trials waiting are taken first: neither is enqueued."""
    batch = []
    for _ in range(size):
        trial = study.ask()
        untold[trial.number] = trial
        heartbeats.enter_context(get_heartbeat_thread(trial._trial_id, study._storage))
        values = suggest(trial, space)
        batch.append((trial, values, trial_config(overrides, values)))
        if (len(batch) == 1 and size > 1 and GRID_ATTR not in study.user_attrs and config.can_share_ops(batch[0][2])
                and not study.get_trials(deepcopy=False, states=(WAITING,))):  # retries, taken first as they are
            shared = {name: value for name, value in values.items() if name not in PER_REPLICA_DIMENSIONS}
            if len(shared) < len(values):
                for _ in range(size - 1):
                    study.enqueue_trial(shared, user_attrs={BATCH_ATTR: trial.number})
    return batch


def refused(cfg: DictConfig, study: optuna.Study, trial: optuna.Trial, trial_cfg: DictConfig, goal: int,
            untold: dict[int, optuna.Trial]) -> bool:
    """Whether the trial ends before training, told: surplus to the study, or its config refused."""
    if surplus(study, trial, goal):
        tell(cfg, study, untold, trial, PRUNED)
        return True
    try:
        config.check_run(trial_cfg)
    except UserError as error:
        tell(cfg, study, untold, trial, FAIL, error=str(error))
        return True
    return False


def tell(cfg: DictConfig, study: optuna.Study, untold: dict[int, optuna.Trial], trial: optuna.Trial,
         state: optuna.trial.TrialState, value: float | None = None, error: str | None = None) -> None:
    """End a trial of a batch, with a line as `study.optimize` writes (announce, or why it failed)."""
    if error is not None:
        trial.set_user_attr(ERROR_ATTR, error)
        log.warning("Trial %d failed: %s", trial.number, error)
    del untold[trial.number]
    announce(cfg.objective, study, study.tell(trial, value, state=state))


def surplus(study: optuna.Study, trial: optuna.Trial, goal: int) -> bool:
    """Whether the study already has its `goal` trials without this one (another worker took the
    last place a moment before), which then ends PRUNED, marked surplus."""
    trials = study.get_trials(deepcopy=False)
    if sum(t.number < trial.number and t.state in (COMPLETE, RUNNING) for t in trials) < goal:
        return False
    trial.set_user_attr("surplus", True)
    return True


def trial_tags(study: optuna.Study, trial: optuna.Trial) -> dict[str, str]:
    """The MLflow tags of a trial's run: its study, its number, the parent run and what it retries."""
    tags = {"sweep.study": study.study_name, "sweep.trial": str(trial.number),
            "mlflow.parentRunId": study.user_attrs[PARENT_RUN_ATTR]}
    frozen = study._storage.get_trial(trial._trial_id)
    retry_of = RetryDeadWorkersTrial.retried_trial_number(frozen)
    if retry_of is not None:
        tags["sweep.retry_of"] = str(retry_of)
    return tags


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
