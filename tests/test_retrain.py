"""src.retrain end to end: a registered champion, the decisions it logged with exploration, and a
round that refuses a worse challenger, promotes a better one, or has nothing to learn from."""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import tempfile
import time
import uuid
from pathlib import Path

import mlflow
import mlflow.pyfunc
import numpy as np
import pytest

from src import artifacts, data, retrain, serving, tracking
from src.envs import build_environment
from src.serving.decision_log import Decision, DecisionLog, default_url
from src.training import train

NAME = "recommender"
EPSILON = 0.2


def register_champion(make_config, agent: str) -> tuple[str, object]:
    """Train `agent` with its policy saved, register it as NAME's @champion; (run id, config)."""
    cfg = make_config("tracking.save_policy=true", f"agent={agent}")
    _, run_id = train(cfg)
    client = mlflow.MlflowClient()
    version = mlflow.register_model(f"models:/{mlflow.last_logged_model().model_id}", NAME)
    client.set_registered_model_alias(NAME, "champion", version.version)
    return run_id, cfg


def log_decisions(url: str, cfg, run_id: str, rounds: int, seed: int = 0, known: bool = True,
                  apart_s: float = 1.0, served_by: str = f"models:/{NAME}@champion", for_users: bool = True) -> None:
    """`rounds` decisions of the run's policy exploring with probability EPSILON (exact
    propensities, or unknown: NaN), users drawn uniformly, `apart_s` apart ending now, each
    rewarded from the simulator, written to the decision log at `url` as `served_by`'s (and
    made for the users' ids, or from their features alone)."""
    dataset = data.load(cfg.data)
    reward_model = build_environment(cfg, dataset).reward_model
    with tempfile.TemporaryDirectory() as scratch:
        _, policy_path = artifacts.fetch_policy(run_id, None, Path(scratch))
        greedy, _ = serving.Policy(policy_path).decide(reward_model.user_features)
    rng = np.random.default_rng(seed)
    users, movies = reward_model.rewards.shape
    rows = rng.integers(users, size=rounds)
    actions = np.where(rng.random(rounds) < EPSILON, rng.integers(movies, size=rounds), greedy[rows])
    propensities = EPSILON / movies + (1 - EPSILON) * (actions == greedy[rows]) if known else np.full(rounds, np.nan)
    start = time.time() - rounds * apart_s
    logged = [Decision(uuid.uuid4().hex, int(reward_model.user_ids[row]) if for_users else None,
                       reward_model.user_features[row].astype(np.float32), int(action),
                       int(reward_model.movie_ids[action]), float(propensity), served_by, "1", start + i * apart_s)
              for i, (row, action, propensity) in enumerate(zip(rows, actions, propensities))]
    decision_log = DecisionLog(url)
    try:  # submitted together, they commit in a few transactions rather than one each
        for future in [decision_log.submit_decision(decision) for decision in logged]:
            future.result()
        for future in [decision_log.submit_feedback(decision.decision_id, reward_model.rewards[row, decision.action])
                       for decision, row in zip(logged, rows)]:
            assert future.result()
    finally:
        decision_log.close()


@pytest.fixture
def decision_log(tracking_uri):
    """The service's default decision log for the test's tracking store, beside it."""
    mlflow.set_tracking_uri(tracking_uri)
    return default_url(tracking_uri)


def round_of(tracking_uri, *overrides: str):
    retrain.main([f"tracking.uri={tracking_uri}", "bootstrap.samples=500", *overrides])


def rounds(tracking_uri):
    client = mlflow.MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(retrain.EXPERIMENT)
    return [] if experiment is None else client.search_runs([experiment.experiment_id])


def champion_version(tracking_uri) -> str:
    return str(mlflow.MlflowClient(tracking_uri).get_model_version_by_alias(NAME, "champion").version)


def test_a_random_challenger_is_refused_and_the_champion_stays(make_config, tracking_uri, decision_log, capsys):
    run_id, cfg = register_champion(make_config, "linucb")
    log_decisions(decision_log, cfg, run_id, 3000)
    round_of(tracking_uri, "agent=random")
    printed = capsys.readouterr().out
    assert "refused: challenger - champion = " in printed and "@champion stays at models:/recommender/1" in printed
    (run,) = rounds(tracking_uri)
    tags, metrics, params = run.data.tags, run.data.metrics, run.data.params
    assert run.info.status == "FINISHED"
    assert tags["bandits.role"] == "retrain" and tags[retrain.DECISION_TAG] == "refused"
    assert tags[retrain.ROUND_TAG] == "1" and tags[retrain.CHAMPION_VERSION_TAG] == "1"
    assert tags[retrain.REASON_TAG].startswith("refused: ")
    assert params["agent.name"] == "random" and params["retrain.start"] == "warm"
    assert params["retrain.holdout_rounds"] == "900" and params["retrain.train_rounds"] == "2100"
    assert metrics["gate/lower_bound"] < 0 < metrics["champion/true_value"] - metrics["challenger/true_value"]
    assert metrics["champion/dr_ci_low"] < metrics["champion/dr"] < metrics["champion/dr_ci_high"]
    assert run.inputs.dataset_inputs[0].tags[0].value == "decision_log"
    assert champion_version(tracking_uri) == "1"
    assert len(mlflow.MlflowClient(tracking_uri).search_model_versions(f"name = '{NAME}'")) == 1


def test_a_better_challenger_is_promoted_and_the_next_round_starts_where_it_ended(
        make_config, tracking_uri, decision_log, capsys, caplog):
    run_id, cfg = register_champion(make_config, "random")
    log_decisions(decision_log, cfg, run_id, 3000)
    # Beside them in the same log, another model's decisions and requests sent as raw features:
    # not this model's users' decisions, left out of its round.
    log_decisions(decision_log, cfg, run_id, 500, seed=5, served_by="models:/another/3")
    log_decisions(decision_log, cfg, run_id, 200, seed=6, for_users=False)
    round_of(tracking_uri, "agent=linucb")
    assert "@champion -> models:/recommender/2" in capsys.readouterr().out
    (run,) = rounds(tracking_uri)
    assert run.data.params["retrain.window_rounds"] == "3000"
    assert run.data.tags[retrain.DECISION_TAG] == "promoted"
    assert run.data.tags[retrain.PROMOTED_VERSION_TAG] == "2" == champion_version(tracking_uri)
    assert run.data.metrics["challenger/true_value"] > run.data.metrics["champion/true_value"]
    version = mlflow.MlflowClient(tracking_uri).get_model_version(NAME, "2")
    assert version.run_id == run.info.run_id
    # The promoted version serves as a training run's policy does: its run's config and model.
    with tempfile.TemporaryDirectory() as scratch:
        source, _ = artifacts.fetch_policy(None, f"models:/{NAME}@champion", Path(scratch))
        assert artifacts.logged_config(source, Path(scratch)).agent.name == "linucb"
    # Round 2 challenges version 2 on the decisions since round 1 ended: none yet.
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as exit_:
        round_of(tracking_uri, "agent=linucb")
    assert exit_.value.code == 2
    assert "nothing to learn from" in caplog.records[-1].getMessage()
    assert len(rounds(tracking_uri)) == 1 and champion_version(tracking_uri) == "2"
    # Then version 2 serves 1,000 more: round 2 gates on their latest 300, a warm start learns
    # from everything else, and the random agent does not replace LinUCB.
    log_decisions(decision_log, cfg, run.info.run_id, 1000, seed=1, apart_s=0.001)
    round_of(tracking_uri, "agent=random")
    latest, first = rounds(tracking_uri)
    assert latest.data.tags[retrain.ROUND_TAG] == "2" and latest.data.tags[retrain.CHAMPION_VERSION_TAG] == "2"
    assert latest.data.tags[retrain.SINCE_TAG] == first.data.tags[retrain.UNTIL_TAG]
    assert latest.data.tags[retrain.DECISION_TAG] == "refused" and champion_version(tracking_uri) == "2"
    params = latest.data.params
    assert (params["retrain.window_rounds"], params["retrain.holdout_rounds"], params["retrain.train_rounds"]) == (
        "1000", "300", "3700")


def test_unknown_propensities_are_refused_by_dr_and_gated_by_dm(make_config, tracking_uri, decision_log, caplog,
                                                               capsys):
    run_id, cfg = register_champion(make_config, "random")
    log_decisions(decision_log, cfg, run_id, 1000, known=False)
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as exit_:
        round_of(tracking_uri)
    assert exit_.value.code == 2
    assert "has propensity nan: estimator=dr weights by propensities in (0, 1]; estimator=dm needs none" in \
        caplog.records[-1].getMessage()
    assert rounds(tracking_uri) == []
    round_of(tracking_uri, "estimator=dm")
    assert "by dm on 300 rounds" in capsys.readouterr().out


@pytest.mark.parametrize("existing, message", [
    (False, "nothing to learn from: there is no decision log at sqlite:///"),
    (True, "nothing to learn from: no decision of models:/recommender in sqlite:///"),
])
def test_nothing_to_learn_from_exits_2_and_registers_nothing(make_config, tracking_uri, decision_log, caplog,
                                                             existing, message):
    register_champion(make_config, "linucb")
    if existing:
        DecisionLog(decision_log).close()
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as exit_:
        round_of(tracking_uri)
    assert exit_.value.code == 2
    (line,) = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert line.startswith(message) and "\n" not in line
    assert rounds(tracking_uri) == [] and champion_version(tracking_uri) == "1"
    assert existing == Path(decision_log.removeprefix("sqlite:///")).exists()  # a round only reads


@pytest.mark.parametrize("arguments, message", [
    (["model=runs:/abc/model"], "model must be a registered model, models:/<name>@<alias> or models:/<name>/<version>"),
    (["window=0"], "window must be since_last_round or a number of seconds > 0, got 0"),
    (["agent=nope"], "unknown agent 'nope'; choose one of:"),
    (["agent.alpha=abc"], "agent.alpha must be a number, got 'abc' (conf/agent/linucb.yaml)"),
    (["start=hot"], "start must be warm or scratch, got 'hot'"),
    (["holdout_share=1"], "holdout_share must be in (0, 1), got 1"),
    (["estimator=magic"], "estimator_params.magic: no such estimator"),
    (["confidence=1.5"], "confidence must be in (0, 1), got 1.5"),
    (["holdout_share=half"], "holdout_share must be a finite number, got 'half'"),
    (["min_gain=inf"], "min_gain must be a finite number, got inf"),
    (["min_gain=2e6"], "min_gain must be a number of mean reward, at most 1e+06 in size, got 2000000.0"),
    (["bootstrap.samples=3"], "bootstrap.samples must be an integer in [100, 100000], got 3"),
    (["interval=anytime"], "interval must be one of bootstrap, t, bernstein, got 'anytime'"),
    (["windw=3"], "Could not override 'windw'"),
])
def test_bad_arguments_are_one_line_before_anything_loads(arguments, message):
    with pytest.raises(retrain.UserError, match=None) as error:
        retrain.parse(arguments)
    assert message in str(error.value) and "\n" not in str(error.value)


class NotAPolicy(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input: list[str], params=None) -> list[str]:
        return model_input


@pytest.mark.parametrize("arguments, message", [
    (["model=models:/nobody@champion"], "model=models:/nobody@champion: no such registered model version in"),
    (["model=models:/recommender/7"], "model=models:/recommender/7: no such registered model version in"),
    (["model=models:/other/1"], "is not a policy model logged by src.train"),
    (["tracking.uri=http://127.0.0.1:9"], "cannot reach the MLflow tracking server at http://127.0.0.1:9"),
    (["tracking.uri=sqlite:///{tmp_path}/elsewhere/mlflow.db"], "no tracking store at sqlite:///"),
    (["decision_log={future_log}"], "has schema version 2; this code reads version 1"),
    (["decision_log=postgresql://bandits:pw@127.0.0.1:9/decisions"],  # PostgreSQL down
     "cannot reach the decision log postgresql+psycopg://bandits:***@127.0.0.1:9/decisions"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(make_config, tracking_uri, decision_log, tmp_path, caplog,
                                                         arguments, message):
    register_champion(make_config, "random")
    with mlflow.start_run(experiment_id=tracking.connect(tracking_uri, "elsewhere")):  # its artifacts in tmp_path
        mlflow.pyfunc.log_model(name="model", python_model=NotAPolicy())
    mlflow.register_model(f"models:/{mlflow.last_logged_model().model_id}", "other")
    future_log = tmp_path / "future.db"
    with contextlib.closing(sqlite3.connect(future_log)) as database, database:
        database.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        database.execute("INSERT INTO schema_version VALUES (2)")
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as exit_:
        retrain.main([f"tracking.uri={tracking_uri}", *(argument.format(future_log=f"sqlite:///{future_log}",
                                                                        tmp_path=tmp_path) for argument in arguments)])
    assert exit_.value.code == 2
    (line,) = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert message in line and "\n" not in line
    assert rounds(tracking_uri) == [] and champion_version(tracking_uri) == "1"
    assert not (tmp_path / "elsewhere").exists()


# Found in review: the challenger took the champion's training settings, so a champion logged
# before training.jit_compile existed broke retraining, and a compiled one had XLA refuse LinUCB.
@pytest.mark.parametrize("compiled", [None, True])
def test_a_challenger_learns_offline_whatever_its_champion_compiled(compiled):
    from omegaconf import OmegaConf, open_dict

    from src import config

    champion = config.compose(["agent=epsilon_greedy"])
    with open_dict(champion):
        if compiled is None:
            del champion.training["jit_compile"]
        else:
            champion.training.jit_compile = compiled
    champion = OmegaConf.create(OmegaConf.to_container(champion))  # as read back from a run's config.yaml
    challenger = retrain.challenger_config(champion, retrain.parse(["agent=linucb"]))
    assert challenger.agent.name == "linucb" and challenger.training.jit_compile is False
