"""The promotion gate: its per-round terms, the coverage of its lower bound by simulation, and
the decision rule."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from src.evaluation import estimators, gate

DR = estimators.DoublyRobust()


def world(seed: int = 0, users: int = 300, dimension: int = 5, actions: int = 6):
    """A finite population of users whose mean reward is linear in their features (as the
    simulator's is), a champion that picks at random and a challenger that picks the best movie
    for half of the users: features [users, d], mean rewards [users, actions] and both choices."""
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(users, dimension)) / np.sqrt(dimension)
    means = features @ rng.normal(size=(actions, dimension)).T + rng.normal(3, 0.3, actions)
    champion = rng.integers(actions, size=users)
    challenger = np.where(rng.random(users) < 0.5, means.argmax(axis=1), champion)
    return features, means, champion, challenger


def logged(rng, features, means, champion, rounds: int, epsilon: float = 0.3, noise: float = 0.5):
    """Rounds of the champion exploring with probability `epsilon` (exact propensities), users
    uniform, noisy rewards; and each round's user."""
    users, actions = means.shape
    who = rng.integers(users, size=rounds)
    chosen = np.where(rng.random(rounds) < epsilon, rng.integers(actions, size=rounds), champion[who])
    propensities = epsilon / actions + (1 - epsilon) * (chosen == champion[who])
    rewards = means[who, chosen] + rng.normal(0, noise, rounds)
    return estimators.Feedback(features[who].astype(np.float32), chosen, rewards, propensities), who


def test_both_policies_share_one_reward_model_and_their_dr_terms_are_dudiks():
    features, means, champion, challenger = world()
    feedback, who = logged(np.random.default_rng(1), features, means, champion, 400)
    mine, theirs = gate.paired_terms(feedback, champion[who], challenger[who], 6, ridge=0.01)
    # Each is what off-policy evaluation computes for that policy alone (src.evaluate).
    for terms, choices in ((mine, champion), (theirs, challenger)):
        alone = estimators.deterministic_target_terms(feedback, choices[who], 6, ridge=0.01, folds=1)
        for name in ("dm", "weights", "rewards", "residuals"):
            assert np.allclose(getattr(terms, name), getattr(alone, name))
    # DR by hand: q(x, pi(x)) + 1{a = pi(x)} / p (r - q(x, a)), with q the per-movie ridge fit.
    q = estimators.predict_rewards(estimators.fit_reward_model(feedback, 6, 0.01), feedback.contexts)
    rounds = np.arange(len(feedback))
    picks = challenger[who]
    by_hand = q[rounds, picks] + (feedback.actions == picks) / feedback.propensities * (
        feedback.rewards - q[rounds, feedback.actions])
    verdict = gate.decide(feedback, champion[who], picks, 6, DR, samples=200)
    assert verdict.challenger == pytest.approx(by_hand.mean())
    # Cross-fitted: the model comes from other rounds, the terms are still the scored rounds'.
    other, _ = logged(np.random.default_rng(9), features, means, champion, 400)
    _, crossed = gate.paired_terms(feedback, champion[who], picks, 6, ridge=0.01, reward_rounds=other)
    q_other = estimators.predict_rewards(estimators.fit_reward_model(other, 6, 0.01), feedback.contexts)
    assert np.allclose(crossed.dm, q_other[rounds, picks]) and np.allclose(crossed.rewards, feedback.rewards)
    assert verdict.champion == pytest.approx(DR.estimate(mine))
    assert verdict.difference == pytest.approx(by_hand.mean() - DR.estimate(mine))


def test_the_bootstrap_resamples_the_same_rounds_for_both():
    features, means, champion, challenger = world()
    feedback, who = logged(np.random.default_rng(2), features, means, champion, 500)
    same = gate.decide(feedback, champion[who], champion[who], 6, DR, samples=300)
    # Identical policies differ by exactly 0 on every resample, so the bound is 0: not a gain.
    assert same.lower_bound == 0 and not same.promote
    # Resampled apart, the same policy would seem to lose to itself by chance.
    terms, _ = gate.paired_terms(feedback, champion[who], champion[who], 6, ridge=0.01)
    apart = [gate.paired_bootstrap(DR, terms, terms, 300, seed)[:, 0] for seed in (0, 1)]
    assert np.quantile(apart[1] - apart[0], 0.05) < -0.05


def test_the_lower_bound_covers_the_true_difference_at_its_confidence():
    """500 logs of 1,000 rounds from a world whose true difference is known exactly: the
    one-sided 95% bound lies below it in a share of them within the binomial's 99.9% range."""
    features, means, champion, challenger = world()
    users = np.arange(len(means))
    truth = means[users, challenger].mean() - means[users, champion].mean()
    rng = np.random.default_rng(3)
    replications = 500
    covered = 0
    for replication in range(replications):
        feedback, who = logged(rng, features, means, champion, 1000)
        verdict = gate.decide(feedback, champion[who], challenger[who], 6, DR, confidence=0.95, samples=400,
                              seed=replication)
        covered += verdict.lower_bound <= truth
    low, high = stats.binom.ppf([0.0005, 0.9995], replications, 0.95)
    assert low <= covered <= high, f"covered {covered} of {replications}; expected {low:.0f}..{high:.0f}"


def test_promotes_only_when_the_bound_clears_min_gain():
    features, means, champion, challenger = world()
    feedback, who = logged(np.random.default_rng(4), features, means, champion, 2000)
    verdict = gate.decide(feedback, champion[who], challenger[who], 6, DR, samples=500, seed=7)
    assert verdict.promote and verdict.lower_bound > 0
    assert verdict.reason.startswith("promoted: challenger - champion = +")
    assert f"95% lower bound {verdict.lower_bound:+.4f} > min_gain 0" in verdict.reason
    assert "\n" not in verdict.reason and "dr on 2,000 rounds" in verdict.reason
    # The same resamples (same seed) with the bar at the bound itself, or above it: refused.
    for min_gain in (verdict.lower_bound, verdict.lower_bound + 0.01):
        higher = gate.decide(feedback, champion[who], challenger[who], 6, DR, samples=500, seed=7,
                             min_gain=min_gain)
        assert higher.lower_bound == verdict.lower_bound and not higher.promote
        assert higher.reason.startswith("refused: ") and "not above min_gain" in higher.reason
    just_below = gate.decide(feedback, champion[who], challenger[who], 6, DR, samples=500, seed=7,
                             min_gain=verdict.lower_bound - 1e-9)
    assert just_below.promote
    # The worse one, the other way round, is refused.
    reversed_ = gate.decide(feedback, challenger[who], champion[who], 6, DR, samples=500, seed=7)
    assert not reversed_.promote and reversed_.lower_bound < 0


def test_an_asymptotic_bound_on_fewer_rounds_than_min_rounds_promotes_nothing():
    features, means, champion, challenger = world()
    feedback, who = logged(np.random.default_rng(4), features, means, champion, 60, noise=0.0)
    settings = {"samples": 500, "seed": 7, "reward_range": (means.min(), means.max())}
    for interval in gate.ASYMPTOTIC:
        alone = gate.decide(feedback, champion[who], challenger[who], 6, DR, interval=interval, **settings)
        floored = gate.decide(feedback, champion[who], challenger[who], 6, DR, interval=interval, min_rounds=61,
                              **settings)
        assert alone.promote and alone.lower_bound == floored.lower_bound and not floored.promote
        assert floored.reason.startswith("refused: ") and \
            f"on too few rounds for an asymptotic {interval} bound, which needs min_holdout 61 rounds" in floored.reason
        assert gate.decide(feedback, champion[who], challenger[who], 6, DR, interval=interval, min_rounds=60,
                           **settings).promote
    # A finite-sample bound holds at any size: no floor.
    bernstein = gate.decide(feedback, champion[who], challenger[who], 6, DR, interval="bernstein", min_rounds=61,
                            **settings)
    assert "too few" not in bernstein.reason


def test_a_higher_confidence_gives_a_lower_bound():
    features, means, champion, challenger = world()
    feedback, who = logged(np.random.default_rng(5), features, means, champion, 1000)
    bounds = [gate.decide(feedback, champion[who], challenger[who], 6, DR, confidence=level, samples=1000,
                          seed=0).lower_bound for level in (0.8, 0.95, 0.99)]
    assert bounds[0] > bounds[1] > bounds[2]


@pytest.mark.parametrize("name", list(estimators.ESTIMATORS))
def test_any_registered_estimator_can_gate(name):
    features, means, champion, challenger = world()
    feedback, who = logged(np.random.default_rng(6), features, means, champion, 3000)
    estimator = estimators.ESTIMATORS[name]()
    verdict = gate.decide(feedback, champion[who], challenger[who], 6, estimator, samples=200)
    assert verdict.estimator == name and verdict.interval == gate.LOWER_BOUNDS["bootstrap"]
    assert verdict.champion_interval[0] <= verdict.champion <= verdict.champion_interval[1]
    assert verdict.promote  # a gain of about 0.7 on rewards of about 3: every estimator sees it


def test_no_evidence_is_no_promotion():
    # The challenger picks a movie the logs never show: self-normalised IPW has no weight on it.
    feedback = estimators.Feedback(np.zeros((50, 2), np.float32), np.zeros(50, int), np.ones(50), np.ones(50))
    verdict = gate.decide(feedback, np.zeros(50, int), np.ones(50, int), 2, estimators.ESTIMATORS["snipw"](),
                          samples=100)
    assert np.isnan(verdict.lower_bound) and not verdict.promote
    assert verdict.reason.startswith("refused: ") and "lower bound +nan" in verdict.reason


@pytest.mark.parametrize("interval, least", [("t", 0.92), ("bernstein", 0.95)])
def test_the_t_and_bernstein_bounds_cover_the_true_difference(interval, least):
    """As the bootstrap's test: 300 logs, rewards in a known range. The t bound is asymptotic
    (about 95%: at least 92% in 300 logs with odds over 99%); Bernstein's is finite-sample, so
    conservative."""
    features, means, champion, challenger = world()
    users = np.arange(len(means))
    truth = means[users, challenger].mean() - means[users, champion].mean()
    rng = np.random.default_rng(8)
    covered = 0
    for _ in range(300):
        feedback, who = logged(rng, features, means, champion, 1000, noise=0.0)
        verdict = gate.decide(feedback, champion[who], challenger[who], 6, DR, interval=interval,
                              reward_range=(means.min(), means.max()))
        covered += verdict.lower_bound <= truth
        assert verdict.interval == gate.LOWER_BOUNDS[interval]
    assert covered / 300 >= least


def test_bernstein_is_the_most_cautious_and_still_sees_a_large_gain():
    features, means, champion, challenger = world()
    # Bernstein's bound pays for the weights' range (up to 20 here) in 1 / n: a gain of 0.71 needs
    # 20,000 rounds to clear 0 (at 5,000 its bound is -0.29, the others' +0.70).
    feedback, who = logged(np.random.default_rng(9), features, means, champion, 20_000, noise=0.0)
    verdicts = {interval: gate.decide(feedback, champion[who], challenger[who], 6, DR, interval=interval, seed=0,
                                      samples=500, reward_range=(means.min(), means.max()))
                for interval in gate.LOWER_BOUNDS}
    assert verdicts["bernstein"].lower_bound < verdicts["t"].lower_bound
    assert verdicts["bernstein"].lower_bound < verdicts["bootstrap"].lower_bound
    assert all(verdict.promote for verdict in verdicts.values())
    # Without bounded terms there is no Bernstein bound, so no evidence.
    snipw = gate.decide(feedback, champion[who], challenger[who], 6, estimators.ESTIMATORS["snipw"](),
                        interval="bernstein", reward_range=(means.min(), means.max()))
    assert np.isnan(snipw.lower_bound) and not snipw.promote
