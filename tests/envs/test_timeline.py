"""MovieLens replayed in time (env=movielens_timeline): users in the order they rated, candidates
among the movies rated by then, users folded in from their past ratings, refits on the past only
(nothing from the future reaches features or rewards), and bad input refused in one line."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import tensorflow as tf
from scipy import sparse

from src import data, experiment, training
from src.data import synthetic
from src.envs import movielens_timeline
from src.envs.movielens import factorise
from src.errors import UserError

BATCH, REFIT = 5, 40


@pytest.fixture(scope="module")
def shuffled():
    """Ratings whose times interleave users and movies, as real ones do."""
    dataset = synthetic.load(num_users=40, num_movies=30, rank=3, density=0.5, seed=3)
    times = np.random.default_rng(0).permutation(len(dataset.ratings))
    return replace(dataset, ratings=dataset.ratings.assign(timestamp=times))


def timeline_env(dataset, **overrides):
    params = dict(batch_size=BATCH, seed=0, num_actions=4, rank_k=3, history_share=0.5, refit_every=REFIT)
    return movielens_timeline.build(dataset, **{**params, **overrides})


def replay(env, steps: int):
    """Each step's users, candidates, features and outcome of picking the first candidate."""
    seen = []
    for _ in range(steps):
        observation = env.reset().observation
        reward, optimal = env.outcome(tf.zeros(BATCH, tf.int32))
        seen.append((env._users.numpy(), env._candidates.numpy(), {k: v.numpy() for k, v in observation.items()},
                     reward.numpy(), optimal.numpy()))
    return seen


def test_users_arrive_in_time_order_among_the_movies_rated_by_then(shuffled):
    env = timeline_env(shuffled)
    timeline, start = env._timeline, env._start
    assert (np.diff(shuffled.ratings.sort_values("timestamp").timestamp) > 0).all()
    for step, (users, candidates, *_) in enumerate(replay(env, 30)):
        rows = start + step * BATCH + np.arange(BATCH)
        np.testing.assert_array_equal(users, timeline.users[rows])
        assert candidates.max() < timeline.arrived[rows[0] - 1] and all(len(set(row)) == 4 for row in candidates)
    # Movies are numbered in arrival order: each one's first rating comes after the one before's.
    first = [np.flatnonzero(timeline.movies == movie)[0] for movie in range(len(timeline.movie_ids))]
    assert (np.diff(first) > 0).all()


def test_a_user_in_the_fit_is_folded_in_to_their_fitted_factors(shuffled):
    timeline = movielens_timeline.Timeline.of(shuffled.ratings)
    start = len(timeline.users) // 2
    movie_factors, sums, gram_inverse = timeline.fit(start, 3, None)
    past = np.zeros((len(timeline.user_ids), len(timeline.movie_ids)))
    past[timeline.users[:start], timeline.movies[:start]] = timeline.stars[:start]
    user_factors, fitted_movies = factorise(past, 3)
    np.testing.assert_allclose(sums @ gram_inverse, user_factors, atol=1e-9)
    np.testing.assert_allclose(movie_factors, fitted_movies, atol=1e-12)


def test_nothing_from_the_future_reaches_features_or_rewards(shuffled):
    """Rewrite every rating from event E on: every step before E (three refits among them) sees
    the same users, candidates, features and rewards; rewriting one past rating changes them."""
    env = timeline_env(shuffled)
    ordered = shuffled.ratings.sort_values("timestamp", kind="stable")
    future_from = env._start + 26 * BATCH  # steps 0..25 replay events before it
    future = ordered.index[future_from:]
    rewritten = replace(shuffled, ratings=shuffled.ratings.assign(
        rating=shuffled.ratings.rating.where(~shuffled.ratings.index.isin(future), 6 - shuffled.ratings.rating)))
    before, after = replay(env, 26), replay(timeline_env(rewritten), 26)
    assert int(env._fitted_at.numpy()) == env._start + 3 * REFIT  # refitted three times on the way
    for one, other in zip(before, after):
        for part, again in zip(one[:2], other[:2]):
            np.testing.assert_array_equal(part, again)
        for key in one[2]:
            np.testing.assert_array_equal(one[2][key], other[2][key])
        np.testing.assert_array_equal(one[3], other[3])
    past = ordered.index[:3]
    changed = replace(shuffled, ratings=shuffled.ratings.assign(
        rating=shuffled.ratings.rating.where(~shuffled.ratings.index.isin(past), 6 - shuffled.ratings.rating)))
    assert not np.array_equal(replay(timeline_env(changed), 1)[0][3], before[0][3])


def test_a_refit_turns_onto_the_last_fit_and_keeps_every_reward(shuffled):
    env = timeline_env(shuffled)
    replay(env, REFIT // BATCH)  # up to the first refit
    previous = env._movie_factors.numpy()
    replay(env, 1)
    timeline, before = env._timeline, int(env._fitted_at.numpy())
    assert before == env._start + REFIT
    aligned = env._movie_factors.numpy()
    _, unaligned = factorise(sparse.csr_array((timeline.stars[:before], (timeline.users[:before], timeline.movies[:before])),
                                              shape=(len(timeline.user_ids), len(timeline.movie_ids))), 3)
    assert np.linalg.norm(aligned - previous) < np.linalg.norm(unaligned - previous)
    np.testing.assert_allclose(aligned @ aligned.T, unaligned @ unaligned.T, atol=1e-9)  # same products


def test_bad_input_is_one_line(shuffled, make_config):
    no_time = replace(shuffled, ratings=shuffled.ratings.assign(timestamp=0))
    with pytest.raises(UserError, match="ratings of this data have no timestamps"):
        timeline_env(no_time)
    with pytest.raises(UserError, match=r"env.history_share must be a share in \(0, 1\)"):
        timeline_env(shuffled, history_share=1.0)
    with pytest.raises(UserError, match="env.refit_every must be an integer number of interactions, at least"):
        timeline_env(shuffled, refit_every=2)
    cfg = make_config("env=movielens_timeline", "env.num_movies=null", "env.num_actions=4", "training.loops=100000")
    with pytest.raises(UserError, match="training.loops=100000 asks for .* interactions; env=movielens_timeline "
                                        "replays"):
        experiment.assemble(cfg, synthetic.load(60, 30, 3, 0.6, 0))


def test_a_saved_policys_catalogue_is_the_last_fit_not_the_first(make_config, monkeypatch):
    saved = []
    monkeypatch.setattr(training.serving, "log_policy", lambda policy, catalogue, arrived: saved.append(catalogue))
    cfg = make_config("env=movielens_timeline", "env.num_movies=null", "env.num_actions=4", "env.refit_every=64",
                      "tracking.save_policy=true", "training.loops=30")
    training.train(cfg)
    first_fit = experiment.assemble(cfg, data.load(cfg.data)).environment.reward_model
    (catalogue,) = saved
    assert catalogue.user_features.shape == first_fit.user_features.shape
    assert not np.allclose(catalogue.user_features, first_fit.user_features)  # users folded in since
