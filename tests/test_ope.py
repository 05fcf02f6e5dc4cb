"""Off-policy evaluation: the estimators against exact values, the logging policies'
propensities against their sampling, the logged dataset in MLflow, and src.evaluate end to end."""

from __future__ import annotations

import logging
import re

import mlflow
import numpy as np
import optuna
import pandas as pd
import pytest
import tensorflow as tf
from tf_agents.specs import tensor_spec
from tf_agents.trajectories import time_step as ts

from src import agents, campaign, config, data, evaluate, experiment, interactions, ope
from src.errors import UserError
from src.training import train
from tests.conftest import SMALL

# A tiny environment with exact values: 4 users (contexts), 3 movies.
REWARDS = np.array([[1.0, 2.0, 3.0], [4.0, 0.0, 1.0], [2.0, 2.0, 5.0], [0.0, 3.0, 1.0]])
TARGET = np.array([2, 0, 2, 1])  # a deterministic target policy: its movie for each user
TRUE_VALUE = REWARDS[np.arange(4), TARGET].mean()


def logged(rng, rounds: int, logging_probabilities: np.ndarray) -> tuple[ope.Feedback, np.ndarray]:
    """Rounds of uniformly drawn users, each acted on by the logging distribution of its user."""
    users = rng.integers(4, size=rounds)
    cumulative = logging_probabilities[users].cumsum(axis=1)
    actions = (rng.random((rounds, 1)) > cumulative).sum(axis=1)
    feedback = ope.Feedback(np.eye(4)[users], actions, REWARDS[users, actions],
                            logging_probabilities[users, actions])
    return feedback, users


def target_terms(feedback, users, reward_estimates) -> ope.Terms:
    return ope.terms(feedback, np.eye(3)[TARGET[users]], reward_estimates[users])


def mean_over_seeds(name: str, logging_probabilities, reward_estimates, seeds: int = 2000, rounds: int = 50):
    estimates = []
    for seed in range(seeds):
        feedback, users = logged(np.random.default_rng(seed), rounds, logging_probabilities)
        estimates.append(ope.estimate(name, target_terms(feedback, users, reward_estimates)))
    return np.mean(estimates), np.std(estimates) / np.sqrt(seeds)


UNIFORM = np.full((4, 3), 1 / 3)
SKEWED = np.array([[0.8, 0.1, 0.1], [0.1, 0.1, 0.8], [0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
WRONG_MODEL = np.full((4, 3), 2.0)  # a reward model far from the truth


@pytest.mark.parametrize("name, logging_probabilities, reward_estimates", [
    ("ipw", UNIFORM, WRONG_MODEL),
    ("ipw", SKEWED, WRONG_MODEL),
    ("dr", SKEWED, WRONG_MODEL),  # unbiased whatever the reward model, given true propensities
])
def test_importance_weighted_estimators_are_unbiased(name, logging_probabilities, reward_estimates):
    mean, standard_error = mean_over_seeds(name, logging_probabilities, reward_estimates)
    assert abs(mean - TRUE_VALUE) < 4 * standard_error
    # ... while the wrong model alone is off by far more than that
    assert abs(mean_over_seeds("dm", logging_probabilities, reward_estimates)[0] - TRUE_VALUE) > 0.2


def test_dm_and_dr_equal_the_truth_when_the_reward_model_is_exact():
    # Every user once: the logged contexts are the population, so the exact model gives the true value.
    feedback = ope.Feedback(np.eye(4), np.array([0, 1, 2, 0]), REWARDS[np.arange(4), [0, 1, 2, 0]], np.full(4, 1 / 3))
    t = target_terms(feedback, np.arange(4), REWARDS)
    assert ope.estimate("dm", t) == pytest.approx(TRUE_VALUE)
    assert ope.estimate("dr", t) == pytest.approx(TRUE_VALUE)


def test_the_fitted_reward_model_recovers_linear_rewards():
    rng = np.random.default_rng(0)
    contexts = rng.normal(size=(600, 5))
    weights = rng.normal(size=(4, 5))
    actions = rng.integers(4, size=600)
    rewards = np.einsum("nd,nd->n", contexts, weights[actions]) + 3.0
    coefficients = ope.fit_reward_model(ope.Feedback(contexts, actions, rewards, np.full(600, 0.25)), 4, ridge=1e-6)
    np.testing.assert_allclose(ope.predict_rewards(coefficients, contexts), contexts @ weights.T + 3.0, atol=1e-4)


def test_closed_forms_of_snipw_and_switch_dr():
    t = ope.Terms(dm=np.array([1.0, 2.0]), weights=np.array([0.5, 4.0]), rewards=np.array([2.0, 1.0]),
                  residuals=np.array([1.0, -1.0]))
    assert ope.estimate("snipw", t) == pytest.approx((0.5 * 2 + 4 * 1) / 4.5)
    assert ope.estimate("switch_dr", t, switch_tau=np.inf) == pytest.approx(ope.estimate("dr", t))
    assert ope.estimate("switch_dr", t, switch_tau=1.0) == pytest.approx((1.0 + 0.5 * 1.0 + 2.0) / 2)
    assert ope.estimate("switch_dr", t, switch_tau=0.1) == pytest.approx(ope.estimate("dm", t))


def test_the_bootstrap_interval_brackets_the_estimate_and_narrows_with_more_rounds():
    widths = []
    for rounds in (100, 1600):
        feedback, users = logged(np.random.default_rng(1), rounds, SKEWED)
        table = ope.estimate_all(ope.ESTIMATORS, target_terms(feedback, users, 0.5 * REWARDS), 10.0, 200, 0.95, 0)
        assert (table.ci_low <= table.estimate).all() and (table.estimate <= table.ci_high).all()
        widths.append((table.ci_high - table.ci_low).to_numpy())
    # Sixteen times the rounds: about a quarter of the width.
    assert (widths[1] < 0.5 * widths[0]).all()


def agent_and_step(agent: str, batch: int, **hyperparameters):
    """A freshly built agent of `agent`'s config and one collect step on a single user repeated."""
    cfg = config.compose([f"agent={agent}", *(f"agent.{k}={v}" for k, v in hyperparameters.items())]).agent
    spec = tensor_spec.BoundedTensorSpec((), tf.int32, minimum=0, maximum=4)
    time_step_spec = ts.time_step_spec(tf.TensorSpec([3], tf.float32))
    built = agents.build_agent(cfg, time_step_spec, spec)
    observation = tf.tile(tf.constant([[0.3, -1.0, 2.0]]), [batch, 1])
    step = built.collect_policy.action(ts.restart(observation, batch_size=batch))
    return agents.action_probabilities(cfg, 5)(step).numpy(), step.action.numpy()


@pytest.mark.parametrize("agent, hyperparameters", [
    ("epsilon_greedy", {"epsilon": 0.3}),
    ("neural_boltzmann", {"temperature": 0.2}),
    ("random", {}),
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


def test_linucb_has_no_known_propensities():
    assert agents.action_probabilities(config.compose(["agent=linucb"]).agent, 5) is None


@pytest.fixture(scope="module")
def runs(movielens_dir, tmp_path_factory):
    """Training runs on synthetic data: logs of epsilon-greedy and of LinUCB, LinUCB policies
    on the same environment and on two others. Returns (tracking URI, data overrides, run ids)."""
    from src.data.synthetic import checksum_override

    directory, checksums = movielens_dir
    data = [f"data.dir={directory}", checksum_override(checksums)]
    uri = f"sqlite:///{tmp_path_factory.mktemp('ope') / 'mlflow.db'}"

    def run(*overrides):
        train(config.compose([*data, f"tracking.uri={uri}", *SMALL, "tracking.artifacts=light", *overrides]))
        return mlflow.last_active_run().info.run_id

    ids = {
        "logs": run("agent=epsilon_greedy", "agent.epsilon=0.3", "tracking.log_interactions=true",
                    "tracking.save_policy=false"),
        "linucb_logs": run("agent=linucb", "tracking.log_interactions=true", "tracking.save_policy=false"),
        "target": run("agent=linucb", "tracking.artifacts=full"),
        "target_other_movies": run("agent=linucb", "tracking.artifacts=full", "env.num_movies=8"),
    }
    return uri, data, ids


def test_the_logged_dataset_round_trips_through_mlflow(runs):
    uri, _, ids = runs
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


def test_evaluate_prints_every_estimate_beside_the_true_value_and_logs_a_linked_run(runs, capsys):
    uri, data, ids = runs
    evaluate.main([f"target_run_id={ids['target']}", f"logs_run_id={ids['logs']}", f"tracking.uri={uri}",
                   "bootstrap.samples=50"])
    printed = capsys.readouterr().out
    assert "true value (exact, from the simulator)" in printed
    for name in ope.ESTIMATORS:
        assert f"\n{name:>9} " in printed
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_run(ids["logs"]).info.experiment_id],
                                "tags.`bandits.role` = 'evaluation'")
    assert run.info.status == "FINISHED"
    assert run.data.tags["ope.target_run_id"] == ids["target"]
    assert run.data.tags["ope.logs_run_id"] == ids["logs"]
    metrics = run.data.metrics
    # The synthetic rewards are linear in the features, so the direct method's model is nearly exact.
    assert abs(metrics["ope/dm_error"]) < 0.05 * metrics["ope/true_value"]
    assert abs(metrics["ope/dr_error"]) < 0.05 * metrics["ope/true_value"]
    assert {"estimates.png", "estimates.json"} <= {a.path for a in client.list_artifacts(run.info.run_id)}


@pytest.mark.parametrize("arguments, message", [
    (["logs_run_id={logs}"], "give exactly one of target_run_id=, target_model_uri= and target_agent="),
    (["target_agent=nope", "logs_run_id={logs}"], "unknown agent 'nope'; choose one of:"),
    (["target_run_id={target}"], "give logs_run_id="),
    (["target_run_id={target}", "logs_run_id={logs}", "estimators=[dm,magic]"], "estimators must be a non-empty list"),
    (["target_run_id={target}", "logs_run_id={target}"], "logged no interactions"),
    (["target_run_id={target}", "logs_run_id={linucb_logs}"], "have no propensities: agent=linucb"),
    (["target_run_id={target_other_movies}", "logs_run_id={logs}"], "the action spaces differ: the logs of run"),
])
def test_bad_input_is_one_line_and_exit_2(runs, caplog, arguments, message):
    uri, _, ids = runs
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as exit_:
        evaluate.main([argument.format(**ids) for argument in arguments] + [f"tracking.uri={uri}"])
    assert exit_.value.code == 2
    (line,) = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert message in line and "\n" not in line


def test_an_agent_config_is_trained_offline_on_the_logs_and_scored_on_the_rest(runs, capsys):
    uri, _, ids = runs
    evaluate.main(["target_agent=lints", f"logs_run_id={ids['logs']}", f"tracking.uri={uri}", "bootstrap.samples=20"])
    assert "\n      ipw " in capsys.readouterr().out
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_run(ids["logs"]).info.experiment_id],
                                "tags.`ope.target_agent` = 'lints'")
    assert run.data.tags["ope.train_rounds"] == str(len(interactions.load(ids["logs"])) // 2)


@pytest.mark.parametrize("override, key", [("env.rank_k=3", "env.rank_k"), ("env.movie_selection=most_rated",
                                            "env.movie_selection"), ("data.rank=5", "data.rank")])
def test_logs_from_another_environment_are_refused_whatever_differs(override, key):
    logs_cfg = config.compose(["data=synthetic"])
    other_cfg = config.compose(["data=synthetic", override])
    with pytest.raises(UserError, match=f"the logs of run x come from another environment than the target: {key} is"):
        interactions.check_same_environment(logs_cfg, other_cfg, "the logs of run x", "the target")


def test_dm_alone_scores_logs_without_propensities(runs, capsys):
    uri, _, ids = runs
    evaluate.main([f"target_run_id={ids['target']}", f"logs_run_id={ids['linucb_logs']}", f"tracking.uri={uri}",
                   "estimators=[dm]", "bootstrap.samples=20"])
    assert "\n       dm " in capsys.readouterr().out


def test_zero_propensities_are_refused():
    feedback = ope.Feedback(np.eye(2), np.array([0, 1]), np.ones(2), np.array([0.5, 0.0]))
    with pytest.raises(UserError, match=r"a propensity of 0.0 \(round 1\)"):
        interactions.check_propensities(feedback, ["ipw"], "abc", "epsilon_greedy")



def offline_overrides(runs, *extra):
    uri, data, ids = runs
    return [*data, f"tracking.uri={uri}", *SMALL, "objective=ope/dr", f"offline.logs_run_id={ids['logs']}", *extra]


def test_an_agent_learns_offline_from_logs_and_is_scored_off_policy(runs):
    # A small alpha: the policy LinUCB leaves offline still adds its exploration bonus.
    cfg = config.compose(offline_overrides(runs, "agent=linucb", "agent.alpha=0.01", "tracking.save_policy=false"))
    final, run_id = train(cfg)
    rewards = experiment.assemble(cfg, data.load(cfg.data)).environment.reward_model.rewards
    assert final["ope/true_value"] > rewards.mean() + 0.5 * (rewards.max(axis=1).mean() - rewards.mean())
    # Linear rewards in the observed features: the estimates are close to the truth.
    for name in ("dm", "dr"):
        assert abs(final[f"ope/{name}"] - final["ope/true_value"]) < 0.05 * final["ope/true_value"]
    run = mlflow.MlflowClient(runs[0]).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["ope/dr"] == pytest.approx(final["ope/dr"])


@pytest.mark.parametrize("extra, message", [
    (["objective=ope/ipw", "offline.logs_run_id={linucb_logs}"], "have no propensities: agent=linucb"),
    (["offline.logs_run_id=null"], "offline.logs_run_id must be a run trained with tracking.log_interactions=true"),
    (["env.num_movies=8"], "the action spaces differ"),
    (["offline.train_share=1"], "offline.train_share must be in (0, 1)"),
])
def test_offline_bad_input_is_one_line_before_any_run(runs, extra, message):
    uri, _, ids = runs
    client = mlflow.MlflowClient(uri)
    before = len(client.search_runs([client.get_run(ids["logs"]).info.experiment_id]))
    with pytest.raises(UserError, match=re.escape(message)) as error:
        train(config.compose(offline_overrides(runs, *(e.format(**ids) for e in extra))))
    assert "\n" not in str(error.value)
    assert len(client.search_runs([client.get_run(ids["logs"]).info.experiment_id])) == before


def test_a_sweep_tunes_an_agent_offline_and_registers_its_best(runs, tmp_path):
    uri, _, _ = runs
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    overrides = [o for o in offline_overrides(runs, "hparams_search=linucb_offline", "hydra.sweeper.n_trials=2",
                                              f"hydra.sweeper.storage={storage}", "tracking.experiment=offline")
                 if o != "objective=ope/dr"]
    campaign.work(overrides)
    study = optuna.load_study(study_name="linucb_offline", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    client = mlflow.MlflowClient(uri)
    trials = client.search_runs([client.get_experiment_by_name("offline").experiment_id], "tags.`sweep.trial` != ''")
    assert sorted(run.data.metrics["ope/dr"] for run in trials) == pytest.approx(sorted(t.value for t in study.trials))
    (version,) = client.search_model_versions("name = 'linucb_offline-best'")
    assert version.run_id in {run.info.run_id for run in trials}
