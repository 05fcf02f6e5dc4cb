"""Off-policy estimators of a target policy's value (mean reward) from logged bandit feedback.

With n logged rounds (x_i, a_i, r_i, p_i), p_i the logging policy's probability of a_i,
a target policy pi, importance weights w_i = pi(a_i | x_i) / p_i and a reward model q(x, a):

  dm         mean_i sum_a pi(a | x_i) q(x_i, a)                  (direct method)
  ipw        mean_i w_i r_i                                      (inverse propensity weighting)
  snipw      sum_i w_i r_i / sum_i w_i                           (self-normalised IPW)
  dr         dm_i + w_i (r_i - q(x_i, a_i))                      (doubly robust)
  switch_dr  dr_i where w_i <= tau, else dm_i                    (Wang, Agarwal, Dudik, ICML 2017)

Definitions as in Open Bandit Pipeline (Saito et al., NeurIPS 2021 Datasets and Benchmarks),
and as there each estimator is a frozen dataclass whose fields are its hyperparameters. Every
estimator is a function of the same per-round terms, so a bootstrap resamples rounds once for
all of them.

A new estimator is a registered subclass of `Estimator` here, its hyperparameters' defaults in
conf/estimator_params.yaml (which src.evaluate and offline learning both read), and a test
(tests/evaluation/test_estimators.py adds one as an example). NumPy and pandas only: src.metrics names the estimators' metrics
without TensorFlow or MLflow.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import ClassVar

import numpy as np
import pandas as pd

from src.errors import UserError, require

# An estimate is logged as `ope/<estimator>`, beside the simulator's exact value; an objective
# under this prefix makes a run learn offline (src.evaluation.offline).
PREFIX = "ope/"
TRUE_VALUE = f"{PREFIX}true_value"


def metric_name(estimator: str) -> str:
    return f"{PREFIX}{estimator}"


@dataclass(frozen=True)
class Feedback:
    """Logged rounds: contexts [n, d], actions [n], rewards [n], propensities [n] (NaN: unknown)."""

    contexts: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    propensities: np.ndarray

    def __len__(self) -> int:
        return len(self.actions)

    def take(self, rows: np.ndarray) -> Feedback:
        return Feedback(self.contexts[rows], self.actions[rows], self.rewards[rows], self.propensities[rows])


def fit_reward_model(feedback: Feedback, num_actions: int, ridge: float) -> np.ndarray:
    """One ridge regression of reward on context (plus an intercept) per action:
    [num_actions, d + 1] coefficients. Linear because the simulator's reward is linear in the
    user's full embedding; an action never logged predicts the logged mean reward."""
    design = np.hstack([feedback.contexts, np.ones((len(feedback), 1))]).astype(np.float64)
    width = design.shape[1]
    # Ridge towards the mean reward rather than 0: an unlogged action is then average, not zero.
    prior = np.zeros(width)
    prior[-1] = feedback.rewards.mean()
    order = np.argsort(feedback.actions, kind="stable")
    bounds = np.searchsorted(feedback.actions[order], np.arange(num_actions + 1))
    coefficients = np.empty((num_actions, width))
    for action in range(num_actions):
        rows = order[bounds[action]:bounds[action + 1]]
        x, r = design[rows], feedback.rewards[rows]
        coefficients[action] = np.linalg.solve(x.T @ x + ridge * np.eye(width), x.T @ r + ridge * prior)
    return coefficients


def predict_rewards(coefficients: np.ndarray, contexts: np.ndarray) -> np.ndarray:
    """q(x, a) for every context and action, [n, num_actions]."""
    design = np.hstack([contexts, np.ones((len(contexts), 1))]).astype(np.float64)
    return design @ coefficients.T


@dataclass(frozen=True)
class Terms:
    """Per-round quantities every estimator is a mean or a ratio of means of."""

    dm: np.ndarray  # sum_a pi(a | x_i) q(x_i, a)
    weights: np.ndarray  # w_i
    rewards: np.ndarray  # r_i
    residuals: np.ndarray  # r_i - q(x_i, a_i)

    def take(self, rows: np.ndarray) -> Terms:
        return Terms(self.dm[rows], self.weights[rows], self.rewards[rows], self.residuals[rows])


def terms(feedback: Feedback, target_probabilities: np.ndarray, reward_estimates: np.ndarray) -> Terms:
    """`target_probabilities` and `reward_estimates`: [n, num_actions] for the logged contexts."""
    rounds = np.arange(len(feedback))
    chosen = target_probabilities[rounds, feedback.actions]
    return Terms(dm=np.sum(target_probabilities * reward_estimates, axis=1),
                 weights=chosen / feedback.propensities,
                 rewards=feedback.rewards,
                 residuals=feedback.rewards - reward_estimates[rounds, feedback.actions])


def deterministic_target_terms(feedback: Feedback, choices: np.ndarray, num_actions: int, ridge: float) -> Terms:
    """The terms for a deterministic target that picks `choices[i]` in round i, with the direct
    method's reward model fitted on the same rounds."""
    reward_estimates = predict_rewards(fit_reward_model(feedback, num_actions, ridge), feedback.contexts)
    return terms(feedback, np.eye(num_actions)[choices], reward_estimates)


class Estimator(ABC):
    """An estimator of the target's value; each is a frozen dataclass of its hyperparameters."""

    name: ClassVar[str]
    # Whether it weights rounds by w_i, which logs without the logging policy's propensities
    # (NaN) cannot give.
    needs_propensities: ClassVar[bool] = True

    @abstractmethod
    def per_round(self, t: Terms) -> np.ndarray:
        """Per-round terms whose mean is the estimate; for a ratio estimator, its linearisation
        about the estimate (the delta method's). The t-interval and the empirical-Bernstein
        bound are computed on these."""

    def estimate(self, t: Terms) -> float:
        """The estimate on the rounds of `t` (a bootstrap passes a resample)."""
        return float(np.mean(self.per_round(t)))

    def for_actions(self, num_actions: int) -> Estimator:
        """This estimator for `num_actions` actions: the hyperparameters left None because their
        default depends on them, set."""
        return self


ESTIMATORS: dict[str, type[Estimator]] = {}


def register(estimator: type[Estimator]) -> type[Estimator]:
    """Offer `estimator` under its name to every command, metric and objective."""
    ESTIMATORS[estimator.name] = estimator
    return estimator


@register
@dataclass(frozen=True)
class DirectMethod(Estimator):
    name: ClassVar[str] = "dm"
    needs_propensities: ClassVar[bool] = False

    def per_round(self, t: Terms) -> np.ndarray:
        return t.dm


@register
@dataclass(frozen=True)
class InverseProbabilityWeighting(Estimator):
    name: ClassVar[str] = "ipw"

    def per_round(self, t: Terms) -> np.ndarray:
        return t.weights * t.rewards


@register
@dataclass(frozen=True)
class SelfNormalizedInverseProbabilityWeighting(Estimator):
    name: ClassVar[str] = "snipw"

    def estimate(self, t: Terms) -> float:
        total = t.weights.sum()
        return float(np.sum(t.weights * t.rewards) / total) if total > 0 else float("nan")

    def per_round(self, t: Terms) -> np.ndarray:
        value = self.estimate(t)
        return value + t.weights * (t.rewards - value) / t.weights.mean()


@register
@dataclass(frozen=True)
class DoublyRobust(Estimator):
    name: ClassVar[str] = "dr"

    def per_round(self, t: Terms) -> np.ndarray:
        return t.dm + t.weights * t.residuals


@register
@dataclass(frozen=True)
class SwitchDoublyRobust(Estimator):
    """DR on the rounds whose weight is at most `tau`, DM on the others. None: the number of
    actions, every round's weight under uniform logging."""

    name: ClassVar[str] = "switch_dr"
    tau: float | None = None

    def __post_init__(self):
        require(self.tau is None or (isinstance(self.tau, int | float) and self.tau > 0), "tau", self.tau,
                "> 0, or null for the number of actions")

    def for_actions(self, num_actions: int) -> Estimator:
        return self if self.tau is not None else replace(self, tau=num_actions)

    def per_round(self, t: Terms) -> np.ndarray:
        return t.dm + np.where(t.weights <= self.tau, t.weights * t.residuals, 0.0)


def configured(names: Iterable[str], params: Mapping, key: str) -> list[Estimator]:
    """The estimators `names`, with the hyperparameters `params` gives by estimator name (the
    config mapping `key`); those it does not give keep their defaults. A setting of an unknown
    estimator or hyperparameter is refused, whether or not `names` holds it."""
    require(isinstance(params, Mapping), key, params, "a mapping of estimator to hyperparameters")
    given = {name: _estimator(name, hyperparameters or {}, f"{key}.{name}")
             for name, hyperparameters in params.items()}
    return [given[name] if name in given else _estimator(name, {}, f"{key}.{name}") for name in names]


def _estimator(name: str, hyperparameters: Mapping, key: str) -> Estimator:
    """Estimator `name` with `hyperparameters`, configured at `key`."""
    if name not in ESTIMATORS:
        raise UserError(f"{key}: no such estimator; choose from {', '.join(ESTIMATORS)}", key=key)
    require(isinstance(hyperparameters, Mapping), key, hyperparameters, "a mapping of hyperparameter to value")
    known = [field.name for field in fields(ESTIMATORS[name])]
    unknown = [parameter for parameter in hyperparameters if parameter not in known]
    if unknown:
        raise UserError(f"{key}.{unknown[0]}: {name} has no such hyperparameter; it has "
                        f"{', '.join(known) or 'none'}", key=f"{key}.{unknown[0]}")
    try:
        return ESTIMATORS[name](**hyperparameters)
    except UserError as error:  # the estimator names its field; the user knows the config key
        raise UserError(f"{key}.{error}", key=f"{key}.{error.key}") from None


def needing_propensities(names: Iterable[str]) -> list[str]:
    """Those of the estimators `names` that weight rounds by the logging policy's propensities."""
    return [name for name in names if ESTIMATORS[name].needs_propensities]


def estimate_all(estimators: Sequence[Estimator], t: Terms, samples: int, confidence: float,
                 seed: int) -> pd.DataFrame:
    """Each estimator's value and a percentile-bootstrap interval over resampled rounds."""
    rng = np.random.default_rng(seed)
    n = len(t.rewards)
    draws = np.empty((samples, len(estimators)))
    for sample in range(samples):
        resample = t.take(rng.integers(n, size=n))
        draws[sample] = [estimator.estimate(resample) for estimator in estimators]
    tail = (1 - confidence) / 2
    low, high = np.nanquantile(draws, [tail, 1 - tail], axis=0)
    return pd.DataFrame({"estimator": [estimator.name for estimator in estimators],
                         "estimate": [estimator.estimate(t) for estimator in estimators],
                         "ci_low": low, "ci_high": high})
