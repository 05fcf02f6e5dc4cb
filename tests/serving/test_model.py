"""The served pyfunc model (src.serving.model) on a tiny LinUCB run over synthetic data: what
MLflow's scoring server and `mlflow models serve` answer, and the saver's warnings it silences."""

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
import pandas as pd
import pytest
from absl import logging as absl_logging
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import scoring_server

from src import serving
from tests.conftest import free_port
from tests.serving.trained import USER, greedy_movie, train_with_policy


@pytest.fixture
def trained(make_config, monkeypatch):
    return train_with_policy(make_config, monkeypatch)


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
        # Four decimals, not float32's noise (4.999999046, -1.19e-06).
        assert all(round(score, 4) == score for score in prediction["scores"].values())

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
