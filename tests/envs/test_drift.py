"""Drifting tastes (env.drift): each step's rewards those of its time, as the NumPy reward model
computes them, regret against the best movie at the time, and bad settings refused."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
import tensorflow as tf

from src import data, experiment, metrics
from src.envs import build_environment
from src.envs.movielens import ROTATION_SAMPLES, TimedRewardModel, random_rotation, rotation
from src.errors import UserError


def drifting(make_config, drift: str, period: int):
    cfg = make_config(f"env.drift={drift}", f"env.drift_period={period}", "training.batch_size=8")
    return build_environment(cfg, data.load(cfg.data))


@pytest.mark.parametrize("drift", ["rotate", "switch"])
def test_each_step_earns_the_rewards_of_its_time(make_config, drift):
    environment = drifting(make_config, drift, 24)  # 3 steps of 8 users a regime or a turn
    model = environment.reward_model
    assert isinstance(model, TimedRewardModel)
    for step in range(7):
        environment.reset()
        users = environment.users.numpy()
        truth = model.rewards_at(step * 8)[users]
        actions = tf.constant(np.arange(8) % truth.shape[1], tf.int32)
        reward, optimal = environment.outcome(actions)
        np.testing.assert_allclose(reward.numpy(), truth[np.arange(8), actions.numpy()], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(optimal.numpy(), truth.max(axis=1), rtol=1e-12, atol=1e-12)
        moved = environment.extra_metrics(actions).numpy()[:, 0]
        np.testing.assert_array_equal(moved, truth.argmax(axis=1) != model.rewards[users].argmax(axis=1))
    if drift == "switch":  # the regimes alternate: back to no drift after two periods
        np.testing.assert_allclose(model.rewards_at(48), model.rewards, atol=1e-12)
        assert not np.allclose(model.rewards_at(24), model.rewards)


def test_rotations_turn_a_full_circle_and_the_switch_is_a_rotation():
    turned = rotation("rotate", 5, 10, 40, None)  # a quarter turn in planes (0, 1) and (2, 3)
    np.testing.assert_allclose(turned[:2, :2], [[0, -1], [1, 0]], atol=1e-12)
    assert turned[4, 4] == 1.0
    np.testing.assert_allclose(rotation("rotate", 5, 40, 40, None), np.eye(5), atol=1e-12)
    switched = random_rotation(5)
    np.testing.assert_allclose(switched @ switched.T, np.eye(5), atol=1e-12)
    assert np.linalg.det(switched) == pytest.approx(1.0)


def test_the_random_regret_is_averaged_over_the_cycle(make_config):
    model = drifting(make_config, "switch", 24).reward_model
    regimes = [model.rewards_at(0), model.rewards_at(24)]
    expected = np.mean([np.mean(r.max(axis=1) - r.mean(axis=1)) for r in regimes])
    assert model.random_policy_regret == pytest.approx(expected, rel=1e-12)
    rotating = drifting(make_config, "rotate", 64).reward_model
    angles = [rotating.rewards_at(t * 64 / ROTATION_SAMPLES) for t in range(ROTATION_SAMPLES)]
    assert rotating.random_policy_regret == pytest.approx(
        np.mean([np.mean(r.max(axis=1) - r.mean(axis=1)) for r in angles]), rel=1e-12)


def test_a_drifting_run_logs_how_often_the_best_movie_moved(make_config):
    from src.training import train  # here: only this test needs the whole training stack

    final, _ = train(make_config("env.drift=switch", "env.drift_period=160", "training.loops=40"))
    assert 0 <= final[metrics.REGRET]
    history = mlflow.MlflowClient().get_metric_history(mlflow.last_active_run().info.run_id, metrics.BEST_MOVIE_MOVED)
    moved = [point.value for point in sorted(history, key=lambda point: point.step)]
    # Loops of 16 interactions: the first 10 in the first regime (nothing moved), the next 10 in the second.
    assert moved[:10] == [0.0] * 10 and min(moved[10:20]) > 0


@pytest.mark.parametrize("overrides, message", [
    (["env.drift=sideways"], "env.drift must be one of none, rotate, switch, got 'sideways'"),
    (["env.drift=rotate", "env.drift_period=3"], "env.drift_period must be an integer number of interactions, "
                                                 "at least training.batch_size=8, got 3"),
    (["env.drift=switch", "tracking.log_interactions=true"], "tracking.log_interactions=true needs an environment"),
])
def test_bad_drift_is_refused_in_one_line(make_config, overrides, message):
    cfg = make_config(*overrides, "training.batch_size=8")
    with pytest.raises(UserError) as refused:
        experiment.assemble(cfg, data.load(cfg.data))
    assert message in str(refused.value) and "\n" not in str(refused.value)


def drifting_like(model, drift: str, period: int) -> TimedRewardModel:
    """The drifting NumPy model over a candidate environment's pool."""
    return TimedRewardModel(user_ids=model.user_ids, movie_ids=model.movie_ids, user_factors=model.user_factors,
                            movie_factors=model.movie_factors, rank_k=model.rank_k, drift=drift, period=period)


def candidates_now_and_without_drift(environment, drifting_model: TimedRewardModel, interactions: int):
    """A step's candidates' rewards [batch, candidates] after `interactions`, and without drift."""
    environment.reset()
    users, candidates = environment._users.numpy(), environment._candidates.numpy()
    now = np.take_along_axis(drifting_model.rewards_at(interactions)[users], candidates, axis=1)
    return now, np.take_along_axis(drifting_model.rewards[users], candidates, axis=1)


@pytest.mark.parametrize("drift", ["rotate", "switch"])
def test_per_arm_candidates_earn_the_rewards_of_their_time(make_config, drift):
    """env=movielens_per_arm: each candidate's reward from the factors with the users' observed
    tastes turned, as `TimedRewardModel.rewards_at` has it over the whole pool."""
    cfg = make_config("env=movielens_per_arm", "env.num_actions=4", f"env.drift={drift}", "env.drift_period=24",
                      "training.batch_size=8")
    environment = build_environment(cfg, data.load(cfg.data))
    drifting_model = drifting_like(environment.reward_model, drift, 24)
    assert environment.extra_metric_names == (metrics.BEST_MOVIE_MOVED,)
    moved_any = False
    for step in range(7):
        truth, stationary = candidates_now_and_without_drift(environment, drifting_model, step * 8)
        actions = tf.constant(np.arange(8) % 4, tf.int32)
        reward, optimal = environment.outcome(actions)
        np.testing.assert_allclose(reward.numpy(), truth[np.arange(8), actions.numpy()], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(optimal.numpy(), truth.max(axis=1), rtol=1e-12, atol=1e-12)
        moved = environment.extra_metrics(actions).numpy()[:, 0]
        np.testing.assert_array_equal(moved, truth.argmax(axis=1) != stationary.argmax(axis=1))
        moved_any |= moved.any()
    assert moved_any  # the drift does change which candidate is best: the checks above can fail


def test_slates_earn_the_ratings_of_their_time(make_config):
    """env=movielens_ranking: a slate is worth its movies' ratings of the time, the best slate is the
    top of the candidates then, NDCG is against that, and the best candidate's moves are logged."""
    cfg = make_config("env=movielens_ranking", "env.num_actions=4", "env.slate_size=2", "env.drift=switch",
                      "env.drift_period=24", "training.batch_size=8")
    environment = build_environment(cfg, data.load(cfg.data))
    drifting_model = drifting_like(environment.reward_model, "switch", 24)
    assert environment.extra_metric_names == (metrics.NDCG, metrics.PRECISION, metrics.CLICK_THROUGH_RATE,
                                              metrics.BEST_MOVIE_MOVED)
    assert environment.logged_round_kind is None
    slate = tf.constant(np.tile([0, 1], (8, 1)), tf.int32)
    moved_any = False
    for step in range(7):
        truth, stationary = candidates_now_and_without_drift(environment, drifting_model, step * 8)
        worth, best = environment.outcome(slate)
        np.testing.assert_allclose(worth.numpy(), truth[:, :2].sum(axis=1), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(best.numpy(), np.sort(truth, axis=1)[:, -2:].sum(axis=1), rtol=1e-12, atol=1e-12)
        ndcg, *_, moved = environment.extra_metrics(slate).numpy().T
        discounts = 1 / np.log2([2, 3])
        ideal = np.maximum(-np.sort(-truth, axis=1)[:, :2], 0) @ discounts
        gained = np.maximum(truth[:, :2], 0) @ discounts
        np.testing.assert_allclose(ndcg, np.divide(gained, ideal, out=np.zeros(8), where=ideal > 0), rtol=1e-9)
        np.testing.assert_array_equal(moved, truth.argmax(axis=1) != stationary.argmax(axis=1))
        moved_any |= moved.any()
    assert moved_any


def test_per_arm_drift_with_arrivals_logs_both_metrics_and_a_bad_period_is_refused(make_config):
    cfg = make_config("env=movielens_per_arm", "env.num_actions=4", "env.drift=switch", "env.drift_period=24",
                      "env.arrivals=first_rating", "env.arrivals_start=5", "env.arrivals_every=4",
                      "training.batch_size=8")
    environment = build_environment(cfg, data.load(cfg.data))
    assert environment.extra_metric_names == (metrics.CATALOGUE_SIZE, metrics.BEST_MOVIE_MOVED)
    environment.reset()
    assert environment.extra_metrics(tf.zeros(8, tf.int32)).shape == (8, 2)
    cfg = make_config("env=movielens_per_arm", "env.drift=rotate", "env.drift_period=4", "training.batch_size=8")
    with pytest.raises(UserError, match="env.drift_period must be an integer number of interactions, at least "
                                        "training.batch_size=8"):
        build_environment(cfg, data.load(cfg.data))
