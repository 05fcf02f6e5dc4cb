"""Confidence intervals for an off-policy estimate, each named by what it guarantees.

  t          Student's t on the estimator's per-round terms: asymptotic (central limit theorem),
             for rounds drawn independently from one logging policy
  bootstrap  percentile bootstrap over rounds (Efron and Tibshirani 1993, ch. 13): asymptotic,
             independent rounds, one logging policy; re-estimates on each resample, so it serves
             ratio estimators (snipw) as they are
  bernstein  empirical Bernstein (Maurer and Pontil, COLT 2009, Theorem 4, both sides at
             (1 - confidence) / 2): finite-sample, independent rounds whose terms lie in a range
             known beforehand
  anytime    the predictable plug-in empirical-Bernstein confidence sequence (Waudby-Smith and
             Ramdas, JRSSB 2023, Theorem 2, its running intersection): finite-sample and valid at
             every round at once, for terms whose mean given the past is the value, in a known range.
             IPW with the propensities the logger had at the time is such a sequence even when the
             logger learns while it logs (Waudby-Smith et al. 2022), which the others assume it does not.

The range the last two need is known beforehand for what the simulator logs: rewards within
`reward_range`, weights at most 1 / (the smallest logged propensity), the reward model's
predictions within their own range (`term_range`). Estimators whose estimate is not a mean of
such terms (self-normalised ones, `Estimator.bounded_terms`) get no such bound: NaN.
NumPy and SciPy only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from src.evaluation.estimators import ESTIMATORS, Estimator, Terms

INTERVALS = ("t", "bootstrap", "bernstein", "anytime")
# The one agent whose logging policy does not change as it logs: uniform at random.
FIXED_LOGGER = "random"
ASYMPTOTIC = ("t", "bootstrap")
# Below this effective sample, or with the weights' mean this many standard errors from 1, the
# asymptotic intervals under-covered in the coverage study: warned of.
MIN_EFFECTIVE_SAMPLE = 100
MAX_WEIGHT_MEAN_GAP = 2.0
# A round that may weigh more than this share of the log's rounds moves the estimate by that share
# of a reward on its own: no normal approximation holds while such rounds are seen once or never.
MAX_WEIGHT_SHARE = 0.1


def term_range(t: Terms, reward_range: tuple[float, float]) -> tuple[float, float]:
    """Bounds on any estimator's per-round term (DM, IPW, DR and their clipped, switched or
    shrunk variants, whose weights lie in [0, w]): rewards in `reward_range`, weights at most the
    largest one possible for a deterministic target, the reward model's predictions in [q_low, q_high]."""
    low, high = reward_range
    heaviest = float(np.max(t.max_weights))
    q_low, q_high = t.reward_model_range
    corners = [q_low, q_high, heaviest * low, heaviest * high, 0.0,
               q_low + heaviest * min(0.0, low - q_high), q_high + heaviest * max(0.0, high - q_low)]
    return min(corners), max(corners)


def t_lower(terms: np.ndarray, confidence: float, bounds: tuple[float, float] | None = None) -> float:
    """One-sided Student's t lower bound on the terms' mean."""
    n = len(terms)
    return terms.mean() - stats.t.ppf(confidence, n - 1) * terms.std(ddof=1) / np.sqrt(n)


def bernstein_lower(terms: np.ndarray, confidence: float, bounds: tuple[float, float]) -> float:
    """Maurer and Pontil's Theorem 4 (delta = 1 - confidence) on the terms scaled to [0, 1]."""
    n, width = len(terms), bounds[1] - bounds[0]
    scaled = (terms - bounds[0]) / width
    log_term = np.log(2 / (1 - confidence))
    return terms.mean() - width * (np.sqrt(2 * scaled.var(ddof=1) * log_term / n) + 7 * log_term / (3 * (n - 1)))


def two_sided(lower, terms: np.ndarray, confidence: float, bounds: tuple[float, float]) -> tuple[float, float]:
    """Both one-sided bounds, each at (1 + confidence) / 2: the upper is the lower of the negated terms."""
    each = (1 + confidence) / 2
    return lower(terms, each, bounds), -lower(-terms, each, (-bounds[1], -bounds[0]))


def anytime(terms: np.ndarray, confidence: float, bounds: tuple[float, float]) -> tuple[float, float]:
    """The PrPl-EB confidence sequence (Waudby-Smith and Ramdas 2023, eq. 13, truncation 1/2) over
    the terms in log order, scaled to [0, 1]; the intersection of its intervals at every round."""
    width = bounds[1] - bounds[0]
    x = (terms - bounds[0]) / width
    n, alpha = len(x), 1 - confidence
    rounds = np.arange(1, n + 1)
    means = (0.5 + np.cumsum(x)) / (rounds + 1)  # mu_hat_t, a prior of 1/2 on one pseudo-round
    previous_means = np.concatenate([[0.5], means[:-1]])
    variances = (0.25 + np.cumsum((x - means) ** 2)) / (rounds + 1)
    previous_variances = np.concatenate([[0.25], variances[:-1]])
    log_term = np.log(2 / alpha)
    lambdas = np.minimum(np.sqrt(2 * log_term / (previous_variances * rounds * np.log1p(rounds))), 0.5)
    psi = (-np.log1p(-lambdas) - lambdas) / 4
    weight = np.cumsum(lambdas)
    centre = np.cumsum(lambdas * x) / weight
    margin = (log_term + np.cumsum(4 * (x - previous_means) ** 2 * psi)) / weight
    low, high = np.max(np.maximum(centre - margin, 0.0)), np.min(np.minimum(centre + margin, 1.0))
    return bounds[0] + low * width, bounds[0] + high * width


def bootstrap(estimators: Sequence[Estimator], t: Terms, samples: int, confidence: float,
              seed: int) -> np.ndarray:
    """[len(estimators), 2] percentile intervals, every estimator on the same resamples."""
    rng = np.random.default_rng(seed)
    n = len(t.rewards)
    draws = np.empty((samples, len(estimators)))
    for sample in range(samples):
        resample = t.take(rng.integers(n, size=n))
        draws[sample] = [estimator.estimate(resample) for estimator in estimators]
    tail = (1 - confidence) / 2
    return np.nanquantile(draws, [tail, 1 - tail], axis=0).T


def of_means(terms: dict[str, np.ndarray], interval: str, confidence: float, samples: int = 200,
             seed: int = 0) -> pd.DataFrame:
    """Estimates that are the means of their per-round `terms` (by estimator name), with the t or
    the percentile bootstrap `interval` (every estimator on the same resamples), where no range of
    the terms is known beforehand for the finite-sample ones: estimator, estimate, interval,
    ci_low, ci_high."""
    if interval == "t":
        bounds = [two_sided(t_lower, values, confidence, (-np.inf, np.inf)) for values in terms.values()]
    else:
        rng = np.random.default_rng(seed)
        stacked = np.stack(list(terms.values()), axis=1)
        draws = np.array([stacked[rng.integers(len(stacked), size=len(stacked))].mean(axis=0) for _ in range(samples)])
        tail = (1 - confidence) / 2
        bounds = np.quantile(draws, [tail, 1 - tail], axis=0).T
    bounds = np.asarray(bounds)
    return pd.DataFrame({"estimator": list(terms), "estimate": [float(np.mean(values)) for values in terms.values()],
                         "interval": interval, "ci_low": bounds[:, 0], "ci_high": bounds[:, 1]})


def estimate_all(estimators: Sequence[Estimator], t: Terms, interval: str, confidence: float, *,
                 reward_range: tuple[float, float], samples: int = 200, seed: int = 0) -> pd.DataFrame:
    """Each estimator's estimate and its `interval` at `confidence`: estimator, estimate,
    interval, ci_low, ci_high."""
    if interval == "bootstrap":
        bounds = bootstrap(estimators, t, samples, confidence, seed)
    else:
        support = term_range(t, reward_range)
        bounds = np.array([interval_of(interval, estimator, t, confidence, support) for estimator in estimators])
    return pd.DataFrame({"estimator": [estimator.name for estimator in estimators],
                         "estimate": [estimator.estimate(t) for estimator in estimators],
                         "interval": interval, "ci_low": bounds[:, 0], "ci_high": bounds[:, 1]})


def interval_of(interval: str, estimator: Estimator, t: Terms, confidence: float,
                support: tuple[float, float]) -> tuple[float, float]:
    """The two-sided `interval` (not the bootstrap) of `estimator` on `t`, its terms within `support`."""
    terms = estimator.per_round(t)
    if interval == "t":
        return two_sided(t_lower, terms, confidence, support)
    if not estimator.bounded_terms:
        return np.nan, np.nan
    if interval == "bernstein":
        return two_sided(bernstein_lower, terms, confidence, support)
    return anytime(terms, confidence, support)


def effective_sample_size(t: Terms) -> float:
    """Kish's effective sample size of the importance weights, (sum w)^2 / sum w^2: how many
    rounds of the target's own the log is worth to the weighting estimators."""
    squares = float(np.sum(t.weights ** 2))
    return float(np.sum(t.weights)) ** 2 / squares if squares > 0 else 0.0


def weight_mean_gap(t: Terms) -> float:
    """How many standard errors the importance weights' mean lies from 1, its expectation under
    any logger that gives every movie a chance: far off, the log has not yet seen the rare
    heavy-weight rounds that carry part of the target's value."""
    spread = t.weights.std(ddof=1)
    return float((t.weights.mean() - 1) / (spread / np.sqrt(len(t.weights)))) if spread > 0 else 0.0


def caveats(interval: str, names: Sequence[str], t: Terms, logging_agent: str,
            monte_carlo_draws: int = 0) -> list[str]:
    """One line per reason the `interval` of estimators `names` does not carry its guarantee on
    the rounds of `t`, collected by `logging_agent` (every agent here but `random` learns while it
    logs). The thresholds are those under which the coverage study (docs/ope_coverage.md) saw
    the asymptotic intervals fail."""
    lines = []
    if interval != "anytime" and logging_agent != FIXED_LOGGER:
        lines.append(f"the logs were collected by {logging_agent}, which learnt while it logged; the {interval} "
                     f"interval assumes one fixed logging policy and may not cover the true value "
                     f"(docs/ope_coverage.md); interval=anytime holds on such logs")
    weighted = [name for name in names if ESTIMATORS[name].needs_propensities]
    if interval in ASYMPTOTIC and weighted:
        effective, gap, heaviest = effective_sample_size(t), weight_mean_gap(t), float(np.max(t.max_weights))
        if effective < MIN_EFFECTIVE_SAMPLE:
            lines.append(f"the importance weights leave an effective sample of {effective:.0f} rounds, under "
                         f"{MIN_EFFECTIVE_SAMPLE}: too few for the {interval} interval's normal approximation "
                         f"(docs/ope_coverage.md); interval=bernstein or anytime hold, wider")
        if abs(gap) > MAX_WEIGHT_MEAN_GAP:
            lines.append(f"the importance weights average {t.weights.mean():.3f}, {abs(gap):.1f} standard errors from "
                         f"the 1 they average in expectation: the log lacks the rare rounds that carry part of the "
                         f"target's value, which the {interval} interval cannot count; interval=bernstein or anytime hold")
        if not np.any(t.weights * t.rewards):
            lines.append(f"no logged round where the target could choose as the logger did earned a reward: the "
                         f"importance-weighted estimates are 0 and their {interval} intervals have no width, which "
                         f"says only that the value is small next to 1 / the rounds matched")
        if heaviest > MAX_WEIGHT_SHARE * len(t.weights):
            lines.append(f"a round may weigh up to {heaviest:,.0f} (1 / the smallest propensity), over "
                         f"{MAX_WEIGHT_SHARE:.0%} of the {len(t.weights):,} rounds: the {interval} interval's normal "
                         f"approximation does not hold (docs/ope_coverage.md); interval=bernstein or anytime hold")
    if monte_carlo_draws:
        smallest = 1 / float(np.max(t.max_weights))
        error = np.sqrt((1 - smallest) / (smallest * monte_carlo_draws))
        lines.append(f"the propensities are Monte-Carlo estimates from {monte_carlo_draws} draws of {logging_agent}'s "
                     f"sampling: the smallest, {smallest:.4f}, is off by about {error:.0%} (one standard error), and "
                     f"no interval counts that; more agent.propensity_draws shrink it")
    unweighted = [name for name in names if not ESTIMATORS[name].needs_propensities]
    # Said where the interval's label promises a guarantee, or where nothing else is reported.
    if unweighted and (interval in ("bernstein", "anytime") or not weighted):
        lines.append(f"{', '.join(unweighted)} averages its reward model's predictions: its {interval} interval is "
                     f"about their spread over the rounds, not about how far the model is from the truth (its bias), "
                     f"which no interval here covers, whichever the kind")
    if interval in ("bernstein", "anytime"):
        unbounded = [name for name in names if not ESTIMATORS[name].bounded_terms]
        if unbounded:
            lines.append(f"no {interval} bound for {', '.join(unbounded)}: a self-normalised estimate is not a "
                         f"mean of bounded terms (NaN); interval=t or bootstrap give one")
    return lines
