"""What links a trial to its MLflow runs, in a campaign's workers and in Hydra's Optuna sweeper.

The sweeper hands the trial to `remember_trial` (its `custom_search_space` hook) just before
its basic launcher runs the trial's job in this process; the job's entry point then asks for
the trial's tags and records its run id. The sweeper's plugin API offers no other way to
reach the trial from the job, hence the one module-level variable.
"""

from __future__ import annotations

import optuna
from omegaconf import DictConfig

from src.errors import one_line

COMPLETE, RUNNING, WAITING = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING,
                              optuna.trial.TrialState.WAITING)
FAIL, PRUNED = optuna.trial.TrialState.FAIL, optuna.trial.TrialState.PRUNED
PARENT_RUN_ATTR = "mlflow_parent_run_id"
RUN_ATTR = "mlflow_run_id"
ERROR_ATTR = "error"

_trial: optuna.trial.Trial | None = None


def remember_trial(cfg: DictConfig, trial: optuna.trial.Trial) -> None:
    """The sweeper's `custom_search_space` hook, called just before the trial's job runs."""
    global _trial
    _trial = trial


def trial_tags() -> dict[str, str]:
    """MLflow tags linking the current job's run to its trial and the sweep's parent run."""
    if _trial is None:
        return {}
    tags = {"sweep.study": _trial.study.study_name, "sweep.trial": str(_trial.number)}
    parent = _trial.study.user_attrs.get(PARENT_RUN_ATTR)
    if parent:
        tags["mlflow.parentRunId"] = parent
    return tags


def record_run(run_id: str) -> None:
    if _trial is not None:
        _trial.set_user_attr(RUN_ATTR, run_id)


def record_error(error: BaseException) -> None:
    if _trial is not None:
        _trial.set_user_attr(ERROR_ATTR, one_line(error))


def every_trial_failed() -> str | None:
    """Why the last trial failed, if every trial of the sweep did (Hydra's Optuna sweeper then
    ends asking Optuna for a best trial there is not); else None."""
    if _trial is None:
        return None
    trials = _trial.study.get_trials(deepcopy=False)
    if any(trial.state == COMPLETE for trial in trials):
        return None
    return trials[-1].user_attrs.get(ERROR_ATTR, "no error recorded")
