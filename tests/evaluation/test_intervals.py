"""Intervals (src.evaluation.intervals) against their textbook forms and by simulated coverage,
on fixed and on learning loggers; cross-fitting of the reward model."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from scipy import stats

from src.evaluation import estimators, intervals
from src.evaluation.estimators import ESTIMATORS

USERS, MOVIES, DIMENSIONS = 200, 5, 4


def population(seed: int = 0):
    """Users' features and every user's reward for every movie, in [0, 5], linear in the features."""
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(USERS, DIMENSIONS))
    rewards = np.clip(2.5 + features @ rng.normal(size=(DIMENSIONS, MOVIES)), 0, 5)
    return features, rewards


def fixed_log(features, rewards, rounds: int, epsilon: float, rng) -> tuple[estimators.Feedback, np.ndarray]:
    """Epsilon-greedy around movie 0 for everyone: the same logging policy in every round."""
    users = rng.integers(USERS, size=rounds)
    actions = np.where(rng.random(rounds) < epsilon, rng.integers(MOVIES, size=rounds), 0)
    propensities = epsilon / MOVIES + (1 - epsilon) * (actions == 0)
    return estimators.Feedback(features[users], actions, rewards[users, actions], propensities), users


def learning_log(features, rewards, rounds: int, epsilon: float, rng) -> tuple[estimators.Feedback, np.ndarray]:
    """Epsilon-greedy on its own running mean reward per movie: the logging policy changes as it logs,
    its propensities those it had at the time."""
    users = rng.integers(USERS, size=rounds)
    totals, counts = np.zeros(MOVIES), np.zeros(MOVIES)
    actions, propensities = np.empty(rounds, int), np.empty(rounds)
    for i, user in enumerate(users):
        greedy = int(np.argmax(np.where(counts > 0, totals / np.maximum(counts, 1), np.inf)))
        actions[i] = rng.integers(MOVIES) if rng.random() < epsilon else greedy
        propensities[i] = epsilon / MOVIES + (1 - epsilon) * (actions[i] == greedy)
        totals[actions[i]] += rewards[user, actions[i]]
        counts[actions[i]] += 1
    return estimators.Feedback(features[users], actions, rewards[users, actions], propensities), users


TARGET = np.arange(USERS) % MOVIES  # a deterministic target the loggers rarely follow


def coverage(log, interval: str, name: str, logs: int, rounds: int, epsilon: float = 0.5) -> float:
    features, rewards = population()
    truth = rewards[np.arange(USERS), TARGET].mean()
    estimator = ESTIMATORS[name]().for_actions(MOVIES)
    held = 0
    for seed in range(logs):
        feedback, users = log(features, rewards, rounds, epsilon, np.random.default_rng(seed))
        t = estimators.deterministic_target_terms(feedback, TARGET[users], MOVIES, ridge=0.01, folds=5)
        (row,) = intervals.estimate_all([estimator], t, interval, 0.9, reward_range=(0.0, 5.0), samples=100,
                                        seed=seed).itertuples()
        held += row.ci_low <= truth <= row.ci_high
    return held / logs


@pytest.mark.parametrize("interval, name, least", [
    ("t", "ipw", 0.83), ("t", "dr", 0.83),  # nominal 90%: 200 logs put a true 90% above 0.85 with 99% odds
    ("bernstein", "ipw", 0.88), ("anytime", "ipw", 0.88), ("anytime", "dr", 0.88),  # conservative: at least nominal
])
def test_intervals_cover_on_a_fixed_logger(interval, name, least):
    assert coverage(fixed_log, interval, name, logs=200, rounds=400) >= least


def test_the_anytime_sequence_covers_on_a_learning_logger():
    assert coverage(learning_log, "anytime", "ipw", logs=100, rounds=400) >= 0.88


def test_the_t_interval_is_students_and_the_others_are_wider():
    rng = np.random.default_rng(3)
    features, rewards = population()
    feedback, users = fixed_log(features, rewards, 500, 0.5, rng)
    t = estimators.deterministic_target_terms(feedback, TARGET[users], MOVIES, ridge=0.01, folds=5)
    terms = estimators.DoublyRobust().per_round(t)
    expected = stats.t.interval(0.95, len(terms) - 1, loc=terms.mean(), scale=stats.sem(terms))
    table = {interval: intervals.estimate_all([estimators.DoublyRobust()], t, interval, 0.95, reward_range=(0, 5),
                                              samples=200).iloc[0] for interval in intervals.INTERVALS}
    np.testing.assert_allclose([table["t"].ci_low, table["t"].ci_high], expected, rtol=1e-12)
    widths = {interval: row.ci_high - row.ci_low for interval, row in table.items()}
    assert widths["t"] < widths["bernstein"] and widths["t"] < widths["anytime"]
    assert all(row.interval == interval and row.ci_low <= row.estimate <= row.ci_high for interval, row in table.items())


def test_every_bounded_estimators_terms_lie_in_the_range_the_bounds_assume():
    rng = np.random.default_rng(4)
    features, rewards = population()
    feedback, users = learning_log(features, rewards, 300, 0.2, rng)
    t = estimators.deterministic_target_terms(feedback, TARGET[users], MOVIES, ridge=0.01, folds=5)
    low, high = intervals.term_range(t, (0.0, 5.0))
    for estimator in ESTIMATORS.values():
        if estimator.bounded_terms:
            terms = estimator().for_actions(MOVIES).per_round(t)
            assert low <= terms.min() and terms.max() <= high, estimator.name


def uniform_terms(rounds: int, seed: int) -> estimators.Terms:
    features, rewards = population()
    feedback, users = fixed_log(features, rewards, rounds, 1.0, np.random.default_rng(seed))
    return estimators.deterministic_target_terms(feedback, TARGET[users], MOVIES, ridge=0.01, folds=5)


def test_a_self_normalised_estimator_gets_no_bound_and_the_user_is_told():
    t = uniform_terms(2000, 5)
    row = intervals.estimate_all([estimators.SelfNormalizedInverseProbabilityWeighting()], t, "bernstein", 0.95,
                                 reward_range=(0, 5)).iloc[0]
    assert np.isnan(row.ci_low) and np.isnan(row.ci_high) and np.isfinite(row.estimate)
    (line,) = intervals.caveats("bernstein", ["dr", "snipw"], t, "random")
    assert "no bernstein bound for snipw" in line


def test_asymptotic_intervals_are_warned_of_on_a_learning_logger_a_small_sample_or_missing_weight():
    t = uniform_terms(2000, 5)  # about 400 rounds' worth of the target's, the weights averaging about 1
    assert intervals.caveats("t", ["dr"], t, "random") == []
    # The direct method weighs nothing: no weights to warn of, but its bias is in no interval.
    for interval in intervals.INTERVALS:
        (line,) = intervals.caveats(interval, ["dm"], uniform_terms(200, 5), "random")
        assert line.startswith(f"dm averages its reward model's predictions: its {interval} interval is about")
    assert intervals.caveats("t", ["dm", "dr"], t, "random") == []
    assert "dm averages" in intervals.caveats("anytime", ["dm", "dr"], t, "random")[0]
    (line,) = intervals.caveats("t", ["dr"], t, "epsilon_greedy")
    assert "epsilon_greedy, which learnt while it logged" in line and "interval=anytime" in line
    assert intervals.caveats("anytime", ["dr"], t, "epsilon_greedy") == []
    (line,) = intervals.caveats("bootstrap", ["dr"], uniform_terms(200, 5), "random")
    assert "effective sample of" in line and "under 100" in line
    # Weights that average 0.5 with little spread: half the target's value is in rounds not seen.
    halved = replace(t, weights=np.where(np.arange(2000) % 2 == 0, t.weights, 0.0))
    lines = intervals.caveats("t", ["dr"], halved, "random")
    assert any("standard errors from the 1 they average in expectation" in line for line in lines)
    assert intervals.caveats("bernstein", ["dr"], halved, "random") == []
    # One round that could weigh a tenth of the log: uniform logging over 5 movies, 40 rounds.
    few = replace(t.take(np.arange(40)), max_weights=np.full(40, 5.0))
    assert any("a round may weigh up to 5 (1 / the smallest propensity), over 10% of the 40 rounds" in line
               for line in intervals.caveats("t", ["dr"], few, "random"))
    # Rare rewards (clicks): no round the target matched earned one, so IPW's t interval is [0, 0].
    unclicked = replace(t, rewards=np.where(t.weights > 0, 0.0, t.rewards))
    (line,) = intervals.caveats("t", ["ipw"], unclicked, "random")
    assert "importance-weighted estimates are 0 and their t intervals have no width" in line


def test_the_effective_sample_size_counts_the_rounds_the_weights_leave():
    features, rewards = population()
    feedback, users = fixed_log(features, rewards, 1000, 1.0, np.random.default_rng(6))  # uniform logging
    t = estimators.deterministic_target_terms(feedback, TARGET[users], MOVIES, ridge=0.01, folds=1)
    # Weights MOVIES on the matching fifth of the rounds, 0 elsewhere: about n / MOVIES.
    assert intervals.effective_sample_size(t) == pytest.approx(1000 / MOVIES, rel=0.15)


def test_cross_fitting_predicts_each_fold_from_the_others():
    features, rewards = population()
    feedback, _ = fixed_log(features, rewards, 103, 0.5, np.random.default_rng(7))
    crossed = estimators.cross_fitted_rewards(feedback, MOVIES, 0.01, folds=4)
    fold = np.arange(103) % 4 == 2
    others = estimators.fit_reward_model(feedback.take(np.flatnonzero(~fold)), MOVIES, 0.01)
    np.testing.assert_allclose(crossed[fold], estimators.predict_rewards(others, feedback.contexts[fold]))
    in_sample = estimators.predict_rewards(estimators.fit_reward_model(feedback, MOVIES, 0.01), feedback.contexts)
    np.testing.assert_array_equal(estimators.cross_fitted_rewards(feedback, MOVIES, 0.01, folds=1), in_sample)
    assert not np.allclose(crossed, in_sample)


@pytest.mark.parametrize("folds", [0, 101, 2.5, True, "5"])
def test_bad_fold_counts_are_refused(folds):
    with pytest.raises(estimators.UserError, match="reward_model_folds"):
        estimators.check_folds(folds, "reward_model_folds")
