"""The recommendation service (`python -m src.serve`, src.serving.service) as a real uvicorn
process over real HTTP, on a tiny LinUCB policy registered in a SQLite tracking store: what it
answers and refuses, the propensities it logs, following the registry, and that every decision
and feedback it acknowledged survives `kill -9`."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest

from src import config, serve
from src.data.synthetic import checksum_override
from src.errors import UserError
from src.paths import PROJECT_ROOT
from src.serving.catalogue import Catalogue
from src.serving.decision_log import DecisionLog
from tests.conftest import SMALL, free_port, wait_until
from tests.serving.trained import USER

EPSILON = 0.3
MOVIES = 10  # SMALL's env.num_movies
# Generous: on two busy cores TensorFlow and MLflow alone take tens of seconds to load.
START_S = 300


@pytest.fixture(scope="module")
def registered(movielens_dir, tmp_path_factory):
    """A tiny LinUCB run registered as model `tiny`, alias champion on version 1:
    (tracking URI, the store's folder, run id)."""
    from src.training import train

    folder = tmp_path_factory.mktemp("served")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    directory, checksums = movielens_dir
    _, run_id = train(config.compose([f"data.dir={directory}", checksum_override(checksums), f"tracking.uri={uri}",
                                      *SMALL, "tracking.save_policy=true"]))
    register(uri, run_id)
    return uri, folder, run_id


def register(uri: str, run_id: str) -> str:
    """A new version of `tiny` from the run's model, under the alias champion."""
    mlflow.set_tracking_uri(uri)
    version = mlflow.register_model(f"runs:/{run_id}/model", "tiny").version
    mlflow.MlflowClient().set_registered_model_alias("tiny", "champion", version)
    return str(version)


@dataclass
class Served:
    base: str
    process: subprocess.Popen
    log: Path

    def call(self, method: str, path: str, body=None, raw: bytes | None = None) -> tuple[int, dict | str]:
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data, {"Content-Type": "application/json"}, method=method)
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                status, text = response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            status, text = error.code, error.read().decode()
        try:
            return status, json.loads(text)
        except ValueError:
            return status, text

    def health(self) -> dict | None:
        try:
            status, answer = self.call("GET", "/health")
        except OSError:
            return None  # not listening yet
        return answer if status == 200 else None


@contextlib.contextmanager
def serving(registered, name: str, *overrides: str):
    """`python -m src.serve` on the registered model, answering /health; stopped on leaving."""
    uri, folder, _ = registered
    port = free_port()
    log = folder / f"{name}.log"
    env = {key: value for key, value in os.environ.items() if key not in ("MLFLOW_TRACKING_URI", "OPTUNA_STORAGE")}
    with open(log, "a") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "src.serve", "model=models:/tiny@champion", f"port={port}", f"tracking.uri={uri}",
             *overrides], cwd=folder, env={**env, "PYTHONPATH": str(PROJECT_ROOT)}, stdout=output,
            stderr=subprocess.STDOUT)
    served = Served(f"http://127.0.0.1:{port}", process, log)
    try:
        wait_until(lambda: process.poll() is not None or served.health(), START_S, "the service to answer /health")
        assert process.poll() is None, log.read_text()[-3000:]
        yield served
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=60)


def stop(served: Served) -> str:
    """SIGTERM, as a scheduler stops it; its log."""
    served.process.send_signal(signal.SIGTERM)
    assert served.process.wait(timeout=60) == 128 + signal.SIGTERM
    return served.log.read_text()


def catalogue_of(registered) -> Catalogue:
    uri, folder, run_id = registered
    local = mlflow.artifacts.download_artifacts(f"runs:/{run_id}/model", dst_path=str(folder / "model"),
                                                tracking_uri=uri)
    return Catalogue.load(Path(local) / "artifacts" / "catalogue.npz")


def check_epsilon(answers: list[dict]) -> int:
    """The greedy movie of answers for one user, after checking their propensities and shares
    against epsilon-greedy's: 1 - eps + eps/n for the greedy movie, eps/n for each other."""
    counts = Counter(answer["movie_id"] for answer in answers)
    greedy = counts.most_common(1)[0][0]
    for answer in answers:
        expected = 1 - EPSILON + EPSILON / MOVIES if answer["movie_id"] == greedy else EPSILON / MOVIES
        assert answer["propensity"] == pytest.approx(expected), answer
    share, p = counts[greedy] / len(answers), 1 - EPSILON + EPSILON / MOVIES
    assert abs(share - p) <= 5 * (p * (1 - p) / len(answers)) ** 0.5, (share, p)
    return greedy


def parse_prometheus(text: str) -> dict[str, float]:
    samples = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert re.fullmatch(r"# (HELP|TYPE) \w+ .+", line), line
            continue
        match = re.fullmatch(r'(\w+(?:\{(?:\w+="[^"]*",?)+\})?) (-?[\d.e+-]+)', line)
        assert match, line
        samples[match[1]] = float(match[2])
    return samples


@pytest.mark.slow
def test_serves_explores_logs_and_follows_the_registry(registered):
    uri, folder, run_id = registered
    features = catalogue_of(registered).observations_of([USER])[0].tolist()
    log_url = f"sqlite:///{folder / 'decisions.db'}"
    with serving(registered, "serve", "exploration=epsilon", f"epsilon={EPSILON}", "seed=0", "reload_s=1",
                 f"decision_log={log_url}") as served:
        health = served.health()
        assert {key: health[key] for key in ("status", "model_uri", "model_version", "run_id")} == {
            "status": "ok", "model_uri": "models:/tiny@champion", "model_version": "1", "run_id": run_id}

        by_user = [served.call("POST", "/recommend", {"user_id": USER}) for _ in range(300)]
        assert {status for status, _ in by_user} == {200}
        answers = [answer for _, answer in by_user]
        assert set(answers[0]) == {"decision_id", "movie_id", "title", "propensity", "model_version"}
        greedy = check_epsilon(answers)
        by_features = [served.call("POST", "/recommend", {"features": features})[1] for _ in range(200)]
        assert check_epsilon(by_features) == greedy  # the same user, by the features the policy sees

        status, slate = served.call("POST", "/recommend", {"user_id": USER, "k": 3})
        assert status == 200 and len({movie["movie_id"] for movie in slate["slate"]}) == 3
        assert slate["slate"][0] == {"movie_id": slate["movie_id"], "title": slate["title"]}

        decision = answers[0]["decision_id"]
        for reward, outcome in [(3.5, "recorded"), (1, "duplicate")]:  # the first reward is kept
            assert served.call("POST", "/feedback", {"decision_id": decision, "reward": reward}) == \
                (200, {"status": outcome})
        status, answer = served.call("POST", "/feedback", {"decision_id": "f" * 32, "reward": 1.0})
        assert status == 404 and "no decision 'ffff" in answer["detail"]

        for path, body, message in [
            ("/feedback", {"decision_id": decision, "reward": 35}, "reward must be in [-5, 10]"),
            ("/feedback", {"decision_id": decision}, "reward: Field required"),
            ("/feedback", {"decision_id": decision, "reward": 1, "bogus": 2}, "unknown field 'bogus'"),
            ("/feedback", {"decision_id": decision, "reward": "high"}, "reward: Input should be a valid number"),
            ("/recommend", {"user_id": USER, "features": features}, "exactly one of user_id"),
            ("/recommend", {"user_id": 1.5}, "user_id: Input should be a valid integer"),
            ("/recommend", {"user_id": 100000}, "user_id 100000 is not in this environment"),
            ("/recommend", {"features": features[:-1]}, "must have 4 features"),
            ("/recommend", {"user_id": USER, "k": MOVIES + 1}, f"k must be at most {MOVIES}"),
            ("/recommend", [USER], "must be a JSON object"),
        ]:
            status, answer = served.call("POST", path, body)
            assert status == 422 and message in answer["detail"] and "\n" not in answer["detail"], (body, answer)
        nested = b'{"features": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"  # under the size cap
        assert served.call("POST", "/recommend", raw=nested) == (422, {"detail": "the body nests too deeply"})
        status, answer = served.call("POST", "/recommend", raw=b"{not json")
        assert status == 422 and answer["detail"].startswith("the body is not JSON")
        assert_big_bodies_are_refused_unread(served.base)

        status, text = served.call("GET", "/metrics")
        samples = parse_prometheus(text)
        assert samples["decisions_total"] == 501 and samples["feedback_total"] == 1
        assert samples["feedback_duplicates_total"] == 1 and samples["feedback_unknown_total"] == 1
        assert samples["decision_log_decisions"] == 501 and samples["decision_log_joined"] == 1
        assert 0 < samples['request_latency_seconds{route="/recommend",quantile="0.5"}'] < 5

        log = DecisionLog(log_url)
        try:
            (row,) = log.joined().itertuples()
            assert (row.decision_id, row.reward, row.model_version) == (decision, 3.5, "1")
            assert row.propensity == pytest.approx(answers[0]["propensity"])
        finally:
            log.close()

        follow_a_new_version(served, registered)
        text = stop(served)
    assert "Stopped: recorded 502 decisions and 1 feedback (1 duplicate, 1 for unknown decisions)" in text
    assert f"decisions go to {log_url}" in text


def assert_big_bodies_are_refused_unread(base: str) -> None:
    """A body declared larger than the cap is refused at once, without waiting for it; one sent
    without a declared length is cut off once it passes the cap."""
    host, port = base.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.putrequest("POST", "/recommend")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", str(10**9))
    connection.endheaders(b"{" + b" " * 1000)
    response = connection.getresponse()
    assert response.status == 413 and "exceeds 65536 bytes" in json.loads(response.read())["detail"]
    connection.close()
    chunked = urllib.request.Request(base + "/recommend", iter([b" " * 40_000] * 3), method="POST",
                                     headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
    # Refused before it is all read: the answer is a 413, or, when the server closes first, the
    # client's write meets a closed connection (a broken pipe), depending on who is faster.
    with pytest.raises(urllib.error.URLError) as refused:
        urllib.request.urlopen(chunked, timeout=30)
    assert getattr(refused.value, "code", 413) == 413


def follow_a_new_version(served: Served, registered) -> None:
    """Version 2 under the alias: served within reload_s (1 s) once loaded, and logged as its own."""
    uri, _, run_id = registered
    assert register(uri, run_id) == "2"
    moved = time.monotonic()
    wait_until(lambda: (served.health() or {}).get("model_version") == "2", 60, "the service to serve version 2")
    assert time.monotonic() - moved < 30  # 1 s between looks, then the version's load
    status, answer = served.call("POST", "/recommend", {"user_id": USER})
    assert status == 200 and answer["model_version"] == "2"
    # Logged once the swap has settled the heap, which may be after the first answers from version 2.
    wait_until(lambda: "now names version 2" in served.log.read_text(), 60, "the service to log version 2")


@pytest.mark.slow
def test_every_acknowledged_decision_and_feedback_survives_kill_9(registered):
    uri, folder, _ = registered
    log_url = f"sqlite:///{folder / 'survives.db'}"
    decided: dict[str, None] = {}
    rewarded: dict[str, float] = {}
    enough = threading.Event()

    def visit(served: Served, worker: int) -> None:
        for i in range(10_000):
            try:
                status, answer = served.call("POST", "/recommend", {"user_id": USER})
                if status != 200 or not isinstance(answer, dict):
                    return  # an answer cut short by the kill acknowledges nothing
                decided[answer["decision_id"]] = None
                reward = (worker + i) % 5 + 0.5
                decision = answer["decision_id"]
                status, answer = served.call("POST", "/feedback", {"decision_id": decision, "reward": reward})
                if status == 200 and isinstance(answer, dict) and answer["status"] == "recorded":
                    rewarded[decision] = reward
            except (OSError, http.client.HTTPException):
                return  # killed
            if len(decided) >= 150:
                enough.set()

    with serving(registered, "killed", f"decision_log={log_url}", "reload_s=600") as served:
        workers = [threading.Thread(target=visit, args=(served, worker)) for worker in range(4)]
        for worker in workers:
            worker.start()
        assert enough.wait(timeout=300)
        os.kill(served.process.pid, signal.SIGKILL)  # while the workers are still sending
        served.process.wait(timeout=60)
        for worker in workers:
            worker.join(timeout=120)
    acknowledged, joined = dict(decided), dict(rewarded)
    assert len(acknowledged) >= 150 and joined

    with serving(registered, "restarted", f"decision_log={log_url}", "reload_s=600") as served:
        health = served.health()
        assert health["decisions"] >= len(acknowledged) and health["feedback"] >= len(joined)
        stop(served)
    with sqlite3.connect(folder / "survives.db") as store:
        logged = {row[0] for row in store.execute("SELECT decision_id FROM decisions")}
    assert acknowledged.keys() <= logged
    log = DecisionLog(log_url)
    try:
        rewards = dict(zip(log.joined().decision_id, log.joined().reward))
    finally:
        log.close()
    assert {decision: rewards.get(decision) for decision in joined} == joined


def test_bad_settings_are_one_line_before_anything_loads():
    for arguments, message in [
        ([], "model must be a model URI"),
        (["model=tiny"], "model must be a model URI"),
        (["model=models:/tiny@champion", "exploration=greedy"], "exploration must be one of none, epsilon, softmax"),
        (["model=models:/tiny@champion", "epsilon=1.5"], "epsilon must be in [0, 1]"),
        (["model=models:/tiny@champion", "temperature=0"], "temperature must be > 0"),
        (["model=models:/tiny@champion", "reward_range=[5,1]"], "reward_range must be [low, high]"),
        (["model=models:/tiny@champion", "port=70000"], "port must be an integer in [0, 65535]"),
        (["model=models:/tiny@champion", "max_body_bytes=10"], "max_body_bytes must be an integer in [256"),
        (["model=models:/tiny@champion", "bogus=1"], "Could not override 'bogus'"),
        (["model=models:/tiny@champion", "propensity_draws=-1"], "propensity_draws must be an integer in [0, 1000]"),
    ]:
        with pytest.raises(UserError) as refused:
            serve.parse(arguments)
        assert message in str(refused.value) and "\n" not in str(refused.value)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(UserError, match=f"cannot listen on 127.0.0.1:{taken.getsockname()[1]}"):
            serve.listen("127.0.0.1", taken.getsockname()[1])
    # A tracking server nothing answers at: refused before the decision log is opened (or made).
    with pytest.raises(UserError, match=r"cannot reach the MLflow tracking server at http://127.0.0.1:9 \("):
        serve.check_tracking_store("http://127.0.0.1:9")


@pytest.mark.slow
def test_a_model_that_is_not_there_or_not_a_policy_model_exits_2(registered, run_cli):
    uri, _, run_id = registered
    for model, message in [("models:/nope@champion", "Registered Model with name=nope not found"),
                           (f"runs:/{run_id}/policy", "is not a servable policy model")]:
        done = run_cli("src.serve", f"model={model}", f"tracking.uri={uri}", "port=0")
        errors = [line for line in done.stderr.splitlines() if " ERROR " in line]
        assert done.returncode == 2 and len(errors) == 1 and message in errors[0], done.stderr[-2000:]


@pytest.mark.slow
def test_a_decision_log_that_cannot_be_opened_is_one_line_before_tensorflow_loads(registered, run_cli):
    uri, _, _ = registered
    port = free_port()  # nothing listens there: PostgreSQL down
    done = run_cli("src.serve", "model=models:/tiny@champion", f"tracking.uri={uri}", "port=0",
                   f"decision_log=postgresql://bandits:s3cret@127.0.0.1:{port}/decisions")
    errors = [line for line in done.stderr.splitlines() if " ERROR " in line]
    assert done.returncode == 2 and len(errors) == 1 and f"127.0.0.1:{port}" in errors[0], done.stderr[-2000:]
    assert "s3cret" not in done.stderr and "Loading TensorFlow" not in done.stderr
