"""The logged interactions: the logging policies' propensities against their sampling, the
logged dataset in MLflow, and the logs refused where they cannot be used."""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from omegaconf import OmegaConf
from scipy import stats
from tf_agents.specs import tensor_spec
from tf_agents.trajectories import time_step as ts

from src import agents, config, data, experiment
from src.errors import UserError
from src.evaluation import estimators, interactions


def agent_and_step(agent: str, batch: int, **hyperparameters):
    """A freshly built agent of `agent`'s config and one collect step on a single user repeated."""
    cfg = config.compose([f"agent={agent}", *(f"agent.{k}={v}" for k, v in hyperparameters.items())]).agent
    spec = tensor_spec.BoundedTensorSpec((), tf.int32, minimum=0, maximum=4)
    time_step_spec = ts.time_step_spec(tf.TensorSpec([3], tf.float32))
    built = agents.build_agent(cfg, time_step_spec, spec, seed=0)
    observation = tf.tile(tf.constant([[0.3, -1.0, 2.0]]), [batch, 1])
    step = built.collect_policy.action(ts.restart(observation, batch_size=batch))
    return agents.action_probabilities(cfg, 5)(step).numpy(), step.action.numpy()


@pytest.mark.parametrize("agent, hyperparameters", [
    ("epsilon_greedy", {"epsilon": 0.3}),
    ("neural_boltzmann", {"temperature": 0.2}),
    ("random", {}),
    ("linucb", {"log_epsilon": 0.3}),  # its collect policy wrapped in epsilon, for usable logs
])
def test_propensities_sum_to_one_and_match_how_the_policy_samples(agent, hyperparameters):
    tf.random.set_seed(0)
    probabilities, actions = agent_and_step(agent, 20_000, **hyperparameters)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-9)
    frequencies = np.bincount(actions, minlength=5) / len(actions)
    # 20,000 draws: a frequency's standard error is at most 0.0036.
    np.testing.assert_allclose(frequencies, probabilities[0], atol=0.015)


def test_a_greedy_policy_picks_its_movie_with_probability_one():
    probabilities, actions = agent_and_step("epsilon_greedy", 4, epsilon=0.0)
    assert (probabilities[np.arange(4), actions] == 1.0).all()


def test_linucb_has_known_propensities_only_when_it_logs_with_epsilon():
    assert agents.action_probabilities(config.compose(["agent=linucb"]).agent, 5) is None
    assert agents.action_probabilities(config.compose(["agent=linucb", "agent.log_epsilon=0.1"]).agent, 5)


def test_lints_monte_carlo_propensities_are_within_their_error_and_weigh_without_bias():
    # A fresh LinTS: every movie's posterior alike, so each wins with probability exactly 1/5.
    tf.random.set_seed(2)
    draws = 1000
    probabilities, actions = agent_and_step("lints", 20_000, propensity_draws=draws)
    picked = probabilities[np.arange(len(actions)), actions]
    assert (picked >= 1 / (draws + 1)).all() and (probabilities.sum(axis=1) == picked).all()
    # Each estimate's standard error is sqrt(0.2 x 0.8 / 1000) = 0.0126.
    assert abs(picked.std() - 0.0126) < 0.002 and abs(picked.mean() - 0.2) < 0.001
    # An importance weight 1 / p-hat is biased by about (1 - p) / (p n) = 0.4% here: within 1%.
    assert np.mean(1 / picked) == pytest.approx(5.0, rel=0.01)
    assert agents.action_probabilities(config.compose(["agent=lints"]).agent, 5) is None


def test_dropout_ts_monte_carlo_propensities_match_how_often_it_picks_each_movie():
    # A fresh network at the schedule's first dropout rate, 0.99: every movie is picked now and then.
    tf.random.set_seed(4)
    draws = 400
    probabilities, actions = agent_and_step("dropout_ts", 20_000, propensity_draws=draws)
    picked = probabilities[np.arange(len(actions)), actions]
    frequencies = np.bincount(actions, minlength=5) / len(actions)
    assert (frequencies > 0.01).all()
    # One user, so one propensity a movie: its estimates average (1 + draws p) / (draws + 1), the
    # pick's own draw counted, and p is the movie's frequency (standard error at most 0.0036).
    for movie, frequency in enumerate(frequencies):
        assert picked[actions == movie].mean() == pytest.approx((1 + draws * frequency) / (draws + 1), abs=0.012)
    # IPW of a target that picks each movie in turn: each weight would average 1 with the true
    # propensities; with the estimates, E[(n + 1) / (1 + Binomial(n, p))] / p, within 5% of it here
    # even for the rarest movie, and the weights seen match that to their own noise.
    wins = np.arange(draws + 1)
    expected = sum(frequency * np.sum(stats.binom.pmf(wins, draws, frequency) * (draws + 1) / (1 + wins))
                   for frequency in frequencies)
    assert expected == pytest.approx(5.0, rel=0.05)
    assert np.mean(1 / picked) == pytest.approx(expected, rel=0.02)
    assert agents.action_probabilities(config.compose(["agent=dropout_ts"]).agent, 5) is None


def test_linucb_saves_its_greedy_policy_and_collects_with_epsilon():
    tf.random.set_seed(1)
    cfg = config.compose(["agent=linucb", "agent.log_epsilon=0.5"]).agent
    spec = tensor_spec.BoundedTensorSpec((), tf.int32, minimum=0, maximum=4)
    built = agents.build_agent(cfg, ts.time_step_spec(tf.TensorSpec([3], tf.float32)), spec, seed=0)
    observation = ts.restart(tf.tile(tf.constant([[0.3, -1.0, 2.0]]), [1000, 1]), batch_size=1000)
    assert len(set(built.policy.action(observation).action.numpy())) == 1  # greedy: one movie for one user
    assert len(set(built.collect_policy.action(observation).action.numpy())) == 5


def test_the_logged_dataset_round_trips_through_mlflow(logged_runs):
    uri, _, ids = logged_runs
    mlflow.set_tracking_uri(uri)
    frame = interactions.load(ids["logs"])
    run = mlflow.MlflowClient(uri).get_run(ids["logs"])
    (logged_input,) = [i for i in run.inputs.dataset_inputs if i.dataset.name == "interactions"]
    assert [tag.value for tag in logged_input.tags if tag.key == "mlflow.data.context"] == ["logged_interactions"]
    assert logged_input.dataset.digest == interactions.as_dataset(frame).digest
    assert run.data.tags[interactions.PROPENSITIES_TAG] == "exact"
    metrics_csv = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=ids["logs"], artifact_path="metrics.csv"))
    per_loop = len(frame) // len(metrics_csv)
    assert len(frame) == int(metrics_csv.step.iloc[-1])
    np.testing.assert_allclose(frame.reward.to_numpy().reshape(-1, per_loop).mean(axis=1),
                               metrics_csv["train/reward"], rtol=1e-9)
    assert frame.propensity.between(0.3 / 10, 1).all()
    assert mlflow.MlflowClient(uri).get_run(ids["linucb_logs"]).data.tags[interactions.PROPENSITIES_TAG] == "unknown"


@pytest.mark.parametrize("override, key", [("env.rank_k=3", "env.rank_k"), ("env.movie_selection=most_rated",
                                            "env.movie_selection"), ("data.rank=5", "data.rank")])
def test_logs_from_another_environment_are_refused_whatever_differs(override, key):
    logs_cfg = config.compose(["data=synthetic"])
    other_cfg = config.compose(["data=synthetic", override])
    with pytest.raises(UserError, match=f"the logs of run x come from another environment than the target: {key} is"):
        interactions.check_same_environment(logs_cfg, other_cfg, "the logs of run x", "the target")


def test_logs_whose_rewards_came_late_or_never_score_a_policy_trained_without_delays():
    """When a reward reached the agent changes its training, not the users, movies or rewards."""
    delayed = config.compose(["data=synthetic", "env.delay=geometric", "env.delay_loops=3", "env.feedback_drop=0.1"])
    interactions.check_same_environment(delayed, config.compose(["data=synthetic"]), "the logs", "the target")
    interactions.check_same_environment(config.compose(["data=synthetic", "env.delay=fixed", "env.delay_loops=2"]),
                                        delayed, "the logs", "the target")


def test_zero_propensities_are_refused():
    feedback = estimators.Feedback(np.eye(2), np.array([0, 1]), np.ones(2), np.array([0.5, 0.0]))
    with pytest.raises(UserError, match=r"a propensity of 0.0 \(round 1\)"):
        interactions.check_propensities(feedback, ["ipw"], "abc", "epsilon_greedy")


@pytest.mark.parametrize("agent, setting, message", [
    ("linucb", "log_epsilon=1.5", "agent.log_epsilon must be in [0, 1], got 1.5"),
    ("lints", "propensity_draws=-1", "agent.propensity_draws must be an integer in [0, 1000], got -1"),
    ("lints", "propensity_draws=5000", "agent.propensity_draws must be an integer in [0, 1000], got 5000"),
    ("dropout_ts", "propensity_draws=5000", "agent.propensity_draws must be an integer in [0, 1000], got 5000"),
])
def test_bad_logging_settings_are_one_line(agent, setting, message):
    with pytest.raises(UserError) as refused:
        agent_and_step(agent, 1, **dict([setting.split("=")]))
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_slates_are_refused_an_epsilon_wrapped_linucb():
    cfg = config.compose(["agent=linucb", "agent.log_epsilon=0.1", "env=movielens_ranking", "data=synthetic"])
    with pytest.raises(UserError, match="agent.log_epsilon must be 0 with slates"):
        experiment.assemble(cfg, data.load(cfg.data))


def test_a_run_made_before_its_env_gained_a_key_is_the_same_environment():
    made_now = config.compose([])
    made_before = OmegaConf.create(OmegaConf.to_container(made_now))
    for key in ("drift", "drift_period", "delay", "delay_loops", "delay_longest", "feedback_drop"):
        del made_before.env[key]
    interactions.check_same_environment(made_before, made_now, "the logs", "the target")
    with pytest.raises(UserError, match="env.drift is none in the logs and switch for the target"):
        interactions.check_same_environment(made_before, config.compose(["env.drift=switch"]), "the logs", "the target")


def test_a_served_monte_carlo_agent_states_no_propensity():
    """The saved policy of LinTS or dropout TS draws no more than its pick (only the collect
    policy estimates propensities): what it serves has an unknown propensity, not a crash."""
    from types import SimpleNamespace

    stated = agents.action_probabilities(config.compose(["agent=lints", "agent.propensity_draws=50"]).agent, 5)
    served = SimpleNamespace(action=np.array([2]), info=SimpleNamespace(predicted_rewards_mean=np.zeros((1, 5))))
    assert np.isnan(np.asarray(stated(served))).all()
