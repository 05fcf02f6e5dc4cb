"""Optuna sweeps through Hydra's Optuna sweeper, every trial tracked in MLflow.

Hydra's sweeper runs trials one after another in one process; `multirun.sh` starts N such
processes on one Optuna study (Optuna's distributed mode). MLflow gets a parent run per
study, holding the best value and parameters, the best trial's run id and Optuna's plots,
with one child run per trial tagged with the study name and trial number.

Three pieces, all wired from `conf/hparams_search/*.yaml`:
- `prepare` makes (or resumes) the study and its parent run before any trial starts, and
  refuses an unreachable storage or a study of the same name with another direction;
- `src.sweep_trials.remember_trial`, the sweeper's `custom_search_space` hook, tells the
  next job (run in this process by Hydra's basic launcher) which trial it is;
- `summarise` writes the study's outcome into the parent run.

    uv run python -m src.sweep prepare hparams_search=linucb     # what multirun.sh calls
    uv run python -m src.sweep summarise hparams_search=linucb
"""

from __future__ import annotations

import atexit
import logging
import os
import shlex
import sys
import warnings

import mlflow
import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from mlflow.entities import RunStatus
from omegaconf import DictConfig

from src import config, metrics, tracking
from src.sweep_trials import PARENT_RUN_ATTR, RUN_ATTR
from src.cli import exit_on_user_error
from src.errors import UserError

log = logging.getLogger(__name__)

# multirun.sh sets this in its workers: it prepares and summarises the study itself, once.
MANAGED_ENV = "BANDIT_SWEEP_MANAGED"


def _directions(sweeper: DictConfig) -> list[str]:
    direction = sweeper.direction
    names = [direction] if isinstance(direction, str) else list(direction)
    return [str(name).lower() for name in names]


def load_study(cfg: DictConfig, create: bool) -> optuna.Study:
    """The study the sweep config names; creating it, or checking it agrees with the config."""
    sweeper = cfg.hydra.sweeper
    name, storage, directions = sweeper.study_name, sweeper.storage, _directions(sweeper)
    if not storage:
        raise UserError("hydra.sweeper.storage is empty: a sweep needs a storage to share and resume")
    try:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        if create:
            optuna.create_study(study_name=name, storage=storage, directions=directions, load_if_exists=True)
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        raise UserError(f"no study '{name}' in {storage}; run the sweep first") from None
    except ImportError as error:
        raise UserError(f"Optuna storage {storage} needs a driver that is not installed: {error}") from None
    except Exception as error:  # SQLAlchemy reports an unreachable database in many types
        raise UserError(f"cannot open Optuna storage {storage}: {str(error).splitlines()[0]}") from None
    found = [d.name.lower() for d in study.directions]
    if found != directions:
        raise UserError(
            f"study '{name}' in {storage} exists with direction {found}, the config asks for {directions}; "
            f"use another hydra.sweeper.study_name or storage")
    return study


def check_sweeper(cfg: DictConfig) -> None:
    sweeper = cfg.hydra.sweeper
    wanted = metrics.OBJECTIVES.get(cfg.objective)
    if wanted and _directions(sweeper) != [wanted]:
        raise UserError(f"hydra.sweeper.direction is {sweeper.direction}, but objective={cfg.objective} "
                        f"is to {wanted}; set hydra.sweeper.direction={wanted}")
    # `remember_trial` hands one trial to the job that runs next; a batch of several would
    # tag runs with the wrong trials.
    if sweeper.n_jobs != 1:
        raise UserError(f"hydra.sweeper.n_jobs must be 1, got {sweeper.n_jobs}; "
                        "run trials in parallel with ./multirun.sh --workers N")


def prepare(cfg: DictConfig) -> optuna.Study:
    """Create or resume the study and its MLflow parent run; return the study."""
    check_sweeper(cfg)
    study = load_study(cfg, create=True)
    experiment_id = tracking.connect(cfg.tracking.uri, cfg.tracking.experiment)
    client = mlflow.MlflowClient()
    parent_id = study.user_attrs.get(PARENT_RUN_ATTR)
    if parent_id is None:
        parent = client.create_run(
            experiment_id, run_name=f"sweep__{study.study_name}",
            tags={"sweep.study": study.study_name, "sweep.role": "parent",
                  "sweep.storage": str(cfg.hydra.sweeper.storage), "git_commit": tracking.git_commit()})
        parent_id = parent.info.run_id
        study.set_user_attr(PARENT_RUN_ATTR, parent_id)
        for key, value in cfg.hydra.sweeper.params.items():
            client.log_param(parent_id, f"search.{key}", value)
    else:
        client.update_run(parent_id, status=RunStatus.to_string(RunStatus.RUNNING))
    finished = len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)))
    log.info("Study '%s' in %s: %d trials finished so far; MLflow parent run %s",
             study.study_name, cfg.hydra.sweeper.storage, finished, parent_id)
    return study


def summarise(cfg: DictConfig, failed_workers: int = 0) -> optuna.trial.FrozenTrial | None:
    """Log the study's best trial and Optuna's plots to the parent run; return the best trial."""
    study = load_study(cfg, create=False)
    tracking.connect(cfg.tracking.uri, cfg.tracking.experiment)
    parent_id = study.user_attrs.get(PARENT_RUN_ATTR)
    if parent_id is None:
        raise UserError(f"study '{study.study_name}' has no MLflow parent run; run `python -m src.sweep prepare` first")
    client = mlflow.MlflowClient()
    states = [t.state for t in study.trials]
    complete = states.count(optuna.trial.TrialState.COMPLETE)
    client.log_metric(parent_id, "sweep/trials_complete", complete, step=len(states))
    client.log_metric(parent_id, "sweep/trials_failed", states.count(optuna.trial.TrialState.FAIL), step=len(states))
    best = None
    if complete:
        best = study.best_trial
        client.log_metric(parent_id, f"best/{cfg.objective}", best.value, step=len(states))
        client.set_tag(parent_id, "best.trial", str(best.number))
        for name, value in best.params.items():
            client.set_tag(parent_id, f"best.{name}", str(value))
        best_run = best.user_attrs.get(RUN_ATTR)
        if best_run:
            client.set_tag(parent_id, "best.run_id", best_run)
            register_best_model(cfg, best_run)
        log_plots(client, parent_id, study)
        log.info("Best of %d trials: %s = %.4f with %s (trial %d, run %s)", len(states), cfg.objective,
                 best.value, best.params, best.number, best_run)
    status = RunStatus.FAILED if failed_workers or not complete else RunStatus.FINISHED
    client.set_terminated(parent_id, RunStatus.to_string(status))
    return best


def register_best_model(cfg: DictConfig, run_id: str) -> None:
    """Register the best trial's servable model under `<study>-best`."""
    experiment = mlflow.MlflowClient().get_run(run_id).info.experiment_id
    models = mlflow.search_logged_models(
        experiment_ids=[experiment], filter_string=f"source_run_id = '{run_id}' AND name = 'model'",
        output_format="list")
    if not models:
        log.warning("The best trial's run %s logged no servable model to register", run_id)
        return
    name = f"{cfg.hydra.sweeper.study_name}-best"
    client = mlflow.MlflowClient()
    if any(v.run_id == run_id for v in client.search_model_versions(f"name = '{name}'")):
        return  # a resumed sweep whose best trial has not changed
    version = mlflow.register_model(f"models:/{models[0].model_id}", name)
    log.info("Registered the best trial's model as models:/%s/%s", name, version.version)


def log_plots(client: mlflow.MlflowClient, run_id: str, study: optuna.Study) -> None:
    import optuna.visualization.matplotlib as plots

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        figures = {"optimization_history.png": plots.plot_optimization_history(study)}
        # Importances need at least two finished trials and two parameters to compare.
        if len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) > 1 and len(study.best_trial.params) > 1:
            figures["param_importances.png"] = plots.plot_param_importances(study)
    for name, axes in figures.items():
        client.log_figure(run_id, axes.figure, name)


class SweepTracking(Callback):
    """Prepares and summarises the study around a single-process `python -m src.train -m` sweep."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        if not os.environ.get(MANAGED_ENV):
            with exit_on_user_error():
                prepare(config)
            # Hydra skips on_multirun_end when the sweep raises (every trial failed, Ctrl-C);
            # the parent run must still end, as FAILED.
            atexit.register(self._end_abandoned, config)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        if not os.environ.get(MANAGED_ENV):
            atexit.unregister(self._end_abandoned)
            with exit_on_user_error():
                summarise(config)

    @staticmethod
    def _end_abandoned(config: DictConfig) -> None:
        summarise(config, failed_workers=1)


def compose_sweep(overrides: list[str]) -> DictConfig:
    """The sweep's config without its command-line search dimensions (`x=choice(...)`),
    which only the workers' sweepers read; study, storage and tracking are all that count here."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    fixed = [text for text, override in zip(overrides, parsed) if not override.is_sweep_override()]
    return config.compose(fixed, with_hydra=True)


def main(argv: list[str]) -> None:
    usage = "usage: python -m src.sweep {prepare|summarise} hparams_search=AGENT [overrides...]"
    if not argv or argv[0] not in ("prepare", "summarise"):
        print(usage, file=sys.stderr)
        sys.exit(2)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    with exit_on_user_error():
        cfg = compose_sweep(argv[1:])
        if "study_name" not in cfg.hydra.sweeper:
            raise UserError("no sweep configured: pass hparams_search=AGENT")
        if argv[0] == "prepare":
            study = prepare(cfg)
            finished = len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)))
            # Shell assignments for multirun.sh to `eval`.
            state = {"study": study.study_name, "finished": finished,
                     "n_trials": cfg.hydra.sweeper.n_trials, "seed": cfg.hydra.sweeper.sampler.seed or 0}
            print(" ".join(f"{key}={shlex.quote(str(value))}" for key, value in state.items()))
        else:
            failed = int(os.environ.get("FAILED_WORKERS", "0"))
            best = summarise(cfg, failed_workers=failed)
            if best is not None:
                print(f"best {cfg.objective}={best.value:.6g} trial={best.number} params={best.params}")


if __name__ == "__main__":
    main(sys.argv[1:])
