"""Logged slates (env=movielens_ranking, tracking.log_interactions=true): the propensities the
log carries against how each logger really sampled, and src.evaluate on them end to end."""

from __future__ import annotations

import re

import mlflow
import numpy as np
import pytest

from src import agents, config, data, evaluate
from src.data.synthetic import checksum_override
from src.envs import build_environment
from src.errors import UserError
from src.evaluation import interactions, slates
from tests.conftest import SMALL
from tests.test_evaluate import refusal

SLATES = ["env=movielens_ranking", "env.num_actions=4", "env.slate_size=2", "env.feedback=scores",
          "training.loops=300"]
LOGGERS = {
    "random": ["agent=random"],
    "epsilon_greedy": ["agent=epsilon_greedy", "agent.epsilon=0.5"],
    "plackett_luce": ["agent=ranking", "agent.policy=no_penalty", "agent.temperature=2.0"],
}


@pytest.fixture(scope="session")
def slate_runs(movielens_dir, tmp_path_factory):
    """Slates logged by each of LOGGERS and by LinUCB (no propensities), and a greedy ranking
    policy to score: (tracking URI, the config of the environment, run ids)."""
    from src.training import train  # here: only these runs need the whole training stack

    directory, checksums = movielens_dir
    uri = f"sqlite:///{tmp_path_factory.mktemp('slates') / 'mlflow.db'}"
    base = [f"data.dir={directory}", checksum_override(checksums), f"tracking.uri={uri}", *SMALL, *SLATES,
            "tracking.artifacts=light"]

    def run(*overrides):
        train(config.compose([*base, *overrides]))
        return mlflow.last_active_run().info.run_id

    logged = ["tracking.log_interactions=true", "tracking.save_policy=false"]
    ids = {name: run(*overrides, *logged) for name, overrides in LOGGERS.items()}
    ids["linucb"] = run("agent=linucb", *logged)
    ids["target"] = run("agent=ranking", "agent.policy=descending_scores", "tracking.artifacts=full")
    return uri, config.compose(base), ids


def logged_slates(slate_runs, logger: str):
    uri, cfg, ids = slate_runs
    mlflow.set_tracking_uri(uri)
    frame = interactions.load(ids[logger])
    model = build_environment(cfg, data.load(cfg.data)).reward_model
    return interactions.slate_log_of(frame, model, ids[logger]), model


@pytest.mark.parametrize("logger", list(LOGGERS))
def test_logged_propensities_weigh_any_target_without_bias(slate_runs, logger):
    """E over the logger's draws of pi(s) / mu(s) is 1 for any target pi, and so is each position's
    ratio: the mean weights of a fixed target test the propensities against the logger's own
    sampling, including that the scores logged are those it sampled with."""
    (log, rows, candidates), model = logged_slates(slate_runs, logger)
    assert len(log) == 300 * 16
    assert ((log.logging.prefix > 0) & (log.logging.prefix <= 1)).all()
    assert (np.diff(log.logging.prefix, axis=1) <= 0).all()
    np.testing.assert_allclose(log.logging.prefix[:, 0], log.logging.position[:, 0], rtol=1e-12)
    scores = np.random.default_rng(5).normal(size=model.rewards.shape)
    target = slates.top_k(scores[rows[:, None], candidates], log.slates)
    weights = np.column_stack([target.slate / log.logging.slate, target.position / log.logging.position])
    standard_errors = weights.std(axis=0, ddof=1) / np.sqrt(len(weights))
    # 4,800 rounds of weights at most 24 (1 / (0.5 / 12) for epsilon-greedy; PL's are smaller here).
    assert (np.abs(weights.mean(axis=0) - 1) < 4 * standard_errors).all(), weights.mean(axis=0)
    assert (standard_errors < 0.1).all()


def test_a_uniform_logger_logs_its_exact_probabilities(slate_runs):
    (log, _, _), _ = logged_slates(slate_runs, "random")
    np.testing.assert_allclose(log.logging.position, 1 / 4, rtol=1e-12)
    np.testing.assert_allclose(log.logging.prefix, [[1 / 4, 1 / 12]] * len(log), rtol=1e-12)


def test_a_logger_without_closed_form_logs_unknown_propensities(slate_runs):
    uri, cfg, ids = slate_runs
    mlflow.set_tracking_uri(uri)
    assert mlflow.get_run(ids["linucb"]).data.tags[interactions.PROPENSITIES_TAG] == "unknown"
    assert mlflow.get_run(ids["plackett_luce"]).data.tags[interactions.PROPENSITIES_TAG] == "exact"
    frame = interactions.load(ids["linucb"])
    assert frame.filter(like=interactions.PREFIX_PROPENSITY_PREFIX).isna().all(axis=None)
    with pytest.raises(UserError, match="have no propensities"):
        interactions.slate_log_of(frame, build_environment(cfg, data.load(cfg.data)).reward_model, ids["linucb"])


def test_plackett_luce_logs_are_refused_where_their_sums_would_not_end():
    ranking = config.compose(["agent=ranking"]).agent
    assert agents.slate_probabilities(ranking, 20, 5) is not None  # the environment's default: 6,196 sets
    with pytest.raises(UserError, match="env.num_actions must be small enough .* 4,087,976 sets"):
        agents.slate_probabilities(ranking, 100, 5)
    assert agents.slate_probabilities(config.compose(["agent=ranking", "agent.policy=cosine_distance"]).agent,
                                      100, 5) is None


def test_evaluate_scores_a_saved_slate_policy_within_its_interval_of_the_exact_value(slate_runs, capsys):
    uri, _, ids = slate_runs
    evaluate.main([f"target_run_id={ids['target']}", f"logs_run_id={ids['random']}", f"tracking.uri={uri}"])
    printed = capsys.readouterr().out
    true_value = float(re.search(r"true value \(exact, from the simulator\): ([-\d.]+)", printed).group(1))
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_run(ids["random"]).info.experiment_id],
                                f"tags.`ope.logs_run_id` = '{ids['random']}'")
    metrics = run.data.metrics
    assert metrics["ope/true_value"] == pytest.approx(true_value, abs=1e-4)
    for name in slates.SLATE_ESTIMATORS:
        assert re.search(rf"^ *{name} +[-\d.]+ +t ", printed, re.MULTILINE), name
    # A fixed uniform logger and additive, item-position rewards (feedback=scores): every estimator
    # is unbiased, and the seeded log's estimates lie well inside 95% t-intervals of the truth.
    for name in ("sips", "iips", "rips", "cascade_dr"):
        half_width = (metrics[f"ope/{name}_ci_high"] - metrics[f"ope/{name}_ci_low"]) / 2
        assert abs(metrics[f"ope/{name}_error"]) < half_width, name
    assert "learnt while it logged" not in printed  # the random agent does not learn


@pytest.mark.parametrize("arguments, message", [
    (["target_agent=lints", "logs_run_id={random}"], "are slates: give the policy to score as target_run_id="),
    (["target_run_id={target}", "logs_run_id={random}", "interval=anytime"],
     "interval must be t or bootstrap on logged slates"),
    (["target_run_id={target}", "logs_run_id={random}", "estimators=[dr]"],
     "estimators must be among the estimators of logged slates: sips, iips, rips, cascade_dr, pi"),
    (["target_run_id={target}", "logs_run_id={linucb}"], "have no propensities"),
])
def test_bad_input_on_slates_is_one_line_and_exit_2(slate_runs, caplog, arguments, message):
    uri, _, ids = slate_runs
    assert message in refusal([argument.format(**ids) for argument in arguments] + [f"tracking.uri={uri}"], caplog)


def test_slate_warnings_name_a_learning_logger_weights_that_miss_their_expectation_and_parts_too_heavy():
    balanced = np.tile([0.0, 2.0], 500)  # mean 1, as the whole-slate weights average in expectation
    assert evaluate.slate_caveats("t", "random", balanced, 500.0, 50.0) == []
    (learning,) = evaluate.slate_caveats("bootstrap", "ranking", balanced, 500.0, 50.0)
    assert "logged by ranking, which learnt while it logged; the bootstrap interval" in learning
    (missing,) = evaluate.slate_caveats("t", "random", np.tile([0.0, 0.2], 500), 500.0, 50.0)
    assert "average 0.100" in missing and "standard errors from the 1" in missing
    (none_shown,) = evaluate.slate_caveats("t", "random", np.zeros(1000), 0.0, 50.0)
    assert none_shown.startswith("no logged slate is one the target would show") and "more rounds behind" in none_shown
    # A Plackett-Luce logger at temperature 0.1 gave the target's movies 1e-13 at their positions.
    none_shown, too_heavy = evaluate.slate_caveats("t", "random", np.zeros(1000), 0.0, 6e12)
    assert "more rounds behind" not in none_shown
    assert too_heavy.startswith("a position's or prefix's weight reaches 6e+12") and "outweighs all 1,000" in too_heavy
    assert evaluate.slate_caveats("t", "random", balanced, 500.0, 1000.0) == []  # at most the rounds: no warning
