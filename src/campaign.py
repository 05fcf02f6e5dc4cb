"""Campaigns: Optuna studies whose trials are tracked training runs, run by any number of workers.

The study's storage (SQLite on one machine, PostgreSQL across machines) is the shared work
queue; Optuna keeps it consistent. MLflow gets a parent run per study, holding the best
value and parameters, the best trial's run id and Optuna's plots, with one child run per
trial tagged with the study name and trial number.

- `prepare` makes (or resumes) the study and its parent run, and refuses an unreachable
  storage or a study of the same name with another direction. A grid study (Optuna's
  `GridSampler` in the sweep config) gets every grid point enqueued once.
- `work` runs trials until the study holds `n_trials` COMPLETE ones. Trials in progress on
  other workers count, so however many workers join, the study ends with exactly that many.
  Each trial sends a heartbeat; a worker that dies (SIGKILL, a lost machine) has its trial
  failed by a living worker, its MLflow run marked FAILED, and the trial run again.
  With `sweep.pruner` set, hopeless trials stop early: PRUNED in Optuna, KILLED and tagged
  `sweep.pruned` in MLflow.
- `summarise` writes the outcome into the parent run and registers the best trial's model,
  once the last trial has ended, whichever worker ends it.
"""

from __future__ import annotations

import copy
import functools
import itertools
import logging
import random
import tempfile
import time
import warnings

import mlflow
import optuna
import pandas as pd
import sqlalchemy
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import get_class, instantiate
from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides
from mlflow.entities import RunStatus
from mlflow.tracking.context import registry as context_registry
from omegaconf import DictConfig, OmegaConf

from src import comparison, config, metrics, plots, tracking
from src.errors import UserError, one_line
from src.sweep_trials import ERROR_ATTR, PARENT_RUN_ATTR, RUN_ATTR

log = logging.getLogger(__name__)
# Heartbeats and retries of dead workers' trials are Optuna features it still calls experimental;
# Hydra's sampler config still sets TPE options Optuna 4 deprecated (at their defaults).
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
warnings.filterwarnings("ignore", message=r".*has been deprecated in v4\.", category=FutureWarning)

COMPLETE, RUNNING, WAITING = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING,
                              optuna.trial.TrialState.WAITING)
FAIL, PRUNED = optuna.trial.TrialState.FAIL, optuna.trial.TrialState.PRUNED
GRID_ATTR = "grid_size"
# How often a worker with nothing to do looks again, and fails trials whose worker died.
POLL_SECONDS = 2.0
# Tries to open a storage whose tables another worker may be creating at the same moment.
SCHEMA_ATTEMPTS = 5


class TrackingServerLost(UserError):
    """The tracking server stopped answering mid-trial: the worker stops, as every trial
    would fail the same way; a worker started later ends the trial's run."""


class StorageLost(UserError):
    """The study's database stopped answering for longer than `sweep.storage_patience_s`:
    the worker stops; a worker started when it is back fails and reruns the trial."""


class Pruned(tracking.RunStopped, optuna.TrialPruned):
    """The pruner stopped the trial: PRUNED in Optuna, KILLED and tagged in MLflow."""


def compose_sweep(overrides: list[str]) -> DictConfig:
    """The sweep's config without its command-line search dimensions (`x=choice(...)`), which
    `search_space` reads; study, storage, sampler and tracking are all that count here."""
    return config.compose(split_overrides(overrides)[0], with_hydra=True)


def split_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """(fixed overrides, search dimensions) of a command line."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    fixed = [text for text, override in zip(overrides, parsed) if not override.is_sweep_override()]
    return fixed, [text for text in overrides if text not in fixed]


def storage_url(cfg: DictConfig) -> str:
    url = str(cfg.hydra.sweeper.storage or "")
    if not url:
        raise UserError("hydra.sweeper.storage is empty: a sweep needs a storage to share and resume")
    # The PostgreSQL driver installed here is psycopg 3; SQLAlchemy's plain scheme means psycopg2.
    return url.replace("postgresql://", "postgresql+psycopg://", 1)


def shown_storage(cfg: DictConfig) -> str:
    """The storage URL for messages and tags: its password stays out of logs."""
    return sqlalchemy.engine.make_url(storage_url(cfg)).render_as_string(hide_password=True)


class PatientStorage(optuna.storages.RDBStorage):
    """Optuna's RDB storage, waiting out a database that restarts: every call that loses its
    connection is tried again for `patience_s`, then raises `StorageLost` (at once, from then on)."""

    def __init__(self, url: str, shown_url: str, patience_s: float, **kwargs):
        self.shown_url, self.patience_s, self.lost = shown_url, patience_s, None
        super().__init__(url, **kwargs)

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            _patiently(optuna.storages.RDBStorage.record_heartbeat)(self, trial_id)
        except StorageLost:
            pass  # Optuna's heartbeat thread has no handler; the worker's own next call reports it


def _patiently(method):
    @functools.wraps(method)
    def call(storage: PatientStorage, *args, **kwargs):
        deadline = None
        while storage.lost is None:
            try:
                result = method(storage, *args, **kwargs)
            except Exception as error:  # Optuna wraps SQLAlchemy's errors in its own
                cause = connection_error(error)
                if cause is None:
                    raise
                if deadline is None:
                    deadline = time.monotonic() + storage.patience_s
                    log.warning("The Optuna storage %s does not answer (%s); trying again for %.0f s",
                                storage.shown_url, cause, storage.patience_s)
                if time.monotonic() < deadline:
                    time.sleep(POLL_SECONDS)
                    continue
                storage.lost = StorageLost(f"the Optuna storage {storage.shown_url} stopped answering for "
                                           f"{storage.patience_s:.0f} s ({cause}); a worker started when it is "
                                           f"back fails the interrupted trial and runs it again")
            else:
                if deadline is not None:
                    log.info("The Optuna storage %s answers again", storage.shown_url)
                return result
        raise storage.lost

    return call


# Every call that reaches the database: Optuna's storage API and what its cache and heartbeat call.
for _name in [*vars(optuna.storages.BaseStorage), "_create_new_trial", "_set_trial_param", "_get_best_trial_id",
              "_get_trials", "_get_stale_trial_ids"]:
    if not _name.startswith("__") and callable(getattr(optuna.storages.RDBStorage, _name, None)):
        setattr(PatientStorage, _name, _patiently(getattr(PatientStorage, _name)))


def connection_error(error: BaseException) -> str | None:
    """The first line of the lost or refused connection behind `error`, if that is its cause."""
    cause = in_chain(error, sqlalchemy.exc.OperationalError)
    return None if cause is None else one_line(cause.orig or cause)


def in_chain(error: BaseException | None, kind: type[BaseException]) -> BaseException | None:
    """`error`, or the first error it arose from, that is a `kind`; None if there is none."""
    while error is not None and not isinstance(error, kind):
        error = error.__cause__ or error.__context__
    return error


def open_storage(cfg: DictConfig) -> PatientStorage:
    """The study's storage, with a heartbeat per running trial: a trial whose worker stops
    beating for `sweep.grace_s` is failed, its MLflow run too, and it is queued again."""
    campaign, url = cfg.sweep, storage_url(cfg)
    for attempt in range(1, SCHEMA_ATTEMPTS + 1):
        try:
            return PatientStorage(
                url, shown_storage(cfg), campaign.storage_patience_s,
                heartbeat_interval=campaign.heartbeat_s, grace_period=campaign.grace_s,
                heartbeat_stale_trial_callback=RetryDeadWorkersTrial(campaign.max_retries, cfg.tracking.experiment),
                engine_kwargs={"pool_pre_ping": True} if not url.startswith("sqlite") else None)
        except ImportError as error:
            raise UserError(f"Optuna storage {shown_storage(cfg)} needs a driver that is not installed: {error}") \
                from None
        except Exception as error:  # SQLAlchemy reports an unreachable database in many types
            # Workers starting together on a new database all create Optuna's tables; those that
            # lose the race find them made a moment later.
            if attempt < SCHEMA_ATTEMPTS and is_schema_race(error):
                log.info("Optuna's tables were being created by another worker; opening the storage again")
                time.sleep(random.uniform(0.2, 1.0))
                continue
            raise UserError(f"cannot open Optuna storage {shown_storage(cfg)}: {one_line(error)}") from None


def is_schema_race(error: Exception) -> bool:
    return isinstance(error, sqlalchemy.exc.IntegrityError) or "already exists" in str(error)


class RetryDeadWorkersTrial(optuna.storages.RetryHeartbeatStaleTrialCallback):
    """Optuna's retry of a trial whose worker died, which also ends the trial's MLflow run."""

    def __init__(self, max_retry: int, experiment: str):
        super().__init__(max_retry=max_retry)
        self.experiment = experiment

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        log.warning("Trial %d's worker stopped beating; the trial failed and runs again", trial.number)
        super().__call__(study, trial)
        end_trial_runs(study.study_name, trial.number, self.experiment)


def end_trial_runs(study_name: str, number: int, experiment: str) -> None:
    """Mark FAILED the MLflow run of a trial whose worker died: left RUNNING, or FINISHED when
    the worker lost the study's database before it could record the trial's value."""
    for run in trial_runs(study_name, experiment, f" AND tags.`sweep.trial` = '{number}'"):
        if run.info.status in ("RUNNING", "FINISHED"):
            fail_run(run.info.run_id, "heartbeat: its worker died before the trial was recorded")
            log.warning("Run %s of dead trial %d marked FAILED", run.info.run_id, number)


def end_orphaned_runs(study: optuna.Study, experiment: str) -> None:
    """Mark FAILED the runs left RUNNING for trials Optuna has ended, as when the tracking
    server stopped answering mid-trial (a trial's run ends before Optuna ends the trial)."""
    trials = {trial.number: trial for trial in study.get_trials(deepcopy=False)}
    for run in trial_runs(study.study_name, experiment, " AND attributes.status = 'RUNNING'"):
        trial = trials.get(int(run.data.tags.get("sweep.trial", -1)))  # the parent has no trial
        # A COMPLETE trial's run is RUNNING again while the summarising worker adds its policy.
        if trial is not None and trial.state.is_finished() and trial.state != COMPLETE:
            fail_run(run.info.run_id, f"trial {trial.number} ended {trial.state.name}: "
                                      f"{trial.user_attrs.get(ERROR_ATTR, 'no error recorded')}")
            log.warning("Run %s of trial %d, left RUNNING, marked FAILED", run.info.run_id, trial.number)


def trial_runs(study_name: str, experiment: str, condition: str) -> list:
    found = mlflow.get_experiment_by_name(experiment)
    if found is None:
        return []
    return mlflow.MlflowClient().search_runs([found.experiment_id],
                                             filter_string=f"tags.`sweep.study` = '{study_name}'{condition}")


def fail_run(run_id: str, reason: str) -> None:
    client = mlflow.MlflowClient()
    client.set_tag(run_id, "bandits.ended_by", reason)
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))


def directions(cfg: DictConfig) -> list[str]:
    direction = cfg.hydra.sweeper.direction
    names = [direction] if isinstance(direction, str) else list(direction)
    return [str(name).lower() for name in names]


def check_sweeper(cfg: DictConfig) -> None:
    sweeper = cfg.hydra.sweeper
    wanted = metrics.OBJECTIVES.get(cfg.objective)
    if wanted and directions(cfg) != [wanted]:
        raise UserError(f"hydra.sweeper.direction is {sweeper.direction}, but objective={cfg.objective} "
                        f"is to {wanted}; set hydra.sweeper.direction={wanted}")
    # `remember_trial` hands one trial to the job that runs next; a batch of several would
    # tag runs with the wrong trials.
    if sweeper.n_jobs != 1:
        raise UserError(f"hydra.sweeper.n_jobs must be 1, got {sweeper.n_jobs}; "
                        "run trials in parallel with ./multirun.sh --workers N")
    if cfg.sweep.pruner not in (None, "median", "hyperband"):
        raise UserError(f"sweep.pruner must be null, median or hyperband, got {cfg.sweep.pruner!r}")


def pruner(cfg: DictConfig) -> optuna.pruners.BasePruner:
    """Pruning compares trials at equal interactions; none before a fifth of the run."""
    interactions = cfg.training.loops * cfg.training.batch_size * cfg.training.steps_per_loop
    if cfg.sweep.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=interactions // 5)
    if cfg.sweep.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, interactions // 5), max_resource=interactions)
    return optuna.pruners.NopPruner()


def load_study(cfg: DictConfig, sampler: optuna.samplers.BaseSampler | None = None) -> optuna.Study:
    """The study the sweep config names, checked to agree with the config."""
    name, wanted = cfg.hydra.sweeper.study_name, directions(cfg)
    storage = open_storage(cfg)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner(cfg))
    except KeyError:
        raise UserError(f"no study '{name}' in {shown_storage(cfg)}; run the sweep first") from None
    except UserError:
        raise
    except Exception as error:
        raise UserError(f"cannot open Optuna storage {shown_storage(cfg)}: {one_line(error)}") from None
    found = [d.name.lower() for d in study.directions]
    if found != wanted:
        raise UserError(
            f"study '{name}' in {shown_storage(cfg)} exists with direction {found}, the config asks for {wanted}; "
            f"use another hydra.sweeper.study_name or storage")
    return study


def is_grid(cfg: DictConfig) -> bool:
    return get_class(cfg.hydra.sweeper.sampler._target_) is optuna.samplers.GridSampler


def search_space(cfg: DictConfig, overrides: list[str]) -> dict[str, optuna.distributions.BaseDistribution]:
    """Optuna distributions from the sweep config's `params` and the command line, read by
    Hydra's Optuna sweeper's own parser: same syntax, same meaning (a fixed value on the
    command line takes its key out of the search)."""
    declared = [f"{key}={value}" for key, value in (cfg.hydra.sweeper.params or {}).items()]
    space, fixed = create_params_from_overrides([*declared, *overrides])
    return {name: distribution for name, distribution in space.items() if name not in fixed}


def create_study(cfg: DictConfig) -> bool:
    """Create the study unless it exists; True for the one process that created it (the
    storage's unique study name decides between workers starting together)."""
    try:
        optuna.create_study(study_name=cfg.hydra.sweeper.study_name, storage=open_storage(cfg),
                            directions=directions(cfg))
        return True
    except optuna.exceptions.DuplicatedStudyError:
        return False
    except UserError:
        raise
    except Exception as error:
        raise UserError(f"cannot open Optuna storage {shown_storage(cfg)}: {one_line(error)}") from None


def parent_run_of(study: optuna.Study, wait_s: float = 60.0) -> str | None:
    """The study's MLflow parent run, waiting a while for the worker that creates it."""
    deadline = time.monotonic() + wait_s
    while (parent_id := study.user_attrs.get(PARENT_RUN_ATTR)) is None and time.monotonic() < deadline:
        time.sleep(POLL_SECONDS)
    return parent_id


def prepare(cfg: DictConfig, overrides: list[str] = ()) -> optuna.Study:
    """Create or resume the study and its MLflow parent run; return the study."""
    check_sweeper(cfg)
    created = create_study(cfg)
    study = load_study(cfg)
    experiment_id = tracking.connect(cfg.tracking.uri, cfg.tracking.experiment)
    client = mlflow.MlflowClient()
    parent_id = None if created else parent_run_of(study)
    if parent_id is None:
        # The client, unlike `mlflow.start_run`, adds no source tags (git commit, user) itself.
        parent = client.create_run(
            experiment_id, run_name=f"{study.study_name}·sweep",
            tags=context_registry.resolve_tags({"sweep.study": study.study_name, "sweep.role": "parent",
                                                "sweep.storage": shown_storage(cfg)}))
        parent_id = parent.info.run_id
        study.set_user_attr(PARENT_RUN_ATTR, parent_id)
        for key, value in (cfg.hydra.sweeper.params or {}).items():
            client.log_param(parent_id, f"search.{key}", value)
        if is_grid(cfg):
            enqueue_grid(study, search_space(cfg, list(overrides)))
    else:
        client.update_run(parent_id, status=RunStatus.to_string(RunStatus.RUNNING))
        end_orphaned_runs(study, cfg.tracking.experiment)
    log.info("Study '%s': %d trials complete so far; MLflow parent run %s",
             study.study_name, len(study.get_trials(states=(COMPLETE,))), parent_id)
    return study


def enqueue_grid(study: optuna.Study, space: dict) -> None:
    """Every grid point once, as a WAITING trial any worker takes (Optuna pops each once)."""
    names = list(space)
    points = list(itertools.product(*(space[name].choices for name in names)))
    for point in points:
        study.enqueue_trial(dict(zip(names, point)))
    study.set_user_attr(GRID_ATTR, len(points))
    log.info("Grid of %d points enqueued over %s", len(points), ", ".join(names))


def target(cfg: DictConfig, study: optuna.Study) -> int:
    """How many COMPLETE trials the study ends with: `n_trials`, or a grid's size."""
    return study.user_attrs.get(GRID_ATTR) or cfg.hydra.sweeper.n_trials


def failed_for_good(study: optuna.Study) -> int:
    """FAIL trials that will not run again (a retry is a new WAITING trial)."""
    retried = {RetryDeadWorkersTrial.retried_trial_number(t) for t in study.trials}
    return sum(1 for t in study.get_trials(states=(FAIL,)) if t.number not in retried)


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


def work(overrides: list[str], worker: int = 0) -> None:
    """Run trials of the study `overrides` configure until it holds its `n_trials` COMPLETE
    trials (or too many have failed); then summarise it if no other worker is still busy."""
    fixed, _ = split_overrides(overrides)
    cfg = config.compose(fixed, with_hydra=True)
    study = prepare(cfg, overrides)
    seed = (cfg.hydra.sweeper.sampler.get("seed") or 0) + worker + len(study.trials)
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


def shown_params(params: dict) -> str:
    """Sampled values as a person reads them: 2.288, not 2.2881136684755243 (runs log them whole)."""
    return " ".join(f"{name}={comparison.shown(str(value), digits=4)}" for name, value in params.items())


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
                f"{trial.number}; the trial failed, and a worker started when the server is back ends its run")
            trial.set_user_attr(ERROR_ATTR, str(lost))
            raise lost from None
        trial.set_user_attr(ERROR_ATTR, one_line(error))
        raise
    trial.set_user_attr(RUN_ATTR, run_id)
    return final[trial_cfg.objective]


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

    def report(step: int, value: float) -> None:
        trial.report(value, step)
        if trial.should_prune():
            mlflow.set_tag("sweep.pruned", f"at {step} interactions")
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


def summarise_if_done(cfg: DictConfig, study: optuna.Study,
                      interrupted: bool = False) -> optuna.trial.FrozenTrial | None:
    """Summarise unless trials still run on other workers (the last of them will); return
    the best trial when summarised."""
    others = len(study.get_trials(states=(RUNNING,)))
    if others:
        log.info("%d trials still running on other workers; the last to finish summarises", others)
        return None
    return summarise(cfg, failed=interrupted)


def summarise(cfg: DictConfig, failed: bool = False) -> optuna.trial.FrozenTrial | None:
    """Log the study's best trial and Optuna's plots to the parent run; return the best trial."""
    study = load_study(cfg)
    tracking.connect(cfg.tracking.uri, cfg.tracking.experiment)
    parent_id = study.user_attrs.get(PARENT_RUN_ATTR)
    if parent_id is None:
        raise UserError(f"study '{study.study_name}' has no MLflow parent run; run `python -m src.sweep prepare` first")
    client = mlflow.MlflowClient()
    states = [t.state for t in study.trials]
    complete = states.count(COMPLETE)
    for name, state in (("complete", COMPLETE), ("failed", FAIL), ("pruned", PRUNED)):
        client.log_metric(parent_id, f"sweep/trials_{name}", states.count(state), step=len(states))
    best = None
    if complete:
        best = study.best_trial
        client.log_metric(parent_id, f"best/{cfg.objective}", metrics.rounded(best.value), step=len(states))
        client.set_tag(parent_id, "best.trial", str(best.number))
        for name, value in best.params.items():
            client.set_tag(parent_id, f"best.{name}", str(value))
        best_run = best.user_attrs.get(RUN_ATTR)
        if best_run:
            client.set_tag(parent_id, "best.run_id", best_run)
            register_best_model(cfg, best_run)
        log_plots(client, parent_id, study)
        log.info("Best of %d trials: %s = %.6g with %s (trial %d, run %s)", len(states), cfg.objective,
                 best.value, shown_params(best.params), best.number, best_run)
    done = complete >= target(cfg, study)  # a grid with failed points is not done
    status = RunStatus.FINISHED if done and not failed else RunStatus.FAILED
    client.set_terminated(parent_id, RunStatus.to_string(status))
    return best


def register_best_model(cfg: DictConfig, run_id: str) -> None:
    """Register the best trial's servable model under `<study>-best`, first completing the
    trial's light artifacts with its regret plot and its policy."""
    name = f"{cfg.hydra.sweeper.study_name}-best"
    client = mlflow.MlflowClient()
    if any(v.run_id == run_id for v in client.search_model_versions(f"name = '{name}'")):
        return  # a resumed sweep whose best trial has not changed
    log_regret_plot(run_id)
    with tempfile.TemporaryDirectory() as scratch:
        run_cfg = OmegaConf.load(client.download_artifacts(run_id, "config.yaml", scratch))
    if run_cfg.tracking.save_policy and "policy" not in {artifact.path for artifact in client.list_artifacts(run_id)}:
        retrain_policy(run_id, run_cfg)
    model = logged_model(run_id)
    if model is None:
        log.warning("The best trial's run %s saved no policy to register", run_id)
        return
    version = mlflow.register_model(f"models:/{model.model_id}", name)
    # Two workers ending together may both register it; both then keep the first version.
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'") if v.run_id == run_id)
    for extra in versions[1:]:
        try:
            client.delete_model_version(name, str(extra))
        except mlflow.exceptions.MlflowException:
            pass  # the other worker deleted it first
    kept = str(versions[0] if versions else version.version)
    # The alias follows the best trial as a resumed sweep finds better ones; serve `@champion`.
    client.set_registered_model_alias(name, "champion", kept)
    client.update_registered_model(name, description=(
        f"The best trial of the Optuna study '{cfg.hydra.sweeper.study_name}' by {cfg.objective} "
        f"({directions(cfg)[0]}); each version is a best trial's policy, trained again from its config."))
    log.info("Registered the best trial's model as models:/%s/%s (alias @champion)", name, kept)


def retrain_policy(run_id: str, run_cfg: DictConfig) -> None:
    """Train the run's config again and log the policy (and servable model) into the run.
    Trials save no policy: a SavedModel costs more than a quick trial's training, and a job's
    result depends only on its config and seed, which the objective's value checks here."""
    from src import data, experiment, offline, serving  # TensorFlow, only when there is a model to register

    log.info("Training the best trial (run %s) again for its policy", run_id)
    dataset = data.load(run_cfg.data)
    engine = experiment.assemble(run_cfg, dataset)
    if offline.is_offline(run_cfg):
        logs = offline.logged_feedback(run_cfg, engine.environment.reward_model)
        value = offline.learn(run_cfg, engine, *logs)[run_cfg.objective]
    else:
        history = metrics.RegretHistory(engine.interactions_per_loop)
        for chunk in engine.run(run_cfg.training.loops, run_cfg.training.chunk_loops):
            history.add(chunk)
        value = history.final()[run_cfg.objective]
    logged = mlflow.MlflowClient().get_run(run_id).data.metrics[run_cfg.objective]
    if abs(metrics.rounded(value) - logged) > 1e-6 * max(1.0, abs(logged)):
        log.warning("The best trial gave %s = %.6g when trained again, %.6g in the sweep (another CPU type?)",
                    run_cfg.objective, value, logged)
    with mlflow.start_run(run_id=run_id):
        mlflow.set_tag("sweep.policy_from", f"trained again after the sweep: {run_cfg.objective} = {value:.6g}")
        catalogue = serving.Catalogue.of(engine.environment.reward_model, dataset.movies, run_cfg.env)
        serving.log_policy(engine.agent.policy, catalogue)


def log_regret_plot(run_id: str) -> None:
    """Draw a finished run's regret plot from its metrics.csv, unless it has one."""
    client = mlflow.MlflowClient()
    artifacts = {artifact.path for artifact in client.list_artifacts(run_id)}
    if "regret.png" in artifacts or "metrics.csv" not in artifacts:
        return
    with tempfile.TemporaryDirectory() as scratch:
        frame = pd.read_csv(client.download_artifacts(run_id, "metrics.csv", scratch))
        run_cfg = OmegaConf.load(client.download_artifacts(run_id, "config.yaml", scratch))
    random_regret = client.get_run(run_id).data.tags.get(metrics.RANDOM_REGRET_TAG)
    figure = plots.regret_figure(frame, plots.run_title(run_cfg), random_regret and float(random_regret))
    client.log_figure(run_id, figure, "regret.png")


def logged_model(run_id: str):
    experiment = mlflow.MlflowClient().get_run(run_id).info.experiment_id
    models = mlflow.search_logged_models(
        experiment_ids=[experiment], filter_string=f"source_run_id = '{run_id}' AND name = 'model'",
        output_format="list")
    return models[0] if models else None


def log_plots(client: mlflow.MlflowClient, run_id: str, study: optuna.Study) -> None:
    import optuna.visualization.matplotlib as plots

    figures = {"optimization_history.png": plots.plot_optimization_history(study)}
    # Importances need at least two finished trials and two parameters to compare.
    if len(study.get_trials(states=(COMPLETE,))) > 1 and len(study.best_trial.params) > 1:
        figures["param_importances.png"] = plots.plot_param_importances(study)
    for name, axes in figures.items():
        client.log_figure(run_id, axes.figure, name)

