"""The real-ratings MovieLens environment: the held-out split, rated candidate sets, real
rewards, exact random regret, and its bad input."""

from __future__ import annotations

import mlflow
import numpy as np
from scipy import sparse
import pytest
import tensorflow as tf
from tf_agents.bandits.specs import utils as bandit_spec_utils

from src import data, experiment, metrics, training
from src.envs import build_environment, movielens_ratings
from src.errors import UserError

GLOBAL = bandit_spec_utils.GLOBAL_FEATURE_KEY
PER_ARM = bandit_spec_utils.PER_ARM_FEATURE_KEY


@pytest.fixture
def make_env(make_config):
    def make(*overrides: str):
        cfg = make_config("env=movielens_ratings", "env.num_movies=null", "env.num_actions=4", *overrides)
        dataset = data.load(cfg.data)
        return build_environment(cfg, dataset), dataset

    return make


def test_the_split_cuts_each_users_ratings_in_two_by_the_share():
    matrix = np.random.default_rng(0).integers(1, 6, size=(40, 25)) * (np.random.default_rng(1).random((40, 25)) < 0.5)
    split = movielens_ratings.split_ratings(matrix, 0.3, seed=5)
    assert np.array_equal(split.features + split.rewards, matrix)
    assert not np.any((split.features > 0) & (split.rewards > 0))
    np.testing.assert_array_equal(np.count_nonzero(split.features, axis=1),
                                  np.rint(0.3 * np.count_nonzero(matrix, axis=1)))
    again, other = movielens_ratings.split_ratings(matrix, 0.3, seed=5), movielens_ratings.split_ratings(matrix, 0.3, 6)
    assert np.array_equal(again.features, split.features) and not np.array_equal(other.features, split.features)


def test_no_reward_rating_reaches_the_features():
    """Rewrite every held-out rating: the embeddings stay exactly the same, the rewards follow."""
    rng = np.random.default_rng(2)
    matrix = rng.integers(1, 6, size=(50, 30)) * (rng.random((50, 30)) < 0.6)
    kwargs = dict(num_actions=3, rank_k=4, feature_share=0.5, split_seed=0)
    model = movielens_ratings.build_rated_candidates_model(sparse.csr_array(matrix.astype(float)), **kwargs)
    held_out = movielens_ratings.split_ratings(matrix, 0.5, 0).rewards > 0
    rewritten = np.where(held_out, 6 - matrix, matrix).astype(float)
    changed = movielens_ratings.build_rated_candidates_model(sparse.csr_array(rewritten), **kwargs)
    np.testing.assert_array_equal(changed.user_features, model.user_features)
    np.testing.assert_array_equal(changed.movie_features, model.movie_features)
    rows = model.user_ids - 1
    np.testing.assert_array_equal(changed.rewards, 6 - model.rewards)
    np.testing.assert_array_equal(~np.isnan(model.rewards), held_out[rows])
    # A feature rating does move the embeddings: the check above can fail.
    features_changed = np.where(~held_out & (matrix > 0), 6 - matrix, matrix).astype(float)
    moved = movielens_ratings.build_rated_candidates_model(sparse.csr_array(features_changed), **kwargs)
    assert not np.allclose(moved.user_features, model.user_features)


def test_rounds_offer_distinct_movies_the_user_rated_and_pay_the_real_rating(make_env):
    env, dataset = make_env("training.batch_size=6")
    model = env.reward_model
    held_out = movielens_ratings.split_ratings(dataset.ratings_matrix().toarray(), 0.5, 0).rewards
    for _ in range(5):
        observation = env.reset().observation
        users, candidates = env._users.numpy(), env._candidates.numpy()
        assert all(len(set(row)) == 4 for row in candidates)
        np.testing.assert_allclose(observation[GLOBAL], model.user_features[users], rtol=1e-6)
        movies = model.movie_features[candidates]  # and their products with the user's: arm_features=interaction
        np.testing.assert_allclose(observation[PER_ARM], np.concatenate(
            [movies, movies * model.user_features[users, None]], axis=-1), rtol=1e-5, atol=1e-6)
        real = held_out[model.user_ids[users, None] - 1, model.movie_ids[candidates] - 1]
        assert np.all(real > 0)  # every candidate was really rated, in the held-out part
        action = tf.constant([0, 1, 2, 3, 0, 1])
        reward, optimal_reward = (t.numpy() for t in env.outcome(action))
        np.testing.assert_array_equal(reward, real[np.arange(6), action.numpy()])
        np.testing.assert_array_equal(optimal_reward, real.max(axis=1))


def test_liked_rewards_are_one_for_a_rating_at_the_threshold(make_env):
    ratings, _ = make_env()
    liked, _ = make_env("env.reward=liked", "env.liked_threshold=4")
    rated = ~np.isnan(ratings.reward_model.rewards)
    np.testing.assert_array_equal(liked.reward_model.rewards[rated], ratings.reward_model.rewards[rated] >= 4)


def test_users_with_too_few_held_out_ratings_are_skipped_and_counted(make_env):
    env, dataset = make_env("env.num_actions=9")
    held_out = np.count_nonzero(movielens_ratings.split_ratings(dataset.ratings_matrix().toarray(), 0.5, 0).rewards, axis=1)
    np.testing.assert_array_equal(env.reward_model.user_ids, np.flatnonzero(held_out >= 9) + 1)
    assert env.reward_model.skipped_users == np.count_nonzero((held_out > 0) & (held_out < 9)) > 0


def test_random_policy_regret_matches_monte_carlo(make_env):
    env, _ = make_env("training.batch_size=500")
    rng = tf.random.Generator.from_seed(7)
    regrets = []
    for _ in range(40):
        env.reset()
        reward, optimal_reward = env.outcome(rng.uniform([env.batch_size], maxval=4, dtype=tf.int32))
        regrets.append((optimal_reward - reward).numpy())
    regrets = np.concatenate(regrets)
    standard_error = regrets.std() / np.sqrt(len(regrets))
    assert abs(regrets.mean() - env.reward_model.random_policy_regret) < 4 * standard_error


def test_linucb_learns_the_real_ratings(make_config):
    """Over the last half of training LinUCB's regret is clearly below the random pick's. On
    these data the best linear policy over the features (least squares on every held-out
    rating) has 0.72 of the random regret, LinUCB 0.70 here; the margin is over 10 standard errors."""
    cfg = make_config("env=movielens_ratings", "env.num_movies=null", "env.num_actions=4", "env.feature_share=0.7",
                      "agent=linucb", "agent.alpha=0.3", "training.loops=600", "training.chunk_loops=600")
    engine = experiment.assemble(cfg, data.load(cfg.data))
    (metrics,) = engine.run(600, 600)
    per_interaction = metrics.regret[300:].mean() / engine.interactions_per_loop
    assert per_interaction < 0.85 * engine.environment.reward_model.random_policy_regret


@pytest.mark.parametrize("overrides, message", [
    (["env.num_actions=40"], r"env.num_actions=40 is more than any user's held-out ratings \(at most \d+"),
    (["env.feature_share=0"], r"env.feature_share must be between 0 and 1"),
    (["env.feature_share=1.0"], r"env.feature_share must be between 0 and 1"),
    (["env.feature_share=0.01"], r"env.feature_share=0.01 leaves no rating for the features"),
    (["env.feature_share=0.99"], r"env.feature_share=0.99 leaves no rating for the rewards"),
    (["env.reward=stars"], r"env.reward must be one of rating, liked"),
    (["env.arm_features=both"], r"env.arm_features must be one of embedding, interaction, got 'both'"),
])
def test_bad_settings_are_one_line_user_errors(make_env, overrides, message):
    with pytest.raises(UserError, match=message) as error:
        make_env(*overrides)
    assert "\n" not in str(error.value)


def training_env(cfg):
    return build_environment(cfg, data.load(cfg.data))


def test_a_tracked_run_finishes_with_its_metrics_plot_policy_and_skipped_users(make_config, tracking_uri):
    cfg = make_config("env=movielens_ratings", "env.num_movies=null", "env.num_actions=9", "tracking.save_policy=true")
    final, run_id = training.train(cfg)
    run = mlflow.MlflowClient(tracking_uri).get_run(run_id)
    assert run.info.status == "FINISHED" and final[metrics.CUMULATIVE_REGRET] > 0
    assert int(run.data.tags[training.SKIPPED_USERS_TAG]) == training_env(cfg).reward_model.skipped_users > 0
    artifacts = {entry.path for entry in mlflow.MlflowClient(tracking_uri).list_artifacts(run_id)}
    assert {"regret.png", "metrics.csv", "policy"} <= artifacts  # per-arm: the SavedModel only, not yet servable
