"""What a dead worker or a lost tracking server leaves behind: a trial Optuna must fail and
run again, and MLflow runs left RUNNING (or FINISHED) for trials that did not complete."""

from __future__ import annotations

import logging
import warnings

import mlflow
import optuna

from src import tracking
from src.campaigns.trials import COMPLETE, ERROR_ATTR

log = logging.getLogger(__name__)
# Heartbeats and retries of dead workers' trials are Optuna features it still calls experimental.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


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
            tracking.fail_run(run.info.run_id, "heartbeat: its worker died before the trial was recorded")
            log.warning("Run %s of dead trial %d marked FAILED", run.info.run_id, number)


def end_orphaned_runs(study: optuna.Study, experiment: str) -> None:
    """Mark FAILED the runs left RUNNING for trials Optuna has ended, as when the tracking
    server stopped answering mid-trial (a trial's run ends before Optuna ends the trial)."""
    trials = {trial.number: trial for trial in study.get_trials(deepcopy=False)}
    for run in trial_runs(study.study_name, experiment, " AND attributes.status = 'RUNNING'"):
        trial = trials.get(int(run.data.tags.get("sweep.trial", -1)))  # the parent has no trial
        # A COMPLETE trial's run is RUNNING again while the summarising worker adds its policy.
        if trial is not None and trial.state.is_finished() and trial.state != COMPLETE:
            tracking.fail_run(run.info.run_id, f"trial {trial.number} ended {trial.state.name}: "
                                      f"{trial.user_attrs.get(ERROR_ATTR, 'no error recorded')}")
            log.warning("Run %s of trial %d, left RUNNING, marked FAILED", run.info.run_id, trial.number)


def trial_runs(study_name: str, experiment: str, condition: str) -> list:
    found = mlflow.get_experiment_by_name(experiment)
    if found is None:
        return []
    return mlflow.MlflowClient().search_runs([found.experiment_id],
                                             filter_string=f"tags.`sweep.study` = '{study_name}'{condition}")
