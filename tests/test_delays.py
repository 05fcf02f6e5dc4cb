"""Delayed feedback (env.delay, env.feedback_drop): the agent trains on exactly the rewards that
have arrived, each once, the delays drawn as stated, and bad settings refused in one line."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from src import config, data, experiment, seeding
from src.envs.base import HEAVY_SCALE, HEAVY_SHARE, FeedbackDelay
from src.errors import UserError

LOOPS, BATCH, STEPS = 30, 8, 2


@pytest.mark.parametrize("settings, chunk", [
    (["env.delay=fixed", "env.delay_loops=3"], LOOPS),
    (["env.delay=geometric", "env.delay_loops=2"], LOOPS),
    # chunks of 7, 7, 7, 7 and 2 loops; a seed of its own, whose stream of delays the check draws again
    (["env.delay=heavy", "env.delay_loops=1", "env.feedback_drop=0.2", "training.seed=3"], 7),
])
def test_the_agent_learns_from_exactly_the_rewards_that_arrived(make_config, settings, chunk):
    cfg = make_config("agent=linucb", "agent.alpha=1.0", f"training.loops={LOOPS}", "tracking.log_interactions=true",
                      *settings)
    engine = experiment.assemble(cfg, data.load(cfg.data))
    chunks = list(engine.run(LOOPS, chunk))
    interactions, arrived = logged_and_arrived(engine, chunks, cfg.training.seed)
    model = engine.environment.reward_model
    users, actions = interactions[:, 0].astype(int), interactions[:, 1].astype(int)
    x, rewards = model.user_features[users], model.rewards[users, actions]
    ridge = cfg.agent.tikhonov_weight
    covariance = np.tile(ridge * np.eye(x.shape[1]), (len(model.movie_ids), 1, 1))
    data_vector = np.zeros((len(model.movie_ids), x.shape[1]))
    for features, action, reward in zip(x[arrived], actions[arrived], rewards[arrived]):
        covariance[action] += np.outer(features, features)
        data_vector[action] += reward * features
    statistics = engine.agent.statistics
    # float32 features in the agent, float64 here.
    np.testing.assert_allclose(statistics.covariance.numpy(), covariance, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(statistics.data_vector.numpy(), data_vector, rtol=1e-5, atol=1e-4)


def logged_and_arrived(engine, chunks, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The interaction log of the run, and whether each logged round's feedback reached the agent
    by the end: the delays the engine drew, drawn again from the delays' stream of the run's
    `seed` as it drew them (the chunk's at once), a loop's transitions user by user (each user's
    steps together), its log step by step."""
    interactions = np.concatenate([done.interactions for done in chunks])
    delay = engine.environment.feedback_delay
    generator = seeding.stream(seed, seeding.DELAYS)
    drawn = np.concatenate([delay.sample(generator, [len(done.regret), BATCH * STEPS]).numpy() for done in chunks])
    delays = np.concatenate([loop.reshape(BATCH, STEPS).T.ravel() for loop in drawn])
    loop_of = np.repeat(np.arange(LOOPS), BATCH * STEPS)
    arrived = (delays >= 0) & (loop_of + delays <= LOOPS - 1)
    assert 0 < arrived.sum() < len(arrived)
    return interactions, arrived


def test_a_slate_agent_learns_from_exactly_the_feedback_that_arrived(make_config):
    """The pending ring keeps what a slate agent trains on (the slotted movies, not the candidates):
    LinUCB's one shared model holds exactly the slots of the slates whose feedback arrived."""
    candidates, size = 4, 2
    cfg = make_config("env=movielens_ranking", f"env.num_actions={candidates}", f"env.slate_size={size}",
                      "env.feedback=scores", "agent=linucb", "agent.alpha=1.0", f"training.loops={LOOPS}",
                      "tracking.log_interactions=true", "env.delay=geometric", "env.delay_loops=2",
                      "env.feedback_drop=0.2")
    engine = experiment.assemble(cfg, data.load(cfg.data))
    interactions, arrived = logged_and_arrived(engine, list(engine.run(LOOPS, 7)), cfg.training.seed)
    model = engine.environment.reward_model
    # A slate round's log: the user's row, the candidates' pool columns, the slate, each slot's rating
    # (then the policy's scores).
    users = interactions[arrived, 0].astype(int)
    offered = interactions[arrived, 1:1 + candidates].astype(int)
    slates = interactions[arrived, 1 + candidates:1 + candidates + size].astype(int)
    ratings = interactions[arrived, 1 + candidates + size:1 + candidates + 2 * size]
    movies = np.take_along_axis(offered, slates, axis=1)
    rows = np.concatenate([np.repeat(model.user_features[users], size, axis=0),
                           model.movie_features[movies.ravel()]], axis=1)
    covariance = cfg.agent.tikhonov_weight * np.eye(rows.shape[1]) + rows.T @ rows
    statistics = engine.agent.statistics
    np.testing.assert_allclose(statistics.covariance.numpy()[0], covariance, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(statistics.data_vector.numpy()[0], ratings.ravel() @ rows, rtol=1e-5, atol=1e-3)


def test_linucb_learns_real_ratings_from_delayed_and_lost_feedback(make_config):
    cfg = make_config("env=movielens_ratings", "env.num_movies=null", "env.num_actions=4", "env.feature_share=0.7",
                      "agent=linucb", "agent.alpha=0.3", "training.loops=600", "env.delay=heavy", "env.delay_loops=2",
                      "env.feedback_drop=0.1")
    engine = experiment.assemble(cfg, data.load(cfg.data))
    (metrics,) = engine.run(600, 600)
    # As without delays (tests/envs/test_movielens_ratings.py): the best linear policy has 0.72 of a
    # random pick's regret; an agent learning nothing, about 1.
    per_interaction = metrics.regret[300:].mean() / engine.interactions_per_loop
    assert per_interaction < 0.85 * engine.environment.reward_model.random_policy_regret


def test_delays_are_drawn_as_stated():
    generator = tf.random.Generator.from_seed(1)
    n = 200_000
    geometric = FeedbackDelay("geometric", 4).sample(generator, [n]).numpy()
    # Mean 4 and standard deviation sqrt(4 x 5) = 4.5: a standard error of 0.01. Over 40 loops (10
    # means, the default longest) a reward never arrives: (4 / 5)^41 of them, standard error 2.3e-5.
    kept = geometric[geometric >= 0]
    assert kept.min() == 0 and kept.max() == 40 and abs(kept.mean() - 4) < 0.06
    assert np.mean(geometric < 0) == pytest.approx(0.8 ** 41, abs=1e-4)
    heavy = FeedbackDelay("heavy", 2, longest=10_000).sample(generator, [n]).numpy()
    assert heavy.mean() == pytest.approx((1 - HEAVY_SHARE) * 2 + HEAVY_SHARE * HEAVY_SCALE * 2, rel=0.03)
    dropped = FeedbackDelay("fixed", 3, drop=0.25).sample(generator, [n]).numpy()
    assert set(np.unique(dropped)) == {-1, 3} and np.mean(dropped < 0) == pytest.approx(0.25, abs=0.005)


def test_a_neural_agent_learns_from_geometric_delays(make_config):
    cfg = make_config("agent=epsilon_greedy", "training.loops=200", "env.delay=geometric", "env.delay_loops=3")
    engine = experiment.assemble(cfg, data.load(cfg.data))
    chunks = list(engine.run(200, 100))
    per_interaction = chunks[-1].regret.mean() / engine.interactions_per_loop
    assert per_interaction < 0.5 * engine.environment.reward_model.random_policy_regret
    assert np.isfinite(np.concatenate([chunk.loss for chunk in chunks])).all()


@pytest.mark.parametrize("overrides, message", [
    (["env.delay=fixed", "env.delay_loops=100"], "env.delay_loops=100 is not shorter than the run's training.loops=60"),
    (["env.delay=fixed", "env.delay_loops=60"], "env.delay_loops=60 is not shorter than the run's training.loops=60"),
    (["env.delay=fixed"], "env.delay_loops must be a whole number of training loops, >= 1 with a delay, got 0"),
    (["env.delay=later", "env.delay_loops=2"], "env.delay must be one of none, fixed, geometric, heavy, got 'later'"),
    (["env.feedback_drop=1.0"], "env.feedback_drop must be in [0, 1), got 1.0"),
    (["env.delay=fixed", "env.delay_loops=3", "env.delay_longest=2"],
     "env.delay_longest must be a whole number of loops, at least env.delay_loops=3, got 2"),
])
def test_bad_delays_are_refused_in_one_line(make_config, overrides, message):
    cfg = make_config(*overrides)
    with pytest.raises(UserError) as refused:
        experiment.assemble(cfg, data.load(cfg.data))
    assert message in str(refused.value) and "\n" not in str(refused.value)


@pytest.mark.parametrize("agent", ["linucb", "epsilon_greedy"])
def test_per_arm_agents_learn_from_delayed_and_lost_feedback(make_config, agent):
    cfg = make_config("env=movielens_per_arm", "env.num_actions=4", "env.arm_features=interaction", f"agent={agent}",
                      "training.loops=200", "env.delay=geometric", "env.delay_loops=2", "env.feedback_drop=0.1")
    engine = experiment.assemble(cfg, data.load(cfg.data))
    chunks = list(engine.run(200, 100))
    # Seeded: 0.006 and 0.08 of a uniform pick's regret in the last loops; without training, about 1.
    per_interaction = chunks[-1].regret.mean() / engine.interactions_per_loop
    assert per_interaction < 0.3 * engine.environment.reward_model.random_policy_regret


# Found by a hostile try: env.delay_longest=2147483647 asked TensorFlow for 256 GiB, 1,000,000 ran a
# quick run at 170 interactions/s (every loop scans the ring), agent.window=2147483647 ran out of
# memory, the timeline's env.refit_every=8 would have taken hours.
@pytest.mark.parametrize("overrides, message", [
    (["env.delay=geometric", "env.delay_loops=3", "env.delay_longest=2147483647"],
     "env.delay_longest must be null or a whole number of loops from env.delay_loops=3 to training.loops=2000"),
    (["env.delay=fixed", "env.delay_loops=3000"], "env.delay_loops must be a whole number of loops from 1 to training."),
    (["env.delay=geometric", "env.delay_loops=3", "env.delay_longest=abc"], "env.delay_longest must be null or"),
    (["env.delay=heavy", "env.delay_loops=1900", "env.num_movies=1682", "training.batch_size=256"],
     "env.delay_loops must be small enough for the feedback held back to fit in half of this machine's"),
    (["agent=linucb", "agent.window=2147483647"], "agent.window must be small enough to fit in half of this machine's"),
    (["agent=linucb", "agent.window=abc"], "agent.window must be null (every interaction counts) or a whole number"),
    (["env.drift=switch", "env.drift_period=4"], "env.drift_period must be an integer number of interactions, at least"),
    (["env.feedback_drop=1.0"], "env.feedback_drop must be in [0, 1), got 1.0"),
    (["env.arrivals=first_rating", "env.arrivals_every=0"], "env.arrivals_every must be an integer >= 1"),
    (["env.arrivals=first_rating", "env.arrivals_start=100000"],
     "env.arrivals_start must be an integer between 1 and env.num_movies=20, got 100000"),
    (["env=movielens_per_arm", "env.arrivals=first_rating", "env.arrivals_start=3"],
     "env.arrivals_start must be an integer between env.num_actions=20 (a full candidate set) and the data's movies"),
    (["env=movielens_timeline", "env.history_share=1.5"], "env.history_share must be a share in (0, 1)"),
    (["agent=linucb", "agent.discount=0"], "agent.discount must be in (0, 1] (1: no discount), got 0"),
    # Each refit fits the reward model again: at 8, 5 loops took 25 s.
    (["env=movielens_timeline", "env.refit_every=8"], "env.refit_every must be an integer of at least 64: at most 500"),
])
def test_time_settings_out_of_range_are_refused_before_tensorflow_loads(overrides, message):
    with pytest.raises(UserError) as refused:
        config.check_run(config.compose(["training=quick", *overrides]))
    assert message in str(refused.value) and "\n" not in str(refused.value)
    config.check_run(config.compose(["training=quick", "env.delay=heavy", "env.delay_loops=3", "agent.window=50000"]))
    # A fixed delay holds back its own loops only: a long one on a long run fits.
    config.check_run(config.compose(["env.num_movies=1682", "env.delay=fixed", "env.delay_loops=19000"]))
