"""Off-policy selection in a sweep whose objective is `ope/<estimator>`: whether the estimate
ranks the trials as their true values (`ope/true_value`) do, and how much true value the trial
it chose gives up against the truly best one."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import mlflow
import optuna
from scipy import stats

from src import metrics
from src.campaigns.trials import COMPLETE, RUN_ATTR
from src.evaluation.estimators import TRUE_VALUE

log = logging.getLogger(__name__)

# Two points are ranked alike or oppositely whatever the estimator: their correlation is ±1.
MIN_TRIALS = 3


@dataclass(frozen=True)
class Selection:
    trials: int
    spearman: float | None  # None: too few trials, or the estimates or true values all equal
    chosen: float | None  # the chosen trial's true value; None when its run logged none
    best: float | None

    @property
    def regret(self) -> float | None:
        return None if self.chosen is None else self.best - self.chosen

    def line(self, objective: str) -> str:
        if self.spearman is not None:
            ranks = f"Spearman {self.spearman:.2f} between {objective} and the true value over {self.trials} trials"
        elif self.trials < MIN_TRIALS:
            ranks = (f"too few trials with {objective} and the true value for a rank correlation "
                     f"({self.trials}, at least {MIN_TRIALS})")
        else:
            ranks = f"no rank correlation over {self.trials} trials: their {objective} or true values are all equal"
        if self.chosen is None:
            choice = "the chosen trial's run logged no true value"
        elif self.regret == 0:
            choice = f"the chosen trial has the best true value ({self.chosen:.5g})"
        else:
            choice = (f"the chosen trial's true value {self.chosen:.5g} is {self.regret:.3g} below "
                      f"the best trial's ({self.best:.5g})")
        return f"off-policy selection: {ranks}; {choice}"


def selection(estimates: list[float], truths: list[float], chosen: int | None) -> Selection:
    """The selection by `estimates` of the trials with true values `truths`, the sweep having
    chosen trial `chosen` (an index into both; None when it is not among them)."""
    spearman = None
    # A constant side has no ranks: scipy would warn and return NaN.
    if len(truths) >= MIN_TRIALS and len(set(estimates)) > 1 and len(set(truths)) > 1:
        spearman = float(stats.spearmanr(estimates, truths).statistic)
    return Selection(len(truths), spearman, None if chosen is None else truths[chosen], max(truths, default=None))


def report(client: mlflow.MlflowClient, parent_id: str, study: optuna.Study, objective: str,
           best: optuna.trial.FrozenTrial) -> None:
    """Log the study's selection on its parent run (metrics `ope_selection/*`, and its line as the
    tag `ope_selection`) and in one line; the trials whose run logged no true value are left out."""
    experiment = client.get_run(parent_id).info.experiment_id
    runs = mlflow.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent_id}'", output_format="list")
    truth_of = {run.info.run_id: run.data.metrics.get(TRUE_VALUE) for run in runs}
    scored = [(trial, truth_of.get(trial.user_attrs.get(RUN_ATTR))) for trial in study.get_trials(states=(COMPLETE,))]
    scored = [(trial, truth) for trial, truth in scored if truth is not None and math.isfinite(truth)]
    numbers = [trial.number for trial, _ in scored]
    found = selection([trial.value for trial, _ in scored], [truth for _, truth in scored],
                      numbers.index(best.number) if best.number in numbers else None)
    step = len(study.trials)
    client.log_metric(parent_id, "ope_selection/trials", found.trials, step=step)
    for name, value in (("spearman", found.spearman), ("regret", found.regret)):
        if value is not None:
            client.log_metric(parent_id, f"ope_selection/{name}", metrics.rounded(value), step=step)
    client.set_tag(parent_id, "ope_selection", found.line(objective))
    log.info(found.line(objective))
