"""The per-arm MovieLens environment: specs, candidate sets, outcomes, exact random regret."""

from __future__ import annotations

import collections
import itertools

import numpy as np
import pytest
import tensorflow as tf
from tf_agents.bandits.specs import utils as bandit_spec_utils

from src import data
from src.envs import build_environment, movielens_per_arm
from src.errors import UserError

GLOBAL = bandit_spec_utils.GLOBAL_FEATURE_KEY
PER_ARM = bandit_spec_utils.PER_ARM_FEATURE_KEY


@pytest.fixture
def make_env(make_config):
    def make(*overrides: str):
        cfg = make_config("env=movielens_per_arm", "env.num_actions=4", *overrides)
        return build_environment(cfg, data.load(cfg.data))

    return make


def test_observation_holds_the_user_and_distinct_candidates(make_env):
    env = make_env("training.batch_size=5")
    model = env.reward_model
    observation = env.reset().observation
    assert observation[GLOBAL].shape == (5, 4) and observation[PER_ARM].shape == (5, 4, 4)
    assert env.action_spec().maximum == 3
    candidates = env._candidates.numpy()
    assert all(len(set(row)) == 4 for row in candidates)
    np.testing.assert_allclose(observation[GLOBAL], model.user_features[env._users.numpy()], rtol=1e-6)
    np.testing.assert_allclose(observation[PER_ARM], model.movie_features[candidates], rtol=1e-6)


def test_outcome_is_the_reward_model_on_the_candidates(make_env):
    env = make_env("training.batch_size=6")
    env.reset()
    action = tf.constant([0, 1, 2, 3, 0, 1])
    reward, optimal_reward = (t.numpy() for t in env.outcome(action))
    rewards = env.reward_model.rewards[env._users.numpy()[:, None], env._candidates.numpy()]
    np.testing.assert_allclose(reward, rewards[np.arange(6), action.numpy()])
    np.testing.assert_allclose(optimal_reward, rewards.max(axis=1))
    assert reward.dtype == np.float64
    np.testing.assert_allclose(env.step(action).reward, reward, rtol=1e-6)


def test_the_same_seed_gives_the_same_rounds(make_env):
    first, second, other = make_env(), make_env(), make_env("training.seed=1")
    rounds = [[e.reset().observation[PER_ARM].numpy() for _ in range(3)] for e in (first, second, other)]
    np.testing.assert_array_equal(rounds[0], rounds[1])
    assert not np.array_equal(rounds[0], rounds[2])


@pytest.mark.parametrize("size, top", [(1, 1), (2, 1), (3, 1), (6, 1), (3, 2), (4, 3), (6, 6)])
def test_expected_top_weights_match_enumeration(size, top):
    """The exact random references: E[sum of the top `top` of a uniform `size`-subset]."""
    values = np.random.default_rng(size + top).normal(size=6)
    brute = np.mean([sum(sorted(subset)[-top:]) for subset in itertools.combinations(values, size)])
    assert np.sort(values) @ movielens_per_arm.expected_top_weights(6, size, top) == pytest.approx(brute)


@pytest.mark.parametrize("num_actions", [3, 4])  # 3 of 10: drawn with repeats redrawn; 4: top k of keys
def test_candidate_sets_are_uniform_ordered_subsets(make_env, num_actions):
    env = make_env("training.batch_size=500", f"env.num_actions={num_actions}")
    rows = []
    for _ in range(20):
        env.reset()
        rows.append(env._candidates.numpy())
    rows = np.concatenate(rows)
    assert all(len(set(row)) == num_actions for row in rows)
    # Each movie is equally likely at each position, and each set of movies equally likely.
    by_position = np.stack([np.bincount(column, minlength=10) for column in rows.T])
    expected = len(rows) / 10
    assert np.abs(by_position - expected).max() < 5 * np.sqrt(expected)
    subsets = list(itertools.combinations(range(10), num_actions))
    counts = np.array([collections.Counter(map(tuple, np.sort(rows, axis=1)))[subset] for subset in subsets])
    expected = len(rows) / len(subsets)
    chi_square, dof = np.sum((counts - expected) ** 2 / expected), len(subsets) - 1
    assert chi_square < dof + 5 * np.sqrt(2 * dof)


@pytest.mark.parametrize("num_actions", [3, 4])
def test_random_policy_regret_matches_monte_carlo(make_env, num_actions):
    env = make_env("training.batch_size=500", f"env.num_actions={num_actions}")
    rng = tf.random.Generator.from_seed(7)
    regrets = []
    for _ in range(40):
        env.reset()
        action = rng.uniform([env.batch_size], maxval=num_actions, dtype=tf.int32)
        reward, optimal_reward = env.outcome(action)
        regrets.append((optimal_reward - reward).numpy())
    regrets = np.concatenate(regrets)
    standard_error = regrets.std() / np.sqrt(len(regrets))
    assert abs(regrets.mean() - env.reward_model.random_policy_regret) < 4 * standard_error


def test_bad_candidate_count_is_a_user_error(make_env):
    with pytest.raises(UserError, match=r"env.num_actions must be .* got 11"):
        make_env("env.num_actions=11")
