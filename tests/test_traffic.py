"""src.traffic: the simulated users' plan and truth on their own, and the closed loop against a
real service: traffic, its feedback in the decision log, a retraining round that promotes a
better policy, and the service following it."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time

import mlflow
import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from src import retrain, traffic
from src.errors import UserError
from src.paths import PROJECT_ROOT
from src.serving.decision_log import DecisionLog, default_url
from tests.conftest import free_port, wait_until
from tests.test_retrain import NAME, register_champion


def plan_config(**settings):
    cfg = OmegaConf.create({"rate": 100, "duration": 20, "seed": 3,
                            "feedback": {"delay_s": 2.0, "delay": "fixed", "drop": 0.1}})
    return OmegaConf.merge(cfg, OmegaConf.create(settings))


def test_the_plan_draws_users_uniformly_and_drops_the_share_asked_the_same_for_a_seed():
    plan = traffic.Plan.draw(plan_config(), users=50)
    assert len(plan.rows) == 2000 and set(plan.rows) == set(range(50))
    counts = np.bincount(plan.rows, minlength=50)
    assert counts.max() - counts.min() < 40  # 40 a user expected: uniform, not skewed
    assert 150 < plan.dropped.sum() < 250 and (plan.delays == 2.0).all()
    again = traffic.Plan.draw(plan_config(), users=50)
    assert (again.rows == plan.rows).all() and (again.dropped == plan.dropped).all()
    exponential = traffic.Plan.draw(plan_config(feedback={"delay": "exponential"}), users=50)
    assert exponential.delays.mean() == pytest.approx(2.0, rel=0.1) and exponential.delays.min() < 0.1


def test_the_truth_is_the_reward_of_the_movie_served_and_the_best_there_was():
    model = type("Model", (), {"user_ids": np.array([7, 9]), "movie_ids": np.array([10, 20, 30]),
                               "rewards": np.array([[1.0, 4.0, 2.0], [3.0, 0.5, 5.0]])})
    truth = traffic.Truth.of(model, "movielens")
    assert truth.outcome(0, 30) == (2.0, 4.0) and truth.outcome(1, 30) == (5.0, 5.0)
    with pytest.raises(traffic.ServiceError, match="served movie 40, which the served run's environment"):
        truth.outcome(0, 40)
    model.rewards = np.array([[1.0, np.nan, 2.0], [3.0, 0.5, 5.0]])
    with pytest.raises(UserError, match="env=movielens_ratings knows no reward for some users and movies"):
        traffic.Truth.of(model, "movielens_ratings")


def test_feedback_goes_out_in_the_order_it_falls_due():
    from concurrent.futures import ThreadPoolExecutor

    sent = []
    with ThreadPoolExecutor(1) as pool:
        later = traffic.Later(pool)
        later.start()
        now = time.monotonic()
        for delay in (0.3, 0.1, 0.2, 0.0):
            later.at(now + delay, lambda d: sent.append((d, time.monotonic() - now)), delay)
        later.close()
        later.join(5)
    assert [delay for delay, _ in sent] == [0.0, 0.1, 0.2, 0.3]
    assert all(delay <= at < delay + 0.1 for delay, at in sent)


def test_the_summary_gives_each_versions_true_value_and_the_counts():
    frame = pd.DataFrame({
        "index": range(5), "user_id": [1, 2, 3, 4, 5], "decision_id": ["a", "b", "c", "d", ""],
        "movie_id": [1, 2, 3, 4, -1], "model_version": ["1", "1", "2", "2", ""], "propensity": 0.5,
        "reward": [3.0, 4.0, 5.0, 4.0, np.nan], "optimal": [5.0, 5.0, 5.0, 5.0, np.nan],
        "answered_s": [0.1, 0.2, 0.3, 0.4, np.nan], "latency_s": [0.01, 0.02, 0.01, 0.03, np.nan],
        "error": ["", "", "", "", "503: log down"],
        "feedback": ["recorded", "dropped", "duplicate", "error: 404: no decision 'd'", "none"]})
    frame["regret"] = frame.optimal - frame.reward
    result = traffic.summary(frame, OmegaConf.create({"url": "http://x", "rate": 5}), {"run_id": "r"}, 2.0)
    assert result["versions"] == {
        "1": {"interactions": 2, "true_mean_reward": 3.5, "true_regret": 1.5, "best_possible_reward": 5.0},
        "2": {"interactions": 2, "true_mean_reward": 4.5, "true_regret": 0.5, "best_possible_reward": 5.0}}
    assert result["recommend"]["sent"] == 5 and result["recommend"]["answered"] == 4
    assert result["recommend"]["errors"] == 1 and result["recommend"]["first_error"] == "503: log down"
    assert result["achieved_rate"] == 2.0
    assert {key: result["feedback"][key] for key in ("sent", "recorded", "duplicate", "errors", "dropped")} == {
        "sent": 3, "recorded": 1, "duplicate": 1, "errors": 1, "dropped": 1}


@pytest.mark.parametrize("arguments, message", [
    (["url=localhost:8000"], "url must be the service's address, http://<host>:<port>"),
    (["rate=0"], "rate must be > 0 and at most 10000, got 0"),
    (["feedback.drop=1.5"], "feedback.drop must be in [0, 1], got 1.5"),
    (["feedback.delay=gamma"], "feedback.delay must be fixed or exponential, got 'gamma'"),
    (["workers=0"], "workers must be an integer in [1, 1024], got 0"),
    (["rat=3"], "Could not override 'rat'"),
])
def test_bad_arguments_are_one_line(arguments, message):
    with pytest.raises(UserError) as error:
        traffic.parse(arguments)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_no_service_is_one_line_and_exit_2(caplog, tmp_path):
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as exit_:
        traffic.main([f"url=http://127.0.0.1:{free_port()}", f"out={tmp_path}"])
    assert exit_.value.code == 2
    (line,) = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert "does not answer /health (no answer: " in line and "is `python -m src.serve` running" in line
    assert not (tmp_path / "traffic.json").exists()


def test_an_out_that_cannot_hold_files_is_one_line_before_anything_is_sent(caplog, tmp_path):
    taken = tmp_path / "a-file"
    taken.write_text("")
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as exit_:
        traffic.main([f"url=http://127.0.0.1:{free_port()}", f"out={taken}"])
    assert exit_.value.code == 2
    (line,) = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert line.startswith(f"out={taken} cannot hold files")


@contextlib.contextmanager
def service(tracking_uri: str, cwd, *settings: str):
    """`python -m src.serve` on NAME@champion, exploring with epsilon 0.2; yields its URL once it answers."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "src.serve", f"model=models:/{NAME}@champion", f"port={port}",
         f"tracking.uri={tracking_uri}", "exploration=epsilon", "epsilon=0.2", *settings],
        cwd=cwd, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}, stdout=subprocess.DEVNULL,
        stderr=open(cwd / "serve.log", "w"))
    url = f"http://127.0.0.1:{port}"
    client = traffic.Client(url, 5)

    def health():
        assert server.poll() is None, (cwd / "serve.log").read_text()[-3000:]
        with contextlib.suppress(traffic.ServiceError):
            return client.call("GET", "/health")

    try:
        wait_until(health, 300, "the service to answer")
        yield url, health
    finally:
        server.terminate()
        server.wait(timeout=60)


@pytest.mark.slow
def test_the_closed_loop_traffic_is_logged_a_better_policy_promoted_and_then_served(
        make_config, data_overrides, tracking_uri, tmp_path, capsys):
    register_champion(make_config, "random")
    mlflow.set_tracking_uri(tracking_uri)
    out = tmp_path / "traffic"
    common = [f"tracking.uri={tracking_uri}", "workers=4", "feedback.delay_s=0.5", "progress_s=2"]
    with service(tracking_uri, tmp_path, "reload_s=1") as (url, health):
        traffic.main([f"url={url}", "rate=100", "duration=15", "feedback.drop=0.2", f"out={out}", *common])
        printed = capsys.readouterr().out
        assert f"Result: {out / 'traffic.json'}" in printed and "; MLflow run " in printed
        result = json.loads((out / "traffic.json").read_text())
        assert result["recommend"]["answered"] == result["recommend"]["sent"] == 1500
        assert result["recommend"]["errors"] == result["feedback"]["errors"] == 0
        assert result["feedback"]["recorded"] + result["feedback"]["dropped"] == 1500
        assert 0.15 < result["feedback"]["dropped"] / 1500 < 0.25
        # What the service logged is what the simulator paid: each recorded reward, in the log.
        joined = DecisionLog(default_url(tracking_uri)).joined()
        assert len(joined) == result["feedback"]["recorded"]
        visits = pd.read_csv(out / "interactions.csv").set_index("decision_id")
        assert np.allclose(visits.reward[joined.decision_id], joined.reward)
        assert result["versions"]["1"]["true_mean_reward"] == pytest.approx(visits.reward.mean())

        retrain.main([f"tracking.uri={tracking_uri}", "agent=linucb", "bootstrap.samples=500"])
        assert "@champion -> models:/recommender/2" in capsys.readouterr().out
        wait_until(lambda: str(health()["model_version"]) == "2", 120, "the service to serve version 2")

        traffic.main([f"url={url}", "rate=100", "duration=5", f"out={tmp_path / 'after'}", *common])
        after = json.loads((tmp_path / "after" / "traffic.json").read_text())

        # A SIGTERM, as a scheduler stops it: the recommendations stop, the result is kept, exit 143.
        stopped, output = tmp_path / "stopped", tmp_path / "stopped.log"
        command = subprocess.Popen([sys.executable, "-m", "src.traffic", f"url={url}", "rate=20", "duration=600",
                                    f"out={stopped}", *common], cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL,
                                   stderr=open(output, "w"))
        wait_until(lambda: "recommendations (" in output.read_text(), 300, "the traffic to send some")
        command.send_signal(signal.SIGTERM)
        assert command.wait(timeout=120) == 143, output.read_text()[-3000:]
        kept = json.loads((stopped / "traffic.json").read_text())
        assert 0 < kept["recommend"]["answered"] == kept["recommend"]["sent"] < 20 * 600
    assert list(after["versions"]) == ["2"]
    assert after["versions"]["2"]["true_regret"] < 0.7 * result["versions"]["1"]["true_regret"]
    client = mlflow.MlflowClient(tracking_uri)
    pipeline = client.get_experiment_by_name(retrain.EXPERIMENT).experiment_id
    roles = sorted(run.data.tags["bandits.role"] for run in client.search_runs([pipeline]))
    assert roles == ["retrain", "traffic", "traffic", "traffic"]
