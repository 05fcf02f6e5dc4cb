"""src.predict on a tiny LinUCB run over synthetic data (the served model it shares: tests/serving)."""

from __future__ import annotations

import json
import logging

import mlflow
import numpy as np
import pandas as pd
import pytest

from src import predict, tracking
from src.errors import UserError
from src.training import train
from tests.serving.trained import USER, greedy_movie, train_with_policy


@pytest.fixture
def trained(make_config, monkeypatch):
    return train_with_policy(make_config, monkeypatch)


def test_predicts_the_trained_policys_movie(trained, run_cli, tracking_uri, tmp_path, caplog):
    run_id, policy, catalogue = trained
    movie, title = greedy_movie(policy, catalogue, USER)
    done = run_cli("src.predict", f"run_id={run_id}", f"user_id={USER}", "top_k=3",
                   f"tracking.uri={tracking_uri}")
    assert done.returncode == 0, done.stderr
    assert f'user {USER}: recommended movie {movie} "{title}"' in done.stdout
    assert "true rating" in done.stdout and f"best for user {USER}: movie" in done.stdout
    # Movies the user never rated are said to be, not shown as a true rating of 0.000 alone.
    assert "rated" in done.stdout.splitlines()[-4] and "not rated" in done.stdout
    assert [line.split()[0] for line in done.stdout.splitlines()[-3:]] == ["1", "2", "3"]

    with pytest.raises(SystemExit) as exit:  # in-process: the fresh process is proven above
        predict.main([f"run_id={run_id}", "user_id=100000", f"tracking.uri={tracking_uri}"])
    assert exit.value.code == 2
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR] == [
        "user_id must be a MovieLens user id, 1..60, got 100000"]

    mlflow.register_model(f"runs:/{run_id}/model", "tiny")
    rows = tmp_path / "rows.csv"
    np.savetxt(rows, catalogue.observations_of([USER, USER]), delimiter=",")
    for source, target in [("model_uri=models:/tiny/1", f"user_id={USER}"),
                           (f"model_uri=runs:/{run_id}/policy", f"input={rows}")]:
        report = predict.recommend(predict.parse([source, target, f"tracking.uri={tracking_uri}"]))
        assert f'recommended movie {movie} "{title}"' in report

    (tmp_path / "short.json").write_text(json.dumps([[0.1, 0.2, 0.3]]))
    with pytest.raises(UserError, match="must have 4 features"):
        predict.recommend(predict.parse([f"run_id={run_id}", f"input={tmp_path / 'short.json'}",
                                         f"tracking.uri={tracking_uri}"]))


@pytest.mark.parametrize("arguments, message", [
    (["run_id=0123456789abcdef0123456789abcdef", "user_id=1"], "no run 0123456789abcdef"),
    (["user_id=1"], "exactly one of run_id= and model_uri="),
    (["run_id=abc", "user_id=0"], "user_id must be an integer >= 1"),
    (["run_id=abc", "user_id=1", "input=x.csv"], "exactly one of user_id= and input="),
    (["run_id=abc", "bogus=1", "user_id=1"], "Could not override 'bogus'"),
])
def test_bad_arguments_are_one_clear_error(tracking_uri, arguments, message):
    tracking.connect(tracking_uri, "movielens-bandits")  # the store exists; the runs asked for do not
    with pytest.raises(UserError, match=message) as error:
        predict.recommend(predict.parse([*arguments, f"tracking.uri={tracking_uri}"]))
    assert "\n" not in str(error.value)


def test_a_store_that_is_not_there_is_refused_not_made(tmp_path):
    store = tmp_path / "mistyped.db"
    with pytest.raises(UserError, match=f"^no tracking store at sqlite:///{store}: point the command at"):
        predict.recommend(predict.parse(["run_id=abc", "user_id=1", f"tracking.uri=sqlite:///{store}"]))
    assert not store.exists()


def test_run_without_policy_is_refused(make_config, tracking_uri, tmp_path, monkeypatch):
    train(make_config("training.loops=20"))
    run_id = mlflow.last_active_run().info.run_id
    with pytest.raises(UserError, match=f"run {run_id} has no saved policy"):
        predict.recommend(predict.parse([f"run_id={run_id}", "user_id=1", f"tracking.uri={tracking_uri}"]))


def test_a_per_arm_policy_ranks_the_whole_catalogue(make_config, monkeypatch, tracking_uri):
    """A per-arm policy scores candidate sets of its own size; served, it ranks every movie of the
    pool by its predicted reward, x . theta of the trained model for x = [user, the movie's features]
    (here with the user-movie products of env=movielens_ratings; tests/test_agents.py serves a
    movielens_per_arm policy too)."""
    run_id, policy, catalogue = train_with_policy(make_config, monkeypatch, "env=movielens_ratings",
                                                  "env.num_movies=null", "env.num_actions=4", "agent=linucb")
    user = int(catalogue.user_ids[3])
    observation = catalogue.observations_of([user])[0]
    theta = policy._statistics.theta.numpy()[0]
    expected = np.concatenate([np.repeat(observation[None], len(catalogue.movie_ids), 0),
                               catalogue.candidates_for(observation)], axis=1) @ theta
    answer = mlflow.pyfunc.load_model(f"runs:/{run_id}/model").predict(pd.DataFrame({"user_id": [user]}))
    scores = np.array([answer.scores[0][str(movie)] for movie in catalogue.movie_ids])
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-5)
    assert answer.movie_id[0] == catalogue.movie_ids[np.argmax(expected)]
    report = predict.recommend(predict.parse([f"run_id={run_id}", f"user_id={user}", "top_k=5",
                                              f"tracking.uri={tracking_uri}"]))
    assert f"{len(catalogue.movie_ids)} candidate movies" in report
    assert [line.split()[0] for line in report.splitlines()[-5:]] == ["1", "2", "3", "4", "5"]
