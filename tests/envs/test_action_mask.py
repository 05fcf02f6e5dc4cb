"""Movies that arrive on env=movielens (env.arrivals): observations carry an action mask of the
movies arrived, in the order of their first rating; every agent that takes a mask picks only
among them, regret is against the best of them, a newcomer is learnt, a run ends FINISHED with
the catalogue's size logged and its saved policy serves; bad settings refused in one line."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from src import artifacts, data, experiment, metrics, predict, serving
from src.agents import agents_that
from src.envs import build_environment
from src.envs.base import first_rating_order
from src.errors import UserError

MOVIES, START, EVERY, BATCH = 10, 2, 8, 4  # a movie arrives every second step of 4 users


@pytest.fixture
def masked(make_config):
    def make(*overrides: str):
        cfg = make_config("env.arrivals=first_rating", f"env.arrivals_start={START}", f"env.arrivals_every={EVERY}",
                          f"training.batch_size={BATCH}", "training.steps_per_loop=1", *overrides)
        dataset = data.load(cfg.data)
        return cfg, dataset, build_environment(cfg, dataset)

    return make


def test_the_mask_holds_the_movies_arrived_in_the_order_of_first_ratings(masked):
    _, dataset, env = masked()
    model = env.reward_model
    first = dataset.ratings.groupby("item_id").timestamp.min().reindex(model.movie_ids).to_numpy()
    assert (np.diff(first) >= 0).all() and not (np.diff(model.movie_ids) > 0).all()
    for step in range(2 * (MOVIES - START) + 3):
        features, mask = env.reset().observation
        arrived = min(MOVIES, START + step * BATCH // EVERY)
        users = env.users.numpy()
        np.testing.assert_array_equal(features.numpy(), model.user_features[users].astype(np.float32))
        np.testing.assert_array_equal(mask.numpy(), np.tile(np.arange(MOVIES) < arrived, (BATCH, 1)))
        actions = tf.zeros(BATCH, tf.int32)
        reward, best = env.outcome(actions)
        np.testing.assert_array_equal(best.numpy(), model.rewards[users, :arrived].max(axis=1))
        np.testing.assert_array_equal(reward.numpy(), model.rewards[users, 0])
        np.testing.assert_array_equal(env.extra_metrics(actions).numpy(), np.full((BATCH, 1), arrived))
    assert env.extra_metric_names == (metrics.CATALOGUE_SIZE,) and env.logged_round_kind is None


@pytest.mark.parametrize("agent", agents_that("action_mask"))
def test_every_masked_agent_picks_only_movies_arrived(masked, agent):
    """Three movies all run long: after training on them, an agent blind to the mask would try
    the seven it has never seen (LinUCB's widest bounds, a uniform pick's 70%, an epsilon-greedy
    agent's exploring picks). Neural LinUCB switches to its LinUCB phase after 5 train steps here."""
    phase = ["agent.encoding_network_num_train_steps=5"] if agent.startswith("neural_linucb") else []
    cfg, dataset, _ = masked(f"agent={agent}", "env.arrivals_start=3", "env.arrivals_every=1000000",
                             "training.loops=30", *phase)
    engine = experiment.assemble(cfg, dataset)
    for _ in engine.run(cfg.training.loops, cfg.training.chunk_loops):
        pass
    picks = set()
    for _ in range(50):
        time_step = engine.environment.reset()
        for policy in (engine.agent.policy, engine.agent.collect_policy):
            picks.update(policy.action(time_step).action.numpy().tolist())
    assert picks <= {0, 1, 2}


def test_drift_and_arrivals_together(masked):
    """Tastes that switch over a growing catalogue: each step's best is the best movie arrived at
    its time, the moves of the best are counted among the movies arrived, after the catalogue's size."""
    _, _, env = masked("env.drift=switch", "env.drift_period=8")
    model = env.reward_model
    assert env.extra_metric_names == (metrics.CATALOGUE_SIZE, metrics.BEST_MOVIE_MOVED)
    moved_any = False
    for step in range(12):
        env.reset()
        arrived = min(MOVIES, START + step * BATCH // EVERY)
        users = env.users.numpy()
        now, stationary = model.rewards_at(step * BATCH)[users, :arrived], model.rewards[users, :arrived]
        actions = tf.zeros(BATCH, tf.int32)
        reward, best = env.outcome(actions)
        np.testing.assert_allclose(best.numpy(), now.max(axis=1), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(reward.numpy(), now[:, 0], rtol=1e-12, atol=1e-12)
        size, moved = env.extra_metrics(actions).numpy().T
        np.testing.assert_array_equal(size, np.full(BATCH, arrived))
        np.testing.assert_array_equal(moved, now.argmax(axis=1) != stationary.argmax(axis=1))
        moved_any |= moved.any()
    assert moved_any


def test_linucb_learns_movies_as_they_arrive(masked):
    """The last loops' regret, the catalogue complete, is far under a uniform pick's; while movies
    arrive, each newcomer's prior (the ridge, the widest bound) gets it tried."""
    cfg, dataset, _ = masked("agent=linucb", "agent.alpha=1", "training.loops=600", "training.steps_per_loop=2")
    engine = experiment.assemble(cfg, dataset)
    history = metrics.RegretHistory(engine.interactions_per_loop)
    for chunk in engine.run(cfg.training.loops, cfg.training.chunk_loops):
        history.add(chunk)
    frame = history.frame()
    assert frame[metrics.CATALOGUE_SIZE].iloc[0] < 3 and frame[metrics.CATALOGUE_SIZE].iloc[-1] == MOVIES
    model = engine.environment.reward_model
    uniform = np.mean(model.rewards.max(axis=1) - model.rewards.mean(axis=1))
    assert frame[metrics.REGRET].iloc[-100:].mean() < 0.2 * uniform


def test_the_random_regret_follows_the_catalogue(masked):
    """A uniform pick among the movies arrived: its regret per interaction at each catalogue size
    is that size's expectation (mean over the loops, within 4 standard errors), and the model's
    random regret is the mean over the arrival period's sizes."""
    cfg, dataset, env = masked("agent=random", "training.loops=400", "env.arrivals_every=40")
    model = env.reward_model

    def uniform(size: int) -> float:
        rewards = model.rewards[:, :size]
        return float(np.mean(rewards.max(axis=1) - rewards.mean(axis=1)))

    assert model.arrival_sizes[0] == START and model.arrival_sizes[-1] == MOVIES
    assert model.random_policy_regret == pytest.approx(np.mean([uniform(n) for n in model.arrival_sizes]), rel=1e-12)
    engine = experiment.assemble(cfg, dataset)
    history = metrics.RegretHistory(engine.interactions_per_loop)
    for chunk in engine.run(cfg.training.loops, cfg.training.chunk_loops):
        history.add(chunk)
    frame = history.frame()
    expected = frame[metrics.CATALOGUE_SIZE].astype(int).map(uniform)
    residual = frame[metrics.REGRET] - expected
    assert abs(residual.mean()) < 4 * residual.std() / np.sqrt(len(residual))
    assert frame[metrics.REGRET].iloc[:40].mean() < frame[metrics.REGRET].iloc[-100:].mean()


def test_a_run_with_arrivals_finishes_and_its_policy_serves_the_movies_arrived(make_config, tracking_uri):
    """60 loops of 16 interactions, a movie every 160 from 2: 7 of the 10 have arrived at the end,
    and the saved policy recommends among those 7, with no prediction for the other 3."""
    from src.training import train  # here: only this test needs the whole training stack

    cfg = make_config("agent=lints", "env.arrivals=first_rating", "env.arrivals_start=2", "env.arrivals_every=160",
                      "tracking.save_policy=true")
    final, _ = train(cfg)
    assert np.isfinite(final[metrics.REGRET])
    client = mlflow.MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("movielens-bandits").experiment_id])
    assert run.info.status == "FINISHED"
    sizes = [point.value for point in client.get_metric_history(run.info.run_id, metrics.CATALOGUE_SIZE)]
    assert min(sizes) < 3 and 6 < max(sizes) <= 7
    model = build_environment(cfg, data.load(cfg.data)).reward_model
    with tempfile.TemporaryDirectory() as scratch:
        _, policy_path = artifacts.fetch_policy(run.info.run_id, None, Path(scratch))
        policy = serving.Policy(policy_path)
        picks, scores = policy.decide(model.user_features)
    assert policy.movies_arrived == 7 and scores.shape == (len(model.user_ids), MOVIES)
    assert picks.max() < 7 and len(set(picks)) > 1
    assert np.isfinite(scores[:, :7]).all() and np.isnan(scores[:, 7:]).all()
    # src.predict shows what is served: the 7, the best for the user among them.
    report = predict.recommend(predict.parse([f"run_id={run.info.run_id}", f"user_id={model.user_ids[0]}",
                                              f"tracking.uri={tracking_uri}"]))
    best = int(re.search(r"best for user \d+: movie (\d+)", report).group(1))
    assert "7 candidate movies" in report and best in model.movie_ids[:7] and "nan" not in report.lower()


@pytest.mark.parametrize("overrides, message", [
    (["env.arrivals_start=0"], "env.arrivals_start must be an integer between 1 (a catalogue with a movie to "
                               "recommend) and env.num_movies=10, got 0"),
    (["env.arrivals_start=11"], "and env.num_movies=10, got 11"),
    (["env.arrivals_every=0"], "env.arrivals_every must be an integer >= 1"),
    (["agent=ranking"], "agent=ranking cannot take an action mask"),
    (["agent=linucb", "agent.log_epsilon=0.1"], "agent.log_epsilon must be 0 with an action mask"),
    (["agent=dropout_ts", "agent.propensity_draws=5"], "agent.propensity_draws must be 0 with an action mask"),
    (["tracking.log_interactions=true"], "a round happens at a time (tastes that drift, movies that arrive)"),
])
def test_bad_arrivals_are_one_line(masked, overrides, message):
    with pytest.raises(UserError) as refused:
        cfg, dataset, _ = masked(*overrides)
        experiment.assemble(cfg, dataset)
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_arrivals_need_timestamps():
    ratings = pd.DataFrame({"user_id": [1, 2], "item_id": [1, 2], "rating": [4, 5], "timestamp": [0, 0]})
    with pytest.raises(UserError, match="env.arrivals must be none on data without timestamps"):
        first_rating_order(ratings, np.array([1, 2]))
