"""src.evaluate end to end: a saved policy or an agent config scored on another run's logs,
and bad input refused in one line."""

from __future__ import annotations

import logging
import re

import mlflow
import pytest

from src import evaluate
from src.evaluation import estimators, interactions


def test_evaluate_prints_every_estimate_beside_the_true_value_and_logs_a_linked_run(logged_runs, capsys):
    uri, _, ids = logged_runs
    evaluate.main([f"target_run_id={ids['target']}", f"logs_run_id={ids['logs']}", f"tracking.uri={uri}",
                   "bootstrap.samples=50"])
    printed = capsys.readouterr().out
    assert "true value (exact, from the simulator)" in printed
    for name in estimators.ESTIMATORS:
        assert re.search(rf"^ *{name} +[-\d.]+ +t ", printed, re.MULTILINE), name  # each estimate names its interval
    # The logger learnt while it logged: said before the table, in one line.
    assert printed.startswith("warning: the logs were collected by epsilon_greedy, which learnt while it logged")
    effective = float(re.search(r"effective sample size .*: ([\d,]+) of", printed).group(1).replace(",", ""))
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_run(ids["logs"]).info.experiment_id],
                                f"tags.`bandits.role` = 'evaluation' and tags.`ope.logs_run_id` = '{ids['logs']}' "
                                f"and tags.`ope.target_run_id` = '{ids['target']}'")
    assert run.info.status == "FINISHED"
    assert run.data.tags["ope.target_run_id"] == ids["target"]
    assert run.data.tags["ope.logs_run_id"] == ids["logs"]
    metrics = run.data.metrics
    # The synthetic rewards are linear in the features, so the direct method's model is nearly exact.
    assert abs(metrics["ope/dm_error"]) < 0.05 * metrics["ope/true_value"]
    assert abs(metrics["ope/dr_error"]) < 0.05 * metrics["ope/true_value"]
    assert round(metrics[evaluate.EFFECTIVE_SAMPLE_SIZE]) == effective
    assert {"estimates.png", "estimates.json"} <= {a.path for a in client.list_artifacts(run.info.run_id)}


@pytest.mark.parametrize("arguments, message", [
    ([], "give exactly one of target_run_id=, target_model_uri= and target_agent= (usage: python -m src.evaluate"),
    (["logs_run_id={logs}"], "give exactly one of target_run_id=, target_model_uri= and target_agent="),
    (["target_agent=nope", "logs_run_id={logs}"], "unknown agent 'nope'; choose one of:"),
    (["target_run_id={target}"], "give logs_run_id="),
    (["target_run_id={target}", "logs_run_id={logs}", "estimators=[dm,magic]"], "estimators must be a non-empty list"),
    (["target_run_id={target}", "logs_run_id={logs}", "estimator_params.switch_dr.tau=-1"],
     "estimator_params.switch_dr.tau must be > 0, or null for the number of actions, got -1"),
    (["target_run_id={target}", "logs_run_id={logs}", "+estimator_params.magic.tau=1"],
     "estimator_params.magic: no such estimator; choose from dm, ipw, snipw, dr, switch_dr"),
    (["target_run_id={target}", "logs_run_id={logs}", "interval=magic"],
     "interval must be one of t, bootstrap, bernstein, anytime, got 'magic'"),
    (["target_run_id={target}", "logs_run_id={logs}", "confidence=1.5"], "confidence must be in (0, 1), got 1.5"),
    (["target_run_id={target}", "logs_run_id={logs}", "reward_model_folds=0"],
     "reward_model_folds must be an integer in [1, 100], got 0"),
    (["target_run_id={target}", "logs_run_id={logs}", "switch_tau=3"], "Could not override 'switch_tau'"),
    (["target_run_id={target}", "logs_run_id={target}"], "logged no interactions"),
    (["target_run_id={target}", "logs_run_id={linucb_logs}"], "have no propensities: agent=linucb"),
    (["target_run_id={target_other_movies}", "logs_run_id={logs}"], "the action spaces differ: the logs of run"),
])
def test_bad_input_is_one_line_and_exit_2(logged_runs, caplog, arguments, message):
    uri, _, ids = logged_runs
    assert message in refusal([argument.format(**ids) for argument in arguments] + [f"tracking.uri={uri}"], caplog)


def refusal(argv: list[str], caplog) -> str:
    """The one line src.evaluate refuses `argv` with, having exited 2."""
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as exit_:
        evaluate.main(argv)
    assert exit_.value.code == 2
    (line,) = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert "\n" not in line
    return line


def test_an_agent_config_is_trained_offline_on_the_logs_and_scored_on_the_rest(logged_runs, capsys):
    uri, _, ids = logged_runs
    evaluate.main(["target_agent=lints", f"logs_run_id={ids['logs']}", f"tracking.uri={uri}", "interval=anytime"])
    printed = capsys.readouterr().out
    assert re.search(r"^ *ipw +[-\d.]+ +anytime ", printed, re.MULTILINE)
    assert "learnt while it logged" not in printed  # the anytime sequence holds on a learning logger's logs
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_run(ids["logs"]).info.experiment_id],
                                "tags.`ope.target_agent` = 'lints'")
    assert run.data.tags["ope.train_rounds"] == str(len(interactions.load(ids["logs"])) // 2)


def test_dm_alone_scores_logs_without_propensities(logged_runs, capsys):
    uri, _, ids = logged_runs
    evaluate.main([f"target_run_id={ids['target']}", f"logs_run_id={ids['linucb_logs']}", f"tracking.uri={uri}",
                   "estimators=[dm]", "bootstrap.samples=20"])
    assert re.search(r"^ *dm +[-\d.]+ +t ", capsys.readouterr().out, re.MULTILINE)
