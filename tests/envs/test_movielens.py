"""The MovieLens environment against a NumPy reference of TF-Agents' semantics."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from src.data import movielens
from src.envs.movielens import MovieLensEnvironment, build, build_reward_model
from src.errors import UserError


@pytest.fixture(scope="module")
def ratings(movielens_dir):
    return movielens.parse(movielens_dir[0]).ratings_matrix()


def reference(ratings, num_movies, rank):
    """TF-Agents' MovieLensPyEnvironment maths, transcribed."""
    matrix = ratings.toarray()[:, :num_movies]
    matrix = matrix[matrix.sum(axis=1) > 0]
    u, s, vh = np.linalg.svd(matrix, full_matrices=False)
    u_hat = u[:, :rank] * np.sqrt(s[:rank])
    v_hat = np.transpose(np.transpose(vh[:rank, :]) * np.sqrt(s[:rank]))
    return u_hat, u_hat @ v_hat


def test_reward_model_matches_tf_agents_maths(ratings):
    model = build_reward_model(ratings, num_movies=12, rank_k=5, reward_rank=None)
    u_hat, rewards = reference(ratings, 12, 5)
    np.testing.assert_allclose(model.rewards, rewards, atol=1e-10)
    np.testing.assert_allclose(np.abs(model.user_features), np.abs(u_hat), atol=1e-10)
    np.testing.assert_allclose(model.user_features @ model.movie_features.T, rewards, atol=1e-10)
    # The expected regret of uniform choice, by definition.
    assert model.random_policy_regret == pytest.approx(np.mean(rewards.max(1) - rewards.mean(1)))


def test_observation_rank_is_a_prefix_of_a_fixed_ground_truth(ratings):
    truth = build_reward_model(ratings, num_movies=12, rank_k=6, reward_rank=6)
    seen = build_reward_model(ratings, num_movies=12, rank_k=2, reward_rank=6)
    np.testing.assert_allclose(seen.rewards, truth.rewards)
    np.testing.assert_allclose(seen.user_features, truth.user_features[:, :2])
    lower = build_reward_model(ratings, num_movies=12, rank_k=2, reward_rank=None)
    assert not np.allclose(lower.rewards, truth.rewards)


def test_most_rated_selection_picks_the_most_rated_movies(ratings):
    model = build_reward_model(ratings, num_movies=5, rank_k=2, reward_rank=None, movie_selection="most_rated")
    counts = np.count_nonzero(ratings.toarray(), axis=0)
    assert sorted(counts[model.movie_ids - 1]) == sorted(counts)[-5:]
    np.testing.assert_array_equal(model.movie_ids, np.sort(model.movie_ids))


@pytest.mark.parametrize("kwargs, message", [
    ({"rank_k": 13}, "env.rank_k"),
    ({"rank_k": 0}, "env.rank_k"),
    ({"rank_k": 4, "reward_rank": 3}, "env.rank_k"),
    ({"rank_k": 4, "reward_rank": 13}, "env.reward_rank"),
    ({"rank_k": 2, "num_movies": 1}, "env.num_movies"),
    ({"rank_k": 2, "movie_selection": "newest"}, "env.movie_selection"),
])
def test_impossible_sizes_are_refused(ratings, kwargs, message):
    params = {"num_movies": 12, "reward_rank": None, **kwargs}
    with pytest.raises(UserError, match=message):
        build_reward_model(ratings, **params)


def test_environment_samples_distinct_users_and_pays_the_reconstructed_rating(ratings):
    model = build_reward_model(ratings, num_movies=12, rank_k=4, reward_rank=None)
    env = MovieLensEnvironment(model, batch_size=8, seed=3)
    time_step = env.reset()
    users = env._users.numpy()
    assert len(set(users)) == 8
    np.testing.assert_allclose(time_step.observation.numpy(), model.user_features[users], rtol=1e-6)
    action = tf.constant([0, 1, 2, 3, 4, 5, 6, 7], tf.int32)
    reward, optimal = (t.numpy() for t in env.outcome(action))
    np.testing.assert_allclose(reward, model.rewards[users, np.arange(8)])
    np.testing.assert_allclose(optimal, model.optimal_reward[users])
    stepped = env.step(action)
    np.testing.assert_allclose(stepped.reward.numpy(), reward, rtol=1e-6)


def test_environment_stream_depends_on_its_own_seed_only(ratings):
    model = build_reward_model(ratings, num_movies=12, rank_k=4, reward_rank=None)

    def users(seed):
        env = MovieLensEnvironment(model, batch_size=4, seed=seed)
        return [env.reset().observation.numpy() for _ in range(3)]

    first = users(7)
    tf.random.set_seed(123)  # the global seed must not matter
    np.testing.assert_array_equal(first, users(7))
    assert not np.array_equal(first, users(8))


def test_batch_larger_than_the_user_count_is_refused(movielens_dir):
    data = movielens.parse(movielens_dir[0])
    with pytest.raises(UserError, match="training.batch_size"):
        build(data, batch_size=1000, seed=0, num_movies=10, rank_k=2)
