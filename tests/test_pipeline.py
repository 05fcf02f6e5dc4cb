"""src.pipeline: the closed loop end to end, with real processes: a champion trained and
registered, the service on uvicorn, simulated traffic over HTTP, a retraining round."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import mlflow
import pandas as pd
import psutil
import pytest

from src import pipeline
from src.errors import UserError
from src.paths import PROJECT_ROOT
from tests.conftest import wait_until


@pytest.mark.slow
def test_two_rounds_of_the_loop_serve_new_visitors_gate_and_promote_a_better_policy_then_a_sigterm_stops_all(
        tmp_path):
    # Three rounds asked for; a SIGTERM during the third's traffic, as a scheduler stops a job.
    out, errors = tmp_path / "out", tmp_path / "pipeline.log"
    pipeline = subprocess.Popen(
        [sys.executable, "-m", "src.pipeline", "rounds=3", "decisions_per_round=600", "rate=60", "feedback.delay_s=0.5",
         "champion_overrides=['data=synthetic','data.num_users=200','env.num_movies=10','env.rank_k=4']",
         f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", f"out={out}"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}, stdout=subprocess.DEVNULL,
        stderr=open(errors, "w"))
    third = out / "round3-traffic.log"
    wait_until(lambda: pipeline.poll() is not None or (third.exists() and "recommendations (" in third.read_text()),
               1200, "the third round's traffic to send some")
    assert pipeline.poll() is None, errors.read_text()[-3000:]
    children = psutil.Process(pipeline.pid).children(recursive=True)
    assert len(children) >= 2  # the service and the traffic
    pipeline.send_signal(signal.SIGTERM)
    assert pipeline.wait(timeout=300) == 143, errors.read_text()[-3000:]
    assert not [child for child in children if child.is_running() and child.status() != psutil.STATUS_ZOMBIE]
    kept = json.loads((out / "round3" / "traffic.json").read_text())  # the stopped traffic kept its result
    assert 0 < kept["recommend"]["answered"] < 600
    first, second = pd.read_csv(out / "rounds.csv").to_dict("records")  # the rounds done
    assert first["decisions"] == second["decisions"] == 600 and first["served_versions"] == 1
    # A random champion against LinUCB learnt from 400 decisions: the truth and the gate agree.
    assert first["decision"] == "promoted" and first["gate/true_difference"] > 0 and first["gate/lower_bound"] > 0
    # Each round's visitors are new draws: of 200 users, about 1 in 200 visits matches by chance.
    users = [pd.read_csv(out / f"round{number}" / "interactions.csv").user_id.to_numpy() for number in (1, 2)]
    assert (users[0] == users[1]).mean() < 0.05
    assert (out / "rounds.png").is_file()
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert "RUNNING" not in {run.info.status for experiment in client.search_experiments()
                             for run in client.search_runs([experiment.experiment_id])}


@pytest.mark.parametrize("argument, message", [
    ("challenger=['agent=bogus']", "unknown agent 'bogus'"),
    ("challenger=['agent=linucb','agent.alpha=-1']", "agent.alpha must be > 0, got -1"),
    ("challenger=['estimatr=dm']", "Could not override 'estimatr'"),
    ("rate=1e-9", "rate must be such that a round's traffic, decisions_per_round / rate, takes at most 86,400 s"),
    ("feedback.delay_s=1e9", "feedback.delay_s must be >= 0 and at most 86400 seconds"),
])
def test_what_a_round_would_refuse_is_refused_before_anything_starts(argument, message):
    with pytest.raises(UserError, match=re.escape(message)):
        pipeline.parse([argument])
