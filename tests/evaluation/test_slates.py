"""The slate estimators and the policies' slate probabilities against enumeration over every
slate of a tiny case, their expectations against the exact value where each is unbiased (and
away from it where its assumption fails), two by simulation, and their relations: with one
position each is IPS (Cascade-DR: DR)."""

from __future__ import annotations

import itertools
import subprocess
import sys

import numpy as np
import pytest

from src.evaluation import estimators, slates
from src.evaluation.slates import SLATE_ESTIMATORS, SlateLog, SlateProbabilities
from src.paths import PROJECT_ROOT

N, K = 5, 3  # candidates, positions
SLATES = np.array(list(itertools.permutations(range(N), K)))  # every slate without repeats, 60
LOGGER_LOGITS = np.array([0.5, -1.0, 1.5, 0.0, -0.3])
TARGET_LOGITS = np.array([1.0, 0.2, -0.5, 2.0, 0.1])


def plackett_luce_probability(logits: np.ndarray, slate) -> float:
    """Straight from the definition: each pick a softmax over the candidates left."""
    weights, left, probability = np.exp(logits), list(range(len(logits))), 1.0
    for candidate in slate:
        probability *= weights[candidate] / weights[left].sum()
        left.remove(candidate)
    return probability


def enumerated(probabilities: np.ndarray, slates_: np.ndarray = SLATES) -> SlateProbabilities:
    """A policy's position marginals, prefixes and conditionals at every one of `slates_`, by
    summing its probabilities [len(slates_)] over the slates that agree."""
    size = slates_.shape[1]
    position = np.array([[probabilities[slates_[:, k] == s[k]].sum() for k in range(size)] for s in slates_])
    prefix = np.array([[probabilities[(slates_[:, :k + 1] == s[:k + 1]).all(axis=1)].sum() for k in range(size)]
                       for s in slates_])
    conditional = np.zeros((len(slates_), size, N))  # 0 after a prefix the policy never shows
    for i, s in enumerate(slates_):
        for k in range(size):
            agree = (slates_[:, :k] == s[:k]).all(axis=1)
            if probabilities[agree].sum() > 0:
                conditional[i, k] = [probabilities[agree & (slates_[:, k] == a)].sum() / probabilities[agree].sum()
                                     for a in range(N)]
    return SlateProbabilities(position, prefix, conditional)


LOGGER = np.array([plackett_luce_probability(LOGGER_LOGITS, s) for s in SLATES])
TARGET = np.array([plackett_luce_probability(TARGET_LOGITS, s) for s in SLATES])


def assert_same(mine: SlateProbabilities, exact: SlateProbabilities):
    np.testing.assert_allclose(mine.position, exact.position, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(mine.prefix, exact.prefix, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(mine.conditional, exact.conditional, rtol=1e-12, atol=1e-15)


def test_plackett_luce_probabilities_are_those_of_every_slate_summed():
    mine = slates.plackett_luce(np.tile(LOGGER_LOGITS, (len(SLATES), 1)), SLATES)
    assert np.isclose(LOGGER.sum(), 1.0)
    assert_same(mine, enumerated(LOGGER))
    np.testing.assert_allclose(mine.slate, LOGGER, rtol=1e-12)


def test_plackett_luce_marginals_hold_at_extreme_logits():
    """Weights 1e-26 apart: each position's marginals still sum to 1 over the candidates."""
    logits = np.array([0.0, -20.0, -40.0, -60.0, 10.0])
    position = slates.plackett_luce(np.tile(logits, (len(SLATES), 1)), SLATES).position
    for k in range(K):
        firsts = [np.flatnonzero(SLATES[:, k] == a)[0] for a in range(N)]
        assert np.isclose(position[firsts, k].sum(), 1.0, rtol=1e-12)
    exact = enumerated(np.array([plackett_luce_probability(logits, s) for s in SLATES])).position
    np.testing.assert_allclose(position, exact, rtol=1e-9, atol=1e-300)


def test_uniform_top_k_and_epsilon_greedy_probabilities_are_those_of_every_slate_summed():
    scores = np.array([0.3, 2.0, -1.0, 0.9, 1.1])
    best = (1, 4, 3)
    greedy = np.array([float(tuple(s) == best) for s in SLATES])
    uniform = np.full(len(SLATES), 1 / len(SLATES))
    mine_uniform = slates.uniform(N, SLATES)
    mine_greedy = slates.top_k(np.tile(scores, (len(SLATES), 1)), SLATES)
    assert_same(mine_uniform, enumerated(uniform))
    np.testing.assert_allclose(mine_greedy.position, enumerated(greedy).position)
    np.testing.assert_allclose(mine_greedy.prefix, enumerated(greedy).prefix)
    # A deterministic policy's conditional after a prefix it never shows: its best candidate left.
    assert slates.top_k(scores[None], np.array([[2, 0, 1]])).conditional[0, 1].argmax() == 1
    assert_same(slates.mixture(mine_uniform, mine_greedy, 0.3), enumerated(0.3 * uniform + 0.7 * greedy))
    assert_same(slates.plackett_luce(np.zeros((len(SLATES), N)), SLATES), mine_uniform)


def log_of(rewards: np.ndarray, logging: SlateProbabilities, slates_: np.ndarray = SLATES) -> SlateLog:
    return SlateLog(np.zeros((len(slates_), 1)), np.zeros((len(slates_), N, 1)), slates_, rewards, logging)


def looped(name: str, log: SlateLog, target: SlateProbabilities, q: np.ndarray) -> float:
    """Each estimator written out round by round, position by position; Cascade-DR in its
    recursive form (Kiyohara et al. 2022) on the conditionals, not the prefixes."""
    total = 0.0
    mu, pi = log.logging, target
    for i, (s, r) in enumerate(zip(log.slates, log.rewards)):
        size = len(s)
        if name == "sips":
            total += pi.prefix[i, -1] / mu.prefix[i, -1] * sum(r)
        elif name == "iips":
            total += sum(pi.position[i, k] / mu.position[i, k] * r[k] for k in range(size))
        elif name == "rips":
            total += sum(np.prod([pi.conditional[i, j, s[j]] / mu.conditional[i, j, s[j]] for j in range(k + 1)])
                         * r[k] for k in range(size))
        elif name == "pi":
            total += (sum(pi.position[i, k] / mu.position[i, k] for k in range(size)) - size + 1) * sum(r)
        else:
            value = 0.0
            for k in reversed(range(size)):
                expected = sum(pi.conditional[i, k, a] * q[i, k, a] for a in range(N))
                ratio = pi.conditional[i, k, s[k]] / mu.conditional[i, k, s[k]]
                value = expected + ratio * (r[k] - q[i, k, s[k]] + value)
            total += value
    return total / len(log)


@pytest.mark.parametrize("name", list(SLATE_ESTIMATORS))
def test_each_estimator_is_its_formula_written_out(name):
    rng = np.random.default_rng(3)
    rows = rng.choice(len(SLATES), size=40, p=LOGGER)
    log = log_of(rng.normal(size=(40, K)), enumerated(LOGGER).take(rows), SLATES[rows])
    target = slates.plackett_luce(np.tile(TARGET_LOGITS, (40, 1)), SLATES[rows])
    q = rng.normal(size=(40, K, N))
    assert np.isclose(SLATE_ESTIMATORS[name]().estimate(log, target, q), looped(name, log, target, q), rtol=1e-12)


# Expected slot rewards [len(SLATES), K] of three kinds (Swaminathan et al. 2017, McInerney et al. 2020):
_rng = np.random.default_rng(7)
ITEM_POSITION = _rng.uniform(0, 1, size=(K, N))  # E[r_k] = g(k, s_k)
ADDITIVE = ITEM_POSITION[np.arange(K), SLATES]  # item-position, hence additive
LOOKS, GOOD = np.array([1.0, 0.6, 0.4]), _rng.uniform(0.1, 0.9, size=N)
# The environment's cascade: position k clicked if looked at and liked, and nothing above was.
_clicks = LOOKS * GOOD[SLATES]
CASCADE = _clicks * np.cumprod(np.hstack([np.ones((len(SLATES), 1)), 1 - _clicks[:, :-1]]), axis=1)
# Position 0 sees the candidate below it: neither item-position nor a cascade.
LOOKS_BELOW = ADDITIVE + np.hstack([2.0 * GOOD[SLATES[:, 1:2]], np.zeros((len(SLATES), K - 1))])

UNBIASED = {"sips": ("additive", "cascade", "looks below"), "iips": ("additive",),
            "rips": ("additive", "cascade"), "cascade_dr": ("additive", "cascade"), "pi": ()}


@pytest.mark.parametrize("reward", ["additive", "cascade", "looks below"])
@pytest.mark.parametrize("name", list(SLATE_ESTIMATORS))
def test_expectation_is_the_value_exactly_where_the_estimator_assumes_the_reward_structure(name, reward):
    """E_mu[estimate] = sum over every slate of mu(s) x its term at the expected rewards (each
    estimator is linear in the rewards), against the target's value sum_s pi(s) sum_k E[r_k | s].
    Cascade-DR with a reward model far from the truth: unbiased whatever q."""
    expected = {"additive": ADDITIVE, "cascade": CASCADE, "looks below": LOOKS_BELOW}[reward]
    log = log_of(expected, enumerated(LOGGER))
    q = np.full((len(SLATES), K, N), 3.0)
    mean = LOGGER @ SLATE_ESTIMATORS[name]().per_round(log, enumerated(TARGET), q)
    value = TARGET @ expected.sum(axis=1)
    if reward in UNBIASED[name]:
        assert np.isclose(mean, value, rtol=1e-12)
    else:  # the bias is small here, but far above the rounding of the exact sums
        assert abs(mean - value) > 1e-3 * value


def test_pseudo_inverse_is_unbiased_for_an_additive_reward_under_a_factorised_logger():
    """A logger drawing each position independently (repeats allowed): mu(s) = prod_k mu_k(s_k)."""
    every = np.array(list(itertools.product(range(N), repeat=K)))
    per_position = np.random.default_rng(5).dirichlet(np.ones(N), size=K)
    mu = np.prod(per_position[np.arange(K), every], axis=1)
    logging = SlateProbabilities(per_position[np.arange(K), every], np.cumprod(per_position[np.arange(K), every],
                                 axis=1), np.broadcast_to(per_position, (len(every), K, N)))
    target_position = enumerated(TARGET).position  # the target (no repeats) at each slate of its own
    marginal = np.array([[target_position[SLATES[:, k] == a][0, k] for a in range(N)] for k in range(K)])
    target = SlateProbabilities(marginal[np.arange(K), every], np.zeros((len(every), K)), np.zeros((len(every), K, N)))
    rewards = ITEM_POSITION[np.arange(K), every]
    mean = mu @ slates.SlatePseudoInverse().per_round(log_of(rewards, logging, every), target)
    assert np.isclose(mean, TARGET @ ADDITIVE.sum(axis=1), rtol=1e-12)


def simulated(name: str, logging_probabilities: np.ndarray, expected: np.ndarray, seeds=400, rounds=100):
    """Means of `seeds` logs of `rounds` slates drawn from `logging_probabilities` (over SLATES),
    each slot's reward its expectation [len(SLATES), K] plus N(0, 1) noise: (mean over seeds,
    its standard error)."""
    rng = np.random.default_rng(11)
    rows = rng.choice(len(SLATES), size=seeds * rounds, p=logging_probabilities)
    rewards = expected[rows] + rng.standard_normal((len(rows), K))
    log = log_of(rewards, enumerated(logging_probabilities).take(rows), SLATES[rows])
    terms = SLATE_ESTIMATORS[name]().per_round(log, enumerated(TARGET).take(rows))
    means = terms.reshape(seeds, rounds).mean(axis=1)
    return means.mean(), means.std(ddof=1) / np.sqrt(seeds)


def test_standard_ips_is_unbiased_by_simulation_whatever_the_reward():
    mean, error = simulated("sips", LOGGER, LOOKS_BELOW)
    assert abs(mean - TARGET @ LOOKS_BELOW.sum(axis=1)) < 4 * error


def test_independent_ips_is_unbiased_by_simulation_on_an_item_position_reward_under_epsilon_greedy():
    greedy = np.array([float(tuple(s) == (2, 0, 3)) for s in SLATES])
    mean, error = simulated("iips", 0.5 / len(SLATES) + 0.5 * greedy, ADDITIVE)
    assert abs(mean - TARGET @ ADDITIVE.sum(axis=1)) < 4 * error


def test_with_one_position_every_estimator_is_ips_and_cascade_dr_is_dr():
    rng = np.random.default_rng(2)
    rounds, candidates = 300, 4
    logits, target_logits = rng.normal(size=(rounds, candidates)), rng.normal(size=(rounds, candidates))
    shown = np.argmax(logits + rng.gumbel(size=logits.shape), axis=1)[:, None]
    logging, target = slates.plackett_luce(logits, shown), slates.plackett_luce(target_logits, shown)
    rewards, q = rng.normal(size=(rounds, 1)), rng.normal(size=(rounds, 1, candidates))
    log = SlateLog(np.zeros((rounds, 1)), np.zeros((rounds, candidates, 1)), shown, rewards, logging)
    feedback = estimators.Feedback(np.zeros((rounds, 1)), shown[:, 0], rewards[:, 0], logging.slate)
    terms = estimators.terms(feedback, target.conditional[:, 0], q[:, 0])
    ips = estimators.InverseProbabilityWeighting().estimate(terms)
    for name in ("sips", "iips", "rips", "pi"):
        assert np.isclose(SLATE_ESTIMATORS[name]().estimate(log, target), ips, rtol=1e-12), name
    dr = estimators.DoublyRobust().estimate(terms)
    assert np.isclose(slates.SlateCascadeDoublyRobust().estimate(log, target, q), dr, rtol=1e-12)


def test_cascade_dr_without_a_reward_model_is_rips_and_on_policy_every_ips_is_the_mean():
    rng = np.random.default_rng(4)
    rows = rng.choice(len(SLATES), size=50, p=LOGGER)
    at = enumerated(LOGGER).take(rows)
    log = log_of(rng.normal(size=(50, K)), at, SLATES[rows])
    target = slates.plackett_luce(np.tile(TARGET_LOGITS, (50, 1)), SLATES[rows])
    assert np.isclose(slates.SlateCascadeDoublyRobust().estimate(log, target, np.zeros((50, K, N))),
                      slates.SlateRewardInteractionIPS().estimate(log, target), rtol=1e-12)
    for name in ("sips", "iips", "rips", "pi"):
        assert np.isclose(SLATE_ESTIMATORS[name]().estimate(log, at), log.rewards.sum(axis=1).mean(), rtol=1e-12)


def hybrid_log(rng, rounds=400, candidates=6, size=3, dimension=3):
    users, movies = rng.normal(size=(rounds, dimension)), rng.normal(size=(rounds, candidates, dimension))
    scores = np.einsum("id,ind->in", users, movies)  # the rating: u . m, linear in the hybrid features
    shown = np.argsort(rng.random((rounds, candidates)), axis=1)[:, :size]
    return SlateLog(users, movies, shown, np.take_along_axis(scores, shown, axis=1),
                    slates.uniform(candidates, shown)), scores


def test_cascade_q_fits_each_position_to_its_reward_plus_the_targets_next_pick():
    """Fitted Q evaluation: at the last position the rating itself (linear in the hybrid
    features); above it the least-squares fit to r_k + sum_a pi(a | prefix) q_k+1(a)."""
    log, scores = hybrid_log(np.random.default_rng(8))
    target = slates.top_k(scores, log.slates)
    q = slates.cascade_q(log, target, ridge=1e-9, folds=1)
    np.testing.assert_allclose(q[:, -1], scores, atol=1e-6)
    features = slates.hybrid_features(log.contexts, log.candidates)
    rows = np.arange(len(log))
    following = np.sum(target.conditional[:, -1] * q[:, -1], axis=1)
    fitted, *_ = np.linalg.lstsq(features[rows, log.slates[:, -2]], log.rewards[:, -2] + following, rcond=None)
    np.testing.assert_allclose(q[:, -2], features @ fitted, atol=1e-6)


def test_cascade_q_is_cross_fitted_each_round_from_the_other_folds():
    log, scores = hybrid_log(np.random.default_rng(9))
    target = slates.top_k(scores, log.slates)
    q = slates.cascade_q(log, target, ridge=0.01, folds=4)
    held = np.arange(len(log)) % 4 == 1
    changed = log.rewards.copy()
    changed[held] += 100.0
    q_changed = slates.cascade_q(SlateLog(log.contexts, log.candidates, log.slates, changed, log.logging), target,
                                 ridge=0.01, folds=4)
    np.testing.assert_allclose(q_changed[held], q[held])
    assert not np.allclose(q_changed[~held], q[~held])


def test_cascade_dr_needs_its_reward_model():
    log = log_of(np.zeros((len(SLATES), K)), enumerated(LOGGER))
    with pytest.raises(ValueError, match="cascade_q"):
        slates.SlateCascadeDoublyRobust().estimate(log, enumerated(TARGET))


def test_slates_is_arithmetic_without_tensorflow_or_mlflow():
    probe = ("import sys, src.evaluation.slates; loaded = [m for m in ('tensorflow', 'mlflow') if m in sys.modules]; "
             "assert not loaded, loaded")
    done = subprocess.run([sys.executable, "-c", probe], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_exact_value_of_a_top_k_target_is_its_average_over_every_candidate_set():
    """Users offered every N-subset of a pool of 7 alike (in any order: the target sorts them),
    each shown the target's top K: its value by enumeration beside the recursion's, both feedbacks."""
    rng = np.random.default_rng(3)
    users, pool, candidates, size = 4, 7, 4, 3
    rewards, scores = rng.normal(3, 1.5, size=(users, pool)), rng.normal(size=(users, pool))
    scores[0, :2] = 0.0  # a tie, broken towards the lower pool column as tf.math.top_k breaks it
    looks, threshold = np.array([1.0, 0.6, 0.3]), 3.0
    sums = {"scores": 0.0, "cascade": 0.0}
    subsets = list(itertools.combinations(range(pool), candidates))
    for user in range(users):
        for offered in subsets:
            shown = sorted(offered, key=lambda movie: (-scores[user, movie], movie))[:size]
            ratings = rewards[user, shown]
            clicks = looks * (ratings >= threshold)
            sums["scores"] += ratings.sum()
            sums["cascade"] += np.sum(clicks * np.cumprod(np.concatenate([[1.0], 1 - clicks[:-1]])))
    values = slates.exact_values(rewards, candidates, size, scores, looks, threshold)
    for feedback, total in sums.items():
        assert values[feedback] == pytest.approx(total / (users * len(subsets)), rel=1e-12)
