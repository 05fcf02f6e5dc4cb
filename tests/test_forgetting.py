"""Forgetting linear agents (agent.discount, agent.window): their statistics against the closed
forms, forgetting's effect where the world drifts and its price where it does not, and bad
settings refused in one line."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from src import config, data, experiment
from src.agents.linear import ArmStatistics, Forgetting
from src.errors import UserError

ARMS, DIM, RIDGE = 3, 4, 0.5


def updates(seed: int = 0, loops: int = 6, rows: int = 5):
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=(rows, DIM)), rng.integers(ARMS, size=rows).astype(np.int32), rng.normal(size=rows))
            for _ in range(loops)]


def fitted(forgetting: Forgetting, batches) -> ArmStatistics:
    statistics = ArmStatistics(ARMS, DIM, RIDGE, forgetting)
    for x, arm, reward in batches:
        statistics.update(tf.constant(x), tf.constant(arm), tf.constant(reward))
    return statistics


def assert_statistics(statistics: ArmStatistics, covariance: np.ndarray, data_vector: np.ndarray) -> None:
    np.testing.assert_allclose(statistics.covariance.numpy(), covariance, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(statistics.data_vector.numpy(), data_vector, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(statistics.theta.numpy(), np.linalg.solve(covariance, data_vector[..., None])[..., 0],
                               rtol=1e-9, atol=1e-12)
    # What the policies score from: the float32 copies, arms last.
    np.testing.assert_allclose(statistics.scoring_theta.numpy().reshape(DIM, ARMS).T, statistics.theta.numpy(),
                               rtol=1e-5, atol=1e-6)


def closed_form(batches, weights) -> tuple[np.ndarray, np.ndarray]:
    """lambda I + sum of weight x x' per arm, and sum of weight r x, over every row of `batches`
    with the weight of its loop (`weights[loop]`, one per row when it is an array)."""
    covariance = np.tile(RIDGE * np.eye(DIM), (ARMS, 1, 1))
    data_vector = np.zeros((ARMS, DIM))
    for (x, arm, reward), weight in zip(batches, weights):
        for row, (features, a, r) in enumerate(zip(x, arm, reward)):
            w = weight[row] if np.ndim(weight) else weight
            covariance[a] += w * np.outer(features, features)
            data_vector[a] += w * r * features
    return covariance, data_vector


def test_a_discount_weighs_each_loop_by_its_age():
    batches = updates()
    gamma = 0.8
    statistics = fitted(Forgetting(discount=gamma), batches)
    assert_statistics(statistics, *closed_form(batches, [gamma ** (len(batches) - 1 - t) for t in range(len(batches))]))


def test_a_window_keeps_exactly_the_last_rows():
    batches = updates(seed=1)  # 6 loops of 5 rows; a window of 12 holds the last 2 loops and 2 rows
    statistics = fitted(Forgetting(window=12), batches)
    kept = [np.zeros(5)] * 3 + [np.r_[0, 0, 0, 1, 1], np.ones(5), np.ones(5)]
    assert_statistics(statistics, *closed_form(batches, kept))


def test_without_forgetting_nothing_changes():
    batches = updates(seed=2)
    assert_statistics(fitted(Forgetting(), batches), *closed_form(batches, [1.0] * len(batches)))
    # A window longer than the run forgets nothing either.
    assert_statistics(fitted(Forgetting(window=1000), batches), *closed_form(batches, [1.0] * len(batches)))


def dynamic_regret(make_config, *overrides: str) -> float:
    cfg = make_config("agent=linucb", "agent.alpha=1.0", "env.num_movies=8", "training.loops=300", *overrides)
    engine = experiment.assemble(cfg, data.load(cfg.data))
    return sum(float(chunk.regret.sum()) for chunk in engine.run(cfg.training.loops, cfg.training.chunk_loops))


def test_forgetting_pays_where_tastes_switch_and_costs_where_they_do_not(make_config):
    # 300 loops of 16 interactions, the tastes switching every 1,600: three regimes (seeded: 0.35x).
    switching = ["env.drift=switch", "env.drift_period=1600"]
    stationary, discounted = (dynamic_regret(make_config, *switching, *extra) for extra in ([], ["agent.discount=0.9"]))
    assert discounted < 0.5 * stationary, (discounted, stationary)
    assert dynamic_regret(make_config) <= dynamic_regret(make_config, "agent.discount=0.9")


@pytest.mark.parametrize("setting, message", [
    ("agent.discount=0", "agent.discount must be in (0, 1] (1: no discount), got 0"),
    ("agent.discount=1.5", "agent.discount must be in (0, 1] (1: no discount), got 1.5"),
    ("agent.window=0", "agent.window must be a positive number of interactions, or null for every one, got 0"),
])
def test_bad_forgetting_is_refused_in_one_line(make_config, setting, message):
    cfg = make_config("agent=lints", setting)
    with pytest.raises(UserError) as refused:
        experiment.assemble(cfg, data.load(cfg.data))
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_discount_and_window_together_are_refused():
    with pytest.raises(UserError, match="agent.window must be null with agent.discount < 1"):
        Forgetting(discount=0.9, window=10)
    assert config.compose(["agent=linucb"]).agent.discount == 1.0  # the default forgets nothing
