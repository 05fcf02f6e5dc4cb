"""Off-policy estimators of a target policy's value (mean reward) from logged bandit feedback.

With n logged rounds (x_i, a_i, r_i, p_i), p_i the logging policy's probability of a_i,
a target policy pi, importance weights w_i = pi(a_i | x_i) / p_i and a reward model q(x, a):

  dm         mean_i sum_a pi(a | x_i) q(x_i, a)                  (direct method)
  ipw        mean_i w_i r_i                                      (inverse propensity weighting)
  snipw      sum_i w_i r_i / sum_i w_i                           (self-normalised IPW)
  dr         dm_i + w_i (r_i - q(x_i, a_i))                      (doubly robust)
  switch_dr  dr_i where w_i <= tau, else dm_i                    (Wang, Agarwal, Dudik, ICML 2017)
  sndr       dm_i + w_i (r_i - q(x_i, a_i)) / mean_j w_j         (self-normalised DR; Kallus, Uehara,
                                                                  NeurIPS 2019)
  dr_os      dm_i + λ w_i / (w_i² + λ) (r_i - q(x_i, a_i))       (DR with optimistic shrinkage; Su,
                                                                  Dimakopoulou, Krishnamurthy, Dudik, ICML 2020)
  sg_ipw     w_i / (1 - λ + λ w_i) r_i                           (sub-Gaussian IPW; Metelli, Russo,
                                                                  Restelli, NeurIPS 2021)
  switch_dr_tuned, dr_os_tuned
             switch_dr's tau, dr_os's λ chosen per log among candidates by a rule, as obp's
             estimators_tuning: "slope" (Su, Srinath, Krishnamurthy, ICML 2020, with Tucker and
             Lee's 2021 test): with the candidates' t-interval half-widths c_k (confidence 0.9),
             from the widest down, the last estimate V_k with |V_j - V_k| <= c_k + (sqrt 6 - 1) c_j
             for every wider j; "mse": the least var(terms) / n + B², B = |mean (w_i - w̃_i) (r_i
             - q(x_i, a_i))| + sqrt(2 mean w² log 20 / n) + 2 max w log 20 / (3 n), w̃ the shrunk weight

Definitions as in Open Bandit Pipeline (Saito et al., NeurIPS 2021 Datasets and Benchmarks),
and as there each estimator is a frozen dataclass whose fields are its hyperparameters. Every
estimator is a function of the same per-round terms, so a bootstrap resamples rounds once for
all of them.

A new estimator is a registered subclass of `Estimator` here, its hyperparameters' defaults in
conf/estimator_params.yaml (which src.evaluate and offline learning both read), and a test
(tests/evaluation/test_estimators.py adds one as an example). NumPy and SciPy only: src.metrics names the
estimators' metrics without TensorFlow or MLflow.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import ClassVar

import numpy as np
from scipy.special import stdtrit

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
    max_weights: np.ndarray  # 1 / p_i, the largest w_i any target could have: for bounds on the terms
    reward_model_range: tuple[float, float]  # of q over the logged contexts and every action

    def take(self, rows: np.ndarray) -> Terms:
        return Terms(self.dm[rows], self.weights[rows], self.rewards[rows], self.residuals[rows],
                     self.max_weights[rows], self.reward_model_range)


def terms(feedback: Feedback, target_probabilities: np.ndarray, reward_estimates: np.ndarray) -> Terms:
    """`target_probabilities` and `reward_estimates`: [n, num_actions] for the logged contexts."""
    rounds = np.arange(len(feedback))
    chosen = target_probabilities[rounds, feedback.actions]
    return Terms(dm=np.sum(target_probabilities * reward_estimates, axis=1),
                 weights=chosen / feedback.propensities,
                 rewards=feedback.rewards,
                 residuals=feedback.rewards - reward_estimates[rounds, feedback.actions],
                 max_weights=1 / feedback.propensities,
                 reward_model_range=(float(reward_estimates.min()), float(reward_estimates.max())))


def check_folds(folds, key: str) -> None:
    require(isinstance(folds, int) and not isinstance(folds, bool) and 1 <= folds <= 100, key, folds,
            "an integer in [1, 100]")


def cross_fitted_rewards(feedback: Feedback, num_actions: int, ridge: float, folds: int) -> np.ndarray:
    """q(x_i, a) for every logged round and action, [n, num_actions], each round's from a reward
    model fitted on the other `folds` - 1 folds (rounds i mod folds; cross-fitting, Chernozhukov
    et al. 2018): fitted on the round itself, q follows its noise, the residuals DR corrects by
    shrink towards 0 and DR collapses onto DM. `folds=1`: in-sample, the old way, for comparison."""
    if folds == 1:
        return predict_rewards(fit_reward_model(feedback, num_actions, ridge), feedback.contexts)
    fold_of = np.arange(len(feedback)) % folds
    estimates = np.empty((len(feedback), num_actions))
    for fold in range(folds):
        held = fold_of == fold
        model = fit_reward_model(feedback.take(np.flatnonzero(~held)), num_actions, ridge)
        estimates[held] = predict_rewards(model, feedback.contexts[held])
    return estimates


def deterministic_target_terms(feedback: Feedback, choices: np.ndarray, num_actions: int, ridge: float,
                               folds: int) -> Terms:
    """The terms for a deterministic target that picks `choices[i]` in round i, with the direct
    method's reward model cross-fitted on `folds` folds of the same rounds."""
    reward_estimates = cross_fitted_rewards(feedback, num_actions, ridge, folds)
    return terms(feedback, np.eye(num_actions)[choices], reward_estimates)


class Estimator(ABC):
    """An estimator of the target's value; each is a frozen dataclass of its hyperparameters."""

    name: ClassVar[str]
    # Whether it weights rounds by w_i, which logs without the logging policy's propensities
    # (NaN) cannot give.
    needs_propensities: ClassVar[bool] = True
    # Whether its estimate is the mean of per-round terms bounded by the rewards' range, the largest
    # weight and the reward model's range (src.evaluation.intervals.term_range): not so for a
    # self-normalised one, whose terms divide by the mean weight.
    bounded_terms: ClassVar[bool] = True

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
    bounded_terms: ClassVar[bool] = False

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


@register
@dataclass(frozen=True)
class SelfNormalizedDoublyRobust(Estimator):
    name: ClassVar[str] = "sndr"
    bounded_terms: ClassVar[bool] = False

    def estimate(self, t: Terms) -> float:
        total = t.weights.sum()
        return float(t.dm.mean() + np.sum(t.weights * t.residuals) / total) if total > 0 else float("nan")

    def per_round(self, t: Terms) -> np.ndarray:
        correction = self.estimate(t) - t.dm.mean()
        return t.dm + correction + t.weights * (t.residuals - correction) / t.weights.mean()


@register
@dataclass(frozen=True)
class DoublyRobustWithShrinkage(Estimator):
    """DR with each weight w shrunk to λ w / (w² + λ), at most sqrt(λ) / 2. None: the number of
    actions squared, which halves the weight every round has under uniform logging."""

    name: ClassVar[str] = "dr_os"
    lambda_: float | None = None

    def __post_init__(self):
        require(self.lambda_ is None or (isinstance(self.lambda_, int | float) and self.lambda_ >= 0), "lambda_",
                self.lambda_, ">= 0 (.inf: DR, 0: DM), or null for the number of actions squared")

    def for_actions(self, num_actions: int) -> Estimator:
        return self if self.lambda_ is not None else replace(self, lambda_=num_actions**2)

    def per_round(self, t: Terms) -> np.ndarray:
        # A weight of 0 stays 0, also at λ = 0, where the formula is 0 / 0 (obp's NaN).
        shrunk = t.weights if self.lambda_ == np.inf else np.divide(
            self.lambda_ * t.weights, t.weights**2 + self.lambda_, out=np.zeros_like(t.weights), where=t.weights != 0)
        return t.dm + shrunk * t.residuals


@register
@dataclass(frozen=True)
class SubGaussianInverseProbabilityWeighting(Estimator):
    """IPW with each weight w shrunk to w / (1 - λ + λ w), below 1 / λ. The default, 0, is IPW (as
    obp's): with no reward model to fall back on, a fixed shrinkage biases the estimate towards 0
    by a share of the value itself."""

    name: ClassVar[str] = "sg_ipw"
    lambda_: float = 0.0

    def __post_init__(self):
        require(isinstance(self.lambda_, int | float) and 0 <= self.lambda_ <= 1, "lambda_", self.lambda_,
                "in [0, 1] (0: IPW)")

    def per_round(self, t: Terms) -> np.ndarray:
        # A weight of 0 stays 0, also at λ = 1, where the formula is 0 / 0 (obp's NaN).
        shrunk = np.divide(t.weights, 1 - self.lambda_ + self.lambda_ * t.weights, out=np.zeros_like(t.weights),
                           where=t.weights != 0)
        return shrunk * t.rewards


# As obp 0.5.7's estimators_tuning with its defaults: both rules at confidence delta 0.1, the MSE
# rule with a high-probability bound on the bias (use_bias_upper_bound=True).
TUNING_DELTA = 0.1


@dataclass(frozen=True)
class TunedEstimator(Estimator):
    """`fixed` with its `hyperparameter` chosen among `candidates` on the rounds it is given (a
    bootstrap resample chooses again), by `rule`: "slope" or "mse", as obp's estimators_tuning."""

    fixed: ClassVar[type[Estimator]]
    hyperparameter: ClassVar[str]
    allowed: ClassVar[str]  # the rule a candidate must meet, as the error message gives it
    descending: ClassVar[bool]  # obp's order of the candidates, which decides between ties
    candidates: tuple = ()
    rule: str = "slope"

    def __post_init__(self):
        # Hydra gives a ListConfig; a tuple keeps the estimator hashable.
        candidates = tuple(self.candidates) if isinstance(self.candidates, Sequence) else ()
        require(len(candidates) > 0 and all(self.admits(value) for value in candidates), "candidates",
                self.candidates, f"a non-empty list of values of {self.hyperparameter} {self.allowed}")
        object.__setattr__(self, "candidates", candidates)
        require(self.rule in ("slope", "mse"), "rule", self.rule, "slope or mse")

    @staticmethod
    @abstractmethod
    def admits(value) -> bool:
        """Whether `value` is a valid candidate."""

    def at(self, value) -> Estimator:
        return self.fixed(**{self.hyperparameter: value})

    def selected(self, t: Terms) -> float:
        """The candidate `rule` chooses on the rounds of `t`."""
        candidates = sorted(self.candidates, reverse=self.descending)
        rounds = np.array([self.at(value).per_round(t) for value in candidates])
        n = len(t.rewards)
        if self.rule == "slope":
            widths = np.sqrt(rounds.var(axis=1) / (n - 1)) * stdtrit(n - 1, 1 - TUNING_DELTA)
            return candidates[_slope(rounds.mean(axis=1), widths)]
        # The bias estimate |mean (w - w̃)(r - q)|, DR's terms less these, plus obp's high-probability slack.
        bias = np.abs(np.mean(t.weights * t.residuals - (rounds - t.dm), axis=1))
        log_term = np.log(2 / TUNING_DELTA)
        bias_bound = (bias + np.sqrt(2 * np.mean(t.weights**2) * log_term / n)
                      + 2 * t.weights.max() * log_term / (3 * n))
        return candidates[int(np.argmin(rounds.var(axis=1) / n + bias_bound**2))]

    def per_round(self, t: Terms) -> np.ndarray:
        # The chosen estimator's terms: an interval on them leaves out that the choice varies too,
        # which the bootstrap's, choosing on each resample, does not.
        return self.at(self.selected(t)).per_round(t)


def _slope(values: np.ndarray, widths: np.ndarray) -> int:
    """The index SLOPE chooses (Su, Srinath, Krishnamurthy, ICML 2020, with Tucker and Lee's 2021
    test): from the widest interval down, the last estimate within reach of every wider one's."""
    order = np.argsort(widths)[::-1]
    for rank in range(1, len(order)):
        wider, candidate = order[:rank], order[rank]
        reach = widths[candidate] + (np.sqrt(6) - 1) * widths[wider]
        if not np.all(np.abs(values[wider] - values[candidate]) <= reach):
            return order[rank - 1]
    return order[-1]


@register
@dataclass(frozen=True)
class SwitchDoublyRobustTuned(TunedEstimator):
    """Switch-DR with tau chosen per log (obp's SwitchDoublyRobustTuning)."""

    name: ClassVar[str] = "switch_dr_tuned"
    fixed: ClassVar[type[Estimator]] = SwitchDoublyRobust
    hyperparameter: ClassVar[str] = "tau"
    allowed: ClassVar[str] = "> 0"
    descending: ClassVar[bool] = True
    candidates: tuple = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)

    @staticmethod
    def admits(value) -> bool:
        return isinstance(value, int | float) and value > 0


@register
@dataclass(frozen=True)
class DoublyRobustWithShrinkageTuned(TunedEstimator):
    """DR with optimistic shrinkage with λ chosen per log (obp's DoublyRobustWithShrinkageTuning)."""

    name: ClassVar[str] = "dr_os_tuned"
    fixed: ClassVar[type[Estimator]] = DoublyRobustWithShrinkage
    hyperparameter: ClassVar[str] = "lambda_"
    allowed: ClassVar[str] = ">= 0 (.inf: DR)"
    descending: ClassVar[bool] = False
    candidates: tuple = (1, 4, 25, 100, 400, 2500, 10000, 40000, 250000, 1000000, np.inf)

    @staticmethod
    def admits(value) -> bool:
        return isinstance(value, int | float) and value >= 0


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
