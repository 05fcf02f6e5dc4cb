"""Catalogues too large for dense tables: the sparse SVD, rewards from factors, the sampled random
regret, and synthetic data drawn pair by pair. Each path is forced at test size by lowering its
threshold and checked against the dense path it replaces."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from src.data import movielens, synthetic
from src.envs import movielens as movielens_env
from src.envs import movielens_per_arm
from src.errors import UserError


@pytest.fixture(scope="module")
def planted():
    """Rank-3 tastes: the reward model's rank-3 subspace is well separated from the rest."""
    return synthetic.load(num_users=300, num_movies=200, rank=3, density=0.5, seed=4).ratings_matrix()


def test_the_sparse_svd_reconstructs_what_the_dense_one_does(planted, monkeypatch):
    dense = movielens_env.build_reward_model(planted, 200, rank_k=2, reward_rank=3)
    monkeypatch.setattr(movielens_env, "DENSE_SVD_CELLS", 100)
    arpack = movielens_env.build_reward_model(planted, 200, rank_k=2, reward_rank=3)
    np.testing.assert_allclose(arpack.rewards, dense.rewards, atol=1e-8)
    # Each component is the same up to its sign.
    signs = np.sign(np.sum(arpack.user_features * dense.user_features, axis=0))
    np.testing.assert_allclose(arpack.user_features * signs, dense.user_features, atol=1e-8)
    assert signs.tolist() in ([1, 1], [1, -1], [-1, 1], [-1, -1])
    again = movielens_env.build_reward_model(planted, 200, rank_k=2, reward_rank=3)
    np.testing.assert_array_equal(again.user_features, arpack.user_features)  # a fixed start: same signs


def test_a_dense_table_too_large_is_refused_in_one_line(planted, monkeypatch):
    model = movielens_env.build_reward_model(planted, 200, rank_k=2, reward_rank=3)
    monkeypatch.setattr(movielens_env, "MOST_CELLS", 1000)
    with pytest.raises(UserError, match="300 users x 200 movies is more than 1,000 cells.*movielens_per_arm"):
        model.rewards


def test_per_arm_rewards_come_from_the_factors_without_a_table(make_config, monkeypatch):
    from src import data
    from src.envs import build_environment

    monkeypatch.setattr(movielens_env, "MOST_CELLS", 10)  # any dense table would be refused
    monkeypatch.setattr(movielens_per_arm, "MOST_CELLS", 10)
    cfg = make_config("env=movielens_per_arm", "env.num_actions=4")
    env = build_environment(cfg, data.load(cfg.data))
    env.reset()
    model = env.reward_model
    users, candidates = env._users.numpy(), env._candidates.numpy()
    expected = np.einsum("br,bcr->bc", model.user_factors[users], model.movie_factors[candidates])
    reward, optimal = env.outcome(np.zeros(len(users), np.int32))
    np.testing.assert_allclose(reward, expected[:, 0], rtol=1e-12)
    np.testing.assert_allclose(optimal, expected.max(axis=1), rtol=1e-12)


def test_a_large_pools_random_regret_is_estimated_from_a_sample_of_users(monkeypatch):
    table = synthetic.load(num_users=1500, num_movies=60, rank=3, density=0.3, seed=2).ratings_matrix()
    model = movielens_per_arm.CandidateSetRewardModel(
        **movielens_env.fields_of(movielens_env.build_reward_model(table, 60, 3, 3)), num_actions=5)
    exact = model.random_policy_regret
    monkeypatch.setattr(movielens_per_arm, "MOST_CELLS", 1000)
    monkeypatch.setattr(movielens_per_arm, "REGRET_USERS", 400)
    estimate = dataclasses.replace(model).random_policy_regret  # a model of its own: each keeps its regret
    rows = movielens_per_arm.sorted_reward_rows(model)
    assert rows.shape == (400, 60) and (np.diff(rows, axis=1) >= 0).all()
    per_user = np.sort(model.rewards, axis=1) @ movielens_per_arm.expected_top_weights(60, 5, 1) - model.rewards.mean(1)
    standard_error = per_user.std() / np.sqrt(400) * np.sqrt(1 - 400 / 1500)
    assert estimate != exact and abs(estimate - exact) < 4 * standard_error


def test_synthetic_tables_equal_what_their_files_parse_into():
    with tempfile.TemporaryDirectory() as scratch:
        synthetic.write_movielens(Path(scratch), 50, 40, 3, 0.3, 1)
        parsed = movielens.parse(Path(scratch))
    made = synthetic.load(50, 40, 3, 0.3, 1)
    for table in ("ratings", "movies", "users"):
        pd.testing.assert_frame_equal(getattr(made, table), getattr(parsed, table))


def test_pairs_drawn_directly_follow_the_planted_tastes(monkeypatch):
    users, movies, stars = synthetic.planted_ratings(400, 300, rank=3, density=0.1, seed=5)
    monkeypatch.setattr(synthetic, "DENSE_DRAW_CELLS", 1000)
    drawn_users, drawn_movies, drawn_stars = synthetic.planted_ratings(400, 300, rank=3, density=0.1, seed=5)
    pairs = drawn_users * 300 + drawn_movies
    assert len(np.unique(pairs)) == len(pairs) and set(drawn_users[drawn_movies == 0]) == set(range(400))
    # Drawn with replacement as often as leaves each pair rated with chance 0.1, first movies added.
    expected = 400 * 300 * 0.1 + 400 * 0.9
    assert abs(len(pairs) - expected) < 4 * np.sqrt(expected)
    # The same tastes and scale as the dense draw: each pair's stars agree where both drew it.
    rng = np.random.default_rng(5)
    taste, appeal = rng.normal(size=(400, 3)), rng.normal(size=(300, 3))
    scores = taste @ appeal.T
    everywhere = np.clip(np.round(3 + 1.2 * scores / scores.std()), 1, 5)
    np.testing.assert_array_equal(drawn_stars, everywhere[drawn_users, drawn_movies])
    np.testing.assert_array_equal(stars, everywhere[users, movies])


def test_a_synthetic_size_that_would_exhaust_memory_is_refused():
    with pytest.raises(UserError, match="data.density.*at most 40,000,000 ratings"):
        synthetic.load(num_users=1_000_000, num_movies=100_000, rank=3, density=0.01, seed=0)


def test_a_tracked_run_on_a_pool_too_large_for_a_table_finishes(make_config, monkeypatch):
    """No step of a tracked run, its log lines included, reads the whole users x pool table."""
    from src import data
    from src.training import train

    monkeypatch.setattr(movielens_env, "MOST_CELLS", 10)
    monkeypatch.setattr(movielens_per_arm, "MOST_CELLS", 10)
    cfg = make_config("env=movielens_per_arm", "env.num_actions=4", "agent=linucb")
    final, _ = train(cfg)
    assert final["train/cumulative_regret"] > 0
    with pytest.raises(UserError, match="small enough for a dense rewards table"):
        movielens_env.build_reward_model(data.load(cfg.data).ratings_matrix(), 10, 4, 4).rewards


def test_a_matrix_is_factorised_once_and_every_rank_is_a_truncation_of_its_svd():
    """The SVDs kept are LAPACK's own, to the bit: the same matrix again (a copy) gets the same
    factors without a new SVD, any rank truncates them, and only the last DENSE_SVDS_KEPT stay."""
    rng = np.random.default_rng(0)
    matrix = rng.random((30, 12))
    first = movielens_env.dense_svd(matrix)
    assert movielens_env.dense_svd(matrix.copy()) is first
    fresh = np.linalg.svd(matrix, full_matrices=False)
    for kept, computed in zip(first, fresh):
        np.testing.assert_array_equal(kept, computed)
        assert not kept.flags.writeable
    users, movies = movielens_env.factorise(matrix, 5)
    root = np.sqrt(fresh[1][:5])
    np.testing.assert_array_equal(users, fresh[0][:, :5] * root)
    np.testing.assert_array_equal(movies, fresh[2][:5].T * root)
    for other in range(movielens_env.DENSE_SVDS_KEPT):
        movielens_env.dense_svd(matrix + other + 1)
    assert movielens_env.dense_svd(matrix) is not first
