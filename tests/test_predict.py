"""src.predict and the served pyfunc model, on a tiny LinUCB run over synthetic data."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from absl import logging as absl_logging
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import scoring_server
from tf_agents.trajectories import time_step as ts

from src import predict, serving
from src.errors import UserError
from src.training import train
from tests.conftest import free_port

USER = 7


def train_with_policy(make_config, monkeypatch, *overrides: str):
    """Train with the policy saved; return (run id, in-memory greedy policy, catalogue)."""
    logged = {}
    log_policy = serving.log_policy

    def spy(policy, catalogue):
        logged.update(policy=policy, catalogue=catalogue)
        log_policy(policy, catalogue)

    monkeypatch.setattr(serving, "log_policy", spy)
    train(make_config("tracking.save_policy=true", *overrides))
    return mlflow.last_active_run().info.run_id, logged["policy"], logged["catalogue"]


@pytest.fixture
def trained(make_config, monkeypatch):
    return train_with_policy(make_config, monkeypatch)


def greedy_movie(policy, catalogue, user_id: int) -> tuple[int, str]:
    observation = catalogue.observations_of([user_id])
    action = int(policy.action(ts.restart(observation, batch_size=1)).action[0])
    return int(catalogue.movie_ids[action]), str(catalogue.titles[action])


def test_predicts_the_trained_policys_movie(trained, run_cli, tracking_uri, tmp_path, caplog):
    run_id, policy, catalogue = trained
    movie, title = greedy_movie(policy, catalogue, USER)
    done = run_cli("src.predict", f"run_id={run_id}", f"user_id={USER}", "top_k=3",
                   f"tracking.uri={tracking_uri}")
    assert done.returncode == 0, done.stderr
    assert f'user {USER}: recommended movie {movie} "{title}"' in done.stdout
    assert "true rating" in done.stdout and f"best for user {USER}: movie" in done.stdout
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
    with pytest.raises(UserError, match=message) as error:
        predict.recommend(predict.parse([*arguments, f"tracking.uri={tracking_uri}"]))
    assert "\n" not in str(error.value)


def test_run_without_policy_is_refused(make_config, tracking_uri, tmp_path, monkeypatch):
    train(make_config("training.loops=20"))
    run_id = mlflow.last_active_run().info.run_id
    with pytest.raises(UserError, match=f"run {run_id} has no saved policy"):
        predict.recommend(predict.parse([f"run_id={run_id}", "user_id=1", f"tracking.uri={tracking_uri}"]))


def invoke(model, body: str, content_type: str) -> tuple[int, str]:
    """What `mlflow models serve` answers to `body`: its own request parsing and prediction,
    in this process."""
    try:
        answer = scoring_server.invocations(body, content_type, model, model.metadata.get_input_schema())
    except MlflowException as error:
        return error.get_http_status_code(), error.message
    return answer.status, answer.response


def test_served_model_reads_csv_and_refuses_what_names_no_user(trained):
    run_id, policy, catalogue = trained
    movie, _ = greedy_movie(policy, catalogue, USER)
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    # pandas writes a vector into CSV as its list: "[0.1, 0.2, ...]"
    features = pd.DataFrame({"features": [catalogue.observations_of([USER])[0].tolist()]}).to_csv(index=False)
    for body, content_type in [(f"user_id\n{USER}\n{USER}.0\n", "text/csv"), (features, "text/csv"),
                               (json.dumps({"dataframe_records": [{"user_id": float(USER)}]}), "application/json")]:
        status, answer = invoke(model, body, content_type)
        assert status == 200, answer
        assert {prediction["movie_id"] for prediction in json.loads(answer)["predictions"]} == {movie}

    accepted = "send a 'user_id' column (MovieLens user ids) or a 'features' column (feature vectors)"
    for body, content_type, message in [
        (json.dumps({"dataframe_records": [{"user_id": 1.5}]}), "application/json",
         "user_id must be a MovieLens user id, a whole number, got 1.5"),
        (json.dumps({"dataframe_records": [{"user_id": True}]}), "application/json", "got True"),
        ("user_id\n7\nabc\n", "text/csv", "user_id must be a MovieLens user id, a whole number, got 'abc'"),
        (json.dumps({"dataframe_records": [{}]}), "application/json", f"{accepted}, not both; got columns []"),
        ("user\n7\n", "text/csv", f"{accepted}, not both; got columns ['user']"),
        ("user_id,features\n7,[1.0]\n", "text/csv", "not both; got columns ['user_id', 'features']"),
    ]:
        status, answer = invoke(model, body, content_type)
        assert status == 400 and message in answer and "Traceback" not in answer, (status, answer)


def post(url: str, body: bytes, content_type: str = "application/json") -> tuple[int, dict]:
    request = urllib.request.Request(url, body, {"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.slow
def test_served_model_answers_and_rejects_bad_requests(trained, tracking_uri, tmp_path):
    run_id, policy, catalogue = trained
    movie, title = greedy_movie(policy, catalogue, USER)
    port = free_port()
    scripts = Path(sys.executable).parent  # mlflow starts `uvicorn` from PATH
    log_file = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen(
        [str(scripts / "mlflow"), "models", "serve", "-m", f"runs:/{run_id}/model",
         "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
        cwd=tmp_path, env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri,
                           "PATH": f"{scripts}{os.pathsep}{os.environ.get('PATH', '')}"},
        stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "server did not answer /ping within 120 s"
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(1)
        invocations = f"{base}/invocations"

        status, answer = post(invocations, json.dumps({"dataframe_records": [{"user_id": USER}]}).encode())
        assert status == 200, answer
        (prediction,) = answer["predictions"]
        assert (prediction["movie_id"], prediction["title"]) == (movie, title)
        assert len(prediction["scores"]) == len(catalogue.movie_ids)

        features = catalogue.observations_of([USER])[0].tolist()
        status, answer = post(invocations, json.dumps({"dataframe_records": [{"features": features}]}).encode())
        assert status == 200 and answer["predictions"][0]["movie_id"] == movie, answer

        status, answer = post(invocations, f"user_id\n{USER}\n".encode(), "text/csv")
        assert status == 200 and answer["predictions"][0]["movie_id"] == movie, answer

        for body, message in [
            (json.dumps({"dataframe_records": [{"user_id": 100000}]}), "user_id 100000 is not in this environment"),
            (json.dumps({"dataframe_records": [{"features": features[:-1]}]}), "must have 4 features"),
            (json.dumps({"dataframe_records": [{"user_id": 1.5}]}), "got 1.5"),
            ("{not json", ""),
        ]:
            status, answer = post(invocations, body.encode())
            assert 400 <= status < 500 and message in answer["message"], (status, answer)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log_file.close()


def test_the_policy_savers_distribution_warning_is_silenced_and_others_are_not(caplog):
    # What PolicySaver says of epsilon-greedy and random policies, whose action() is all we serve.
    with caplog.at_level(logging.WARNING):
        absl_logging.warning('WARNING: Could not serialize policy.distribution() for policy "%s".', serving.__name__)
        absl_logging.warning("another warning")
    assert [record.getMessage() for record in caplog.records] == ["another warning"]


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
