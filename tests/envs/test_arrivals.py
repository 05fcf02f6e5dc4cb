"""Movies that arrive over time (env.arrivals on env=movielens_per_arm): the pool in the order of
first ratings, candidates drawn only from the movies arrived, uniformly, on both of the draw's
paths, the catalogue's size as a metric, a per-arm agent learning the newcomers from their
features, and bad schedules refused in one line."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from src import data, experiment, metrics
from src.envs import build_environment, movielens_per_arm
from src.errors import UserError

START, EVERY, BATCH, SIZE = 5, 3, 5, 4


@pytest.fixture
def arriving(make_config):
    def make(*overrides: str):
        cfg = make_config("env=movielens_per_arm", f"env.num_actions={SIZE}", "env.arrivals=first_rating",
                          f"env.arrivals_start={START}", f"env.arrivals_every={EVERY}", f"training.batch_size={BATCH}",
                          "env.num_movies=30",
                          *overrides)
        dataset = data.load(cfg.data)
        return cfg, dataset, build_environment(cfg, dataset)

    return make


def test_the_pool_is_in_the_order_of_first_ratings(arriving):
    _, dataset, env = arriving()
    first = dataset.ratings.groupby("item_id").timestamp.min()
    order = first.reindex(env.reward_model.movie_ids).to_numpy()
    assert (np.diff(order) >= 0).all() and not (np.diff(env.reward_model.movie_ids) > 0).all()


def test_candidates_come_from_the_movies_arrived_and_the_catalogue_grows(arriving):
    _, _, env = arriving()
    pool = len(env.reward_model.movie_ids)
    seen = collections.Counter()
    for step in range(12):
        env.reset()
        arrived = min(pool, START + step * BATCH // EVERY)
        candidates = env._candidates.numpy()
        assert int(env._arrived.numpy()) == arrived
        assert candidates.max() < arrived and all(len(set(row)) == SIZE for row in candidates)
        # Below SIZE^2 = 16 movies the top keys draw them, above it the redraw of repeats does.
        seen.update(candidates.ravel().tolist())
        np.testing.assert_array_equal(env.extra_metrics(np.zeros(BATCH, np.int32)).numpy(), np.full((BATCH, 1), arrived))
    assert set(range(START)) <= set(seen) <= set(range(min(pool, START + 11 * BATCH // EVERY)))


@pytest.mark.parametrize("steps", [1, 10])  # 6 movies: the top-keys path; 21: the redraw path
def test_each_path_draws_a_uniform_subset_of_the_movies_arrived(arriving, steps):
    _, _, env = arriving()
    counts = np.zeros(len(env.reward_model.movie_ids))
    draws = 400
    for _ in range(draws):
        env._steps.assign(steps)
        env.reset()
        np.add.at(counts, env._candidates.numpy().ravel(), 1)
    arrived = int(env._arrived.numpy())
    assert arrived == START + steps * BATCH // EVERY and (arrived < SIZE ** 2) == (steps == 1)
    assert counts[arrived:].sum() == 0
    # Each arrived movie is drawn with chance SIZE / arrived per user: counts within 5 binomial sds.
    expected = draws * BATCH * SIZE / arrived
    spread = np.sqrt(expected * (1 - SIZE / arrived))
    assert np.abs(counts[:arrived] - expected).max() < 5 * spread


def test_the_random_regret_is_averaged_over_the_arrival_period(arriving):
    _, _, env = arriving()
    model = env.reward_model
    assert model.arrival_sizes[0] == START and model.arrival_sizes[-1] == 30 and len(model.arrival_sizes) > 8

    def uniform_regret(pool: int) -> float:
        rewards = np.sort(model.rewards[:, :pool], axis=1)
        return float(np.mean(rewards @ movielens_per_arm.expected_top_weights(pool, SIZE, 1) - rewards.mean(axis=1)))

    assert model.random_policy_regret == pytest.approx(np.mean([uniform_regret(n) for n in model.arrival_sizes]))
    # The first catalogue's, by drawing: a uniform pick among SIZE of the first START movies.
    rng = np.random.default_rng(0)
    users = rng.integers(len(model.user_ids), size=20_000)
    sets = np.argsort(rng.random((20_000, START)), axis=1)[:, :SIZE]
    offered = model.rewards[users[:, None], sets]
    regrets = offered.max(axis=1) - offered[:, 0]
    assert abs(regrets.mean() - uniform_regret(START)) < 4 * regrets.std() / np.sqrt(len(regrets))


def test_a_per_arm_agent_learns_movies_as_they_arrive(arriving):
    """LinUCB scores a newcomer from its features: its regret per interaction in the last loops,
    the whole pool arrived, is well under a uniform pick's."""
    cfg, dataset, _ = arriving("agent=linucb", "env.arm_features=interaction", "training.loops=400")
    engine = experiment.assemble(cfg, dataset)
    history = metrics.RegretHistory(engine.interactions_per_loop)
    for chunk in engine.run(cfg.training.loops, cfg.training.chunk_loops):
        history.add(chunk)
    frame = history.frame()
    assert frame[metrics.CATALOGUE_SIZE].iloc[0] < 10 and frame[metrics.CATALOGUE_SIZE].iloc[-1] == 30
    late = frame[metrics.REGRET].iloc[-50:].mean()
    assert late < 0.5 * engine.environment.reward_model.random_policy_regret


@pytest.mark.parametrize("overrides, message", [
    (["env.arrivals_start=0"], "env.arrivals_start must be an integer between env.num_actions=4 (a full candidate set)"),
    (["env.arrivals_start=3"], "env.arrivals_start must be an integer between env.num_actions=4"),
    (["env.arrivals_start=31"], "and the pool's 30 movies"),
    (["env.arrivals_every=0"], "env.arrivals_every must be an integer >= 1"),
    (["env.arrivals=release"], "env.arrivals must be one of none, first_rating"),
])
def test_bad_schedules_are_one_line(arriving, overrides, message):
    with pytest.raises(UserError) as refused:
        arriving(*overrides)
    assert message in str(refused.value) and "\n" not in str(refused.value)
