"""Off-policy estimators of a target policy's value (mean reward) from logged bandit feedback.

With n logged rounds (x_i, a_i, r_i, p_i), p_i the logging policy's probability of a_i,
a target policy pi, importance weights w_i = pi(a_i | x_i) / p_i and a reward model q(x, a):

  dm         mean_i sum_a pi(a | x_i) q(x_i, a)                  (direct method)
  ipw        mean_i w_i r_i                                      (inverse propensity weighting)
  snipw      sum_i w_i r_i / sum_i w_i                           (self-normalised IPW)
  dr         dm_i + w_i (r_i - q(x_i, a_i))                      (doubly robust)
  switch_dr  dr_i where w_i <= tau, else dm_i                    (Wang, Agarwal, Dudik, ICML 2017)

Definitions as in Open Bandit Pipeline (Saito et al., NeurIPS 2021 Datasets and Benchmarks).
Every estimator is a function of per-round terms, so a bootstrap interval resamples rounds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from src.errors import UserError

ESTIMATORS = ("dm", "ipw", "snipw", "dr", "switch_dr")
NEEDS_PROPENSITIES = frozenset(ESTIMATORS) - {"dm"}


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


def estimate(name: str, t: Terms, rows: np.ndarray | slice = slice(None), switch_tau: float = np.inf) -> float:
    """Estimator `name` on the rounds `rows` of `t` (all by default; a bootstrap passes a resample)."""
    dm, weights, rewards, residuals = t.dm[rows], t.weights[rows], t.rewards[rows], t.residuals[rows]
    if name == "dm":
        return float(dm.mean())
    if name == "ipw":
        return float(np.mean(weights * rewards))
    if name == "snipw":
        total = weights.sum()
        return float(np.sum(weights * rewards) / total) if total > 0 else float("nan")
    if name == "dr":
        return float(np.mean(dm + weights * residuals))
    if name == "switch_dr":
        return float(np.mean(dm + np.where(weights <= switch_tau, weights * residuals, 0.0)))
    raise UserError(f"unknown estimator {name}; choose from {', '.join(ESTIMATORS)}")


def estimate_all(names, t: Terms, switch_tau: float, samples: int, confidence: float,
                 seed: int) -> pd.DataFrame:
    """Each estimator's value and a percentile-bootstrap interval over resampled rounds."""
    rng = np.random.default_rng(seed)
    n = len(t.rewards)
    draws = np.empty((samples, len(names)))
    for sample in range(samples):
        resample = rng.integers(n, size=n)
        draws[sample] = [estimate(name, t, resample, switch_tau) for name in names]
    tail = (1 - confidence) / 2
    low, high = np.nanquantile(draws, [tail, 1 - tail], axis=0)
    return pd.DataFrame({"estimator": list(names),
                         "estimate": [estimate(name, t, switch_tau=switch_tau) for name in names],
                         "ci_low": low, "ci_high": high})
