"""The decision log (src.serving.decision_log) on SQLite and on the stack's PostgreSQL: what goes
in comes back joined in the interactions format, feedback is taken once, and a log it cannot
read is one clear error."""

from __future__ import annotations

import math
import sqlite3
import subprocess
import sys
import threading
import time
import uuid

import numpy as np
import psycopg
import pytest
from sqlalchemy.engine import make_url

from src import tracking
from src.errors import UserError
from src.paths import PROJECT_ROOT
from src.serving.decision_log import (SCHEMA_VERSION, Decision, DecisionLog, UnknownDecision, default_url,
                                       round_lock)
from tests.conftest import free_port

K = 4
COLUMNS = ["round", "user_id", *(f"context_{i}" for i in range(K)), "action", "movie_id", "propensity", "reward",
           "model_version", "decided_at", "rewarded_at", "decision_id"]


def decision(at: float, user_id: int | None = 7, propensity: float = 0.73, slate=None, version: str = "1") -> Decision:
    return Decision(uuid.uuid4().hex, user_id, np.arange(K, dtype=np.float32) + at % 1, 3, 103, propensity,
                    "models:/tiny@champion", version, at, slate)


def check_round_trip(log: DecisionLog) -> None:
    """Decisions at t = 100..104, four rewarded (one twice, one never), one feedback for no decision."""
    made = [decision(100.0), decision(101.5, user_id=None, propensity=float("nan")), decision(102.0, slate=(3, 1, 2)),
            decision(103.0, version="2"), decision(104.0)]
    for one in reversed(made):  # joined() orders by decided_at, not by arrival
        log.record_decision(one)
    assert log.record_feedback(made[0].decision_id, 4.5) is True
    assert log.record_feedback(made[0].decision_id, 1.0) is False  # a duplicate: the first reward stays
    for one, reward in zip(made[1:4], (-0.5, 3.0, 5.0)):
        assert log.record_feedback(one.decision_id, reward) is True
    with pytest.raises(UnknownDecision, match="no decision 'nowhere'"):
        log.record_feedback("nowhere", 1.0)
    assert log.counts() == {"decisions": 5, "feedback": 4}

    joined = log.joined()
    assert list(joined.columns) == COLUMNS
    assert joined.decision_id.tolist() == [one.decision_id for one in made[:4]]
    assert joined["round"].tolist() == [0, 1, 2, 3]
    assert joined.reward.tolist() == [4.5, -0.5, 3.0, 5.0]
    assert joined.user_id.iloc[0] == 7 and joined.user_id.isna().tolist() == [False, True, False, False]
    assert {str(joined[f"context_{i}"].dtype) for i in range(K)} == {"float32"}
    assert joined.filter(like="context_").to_numpy()[1] == pytest.approx(np.arange(K) + 0.5)
    assert joined.propensity.iloc[0] == pytest.approx(0.73) and math.isnan(joined.propensity.iloc[1])
    assert joined.model_version.tolist() == ["1", "1", "1", "2"]
    assert (joined.action.tolist(), joined.movie_id.tolist()) == ([3] * 4, [103] * 4)
    assert (joined.rewarded_at >= time.time() - 60).all()

    window = log.joined(since=101.5, until=103.0)  # [since, until)
    assert window.decision_id.tolist() == [made[1].decision_id, made[2].decision_id]
    assert window["round"].tolist() == [0, 1]
    assert log.joined(since=200.0).empty


def test_sqlite_round_trip_survives_reopening(tmp_path):
    url = f"sqlite:///{tmp_path / 'decisions.db'}"
    log = DecisionLog(url)
    try:
        check_round_trip(log)
    finally:
        log.close()
    reopened = DecisionLog(url)
    try:
        assert reopened.counts() == {"decisions": 5, "feedback": 4}
        assert reopened.joined().reward.tolist() == [4.5, -0.5, 3.0, 5.0]
    finally:
        reopened.close()


def test_concurrent_writers_all_commit(tmp_path):
    log = DecisionLog(f"sqlite:///{tmp_path / 'decisions.db'}")
    made: list[list[Decision]] = [[decision(1000.0 + i + thread / 100) for i in range(40)] for thread in range(8)]

    def write(mine: list[Decision]) -> None:
        for one in mine:
            log.record_decision(one)
            assert log.record_feedback(one.decision_id, 1.0) is True

    threads = [threading.Thread(target=write, args=(mine,)) for mine in made]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert log.counts() == {"decisions": 320, "feedback": 320}
        assert set(log.joined().decision_id) == {one.decision_id for mine in made for one in mine}
    finally:
        log.close()


def test_a_log_of_another_schema_version_is_refused(tmp_path):
    path = tmp_path / "decisions.db"
    DecisionLog(f"sqlite:///{path}").close()
    with sqlite3.connect(path) as store:
        store.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    with pytest.raises(UserError) as refused:
        DecisionLog(f"sqlite:///{path}")
    message = str(refused.value)
    assert f"schema version {SCHEMA_VERSION + 1}" in message and f"reads version {SCHEMA_VERSION}" in message
    assert "\n" not in message


def test_databases_it_cannot_use_are_one_line_errors(tmp_path):
    with sqlite3.connect(tmp_path / "mlflow.db") as store:
        store.execute("CREATE TABLE experiments (id INTEGER)")
    (tmp_path / "junk.db").write_bytes(b"not a database at all" * 100)
    port = free_port()  # nothing listens there
    for url, message in [
        (f"sqlite:///{tmp_path / 'mlflow.db'}", r"holds other tables \(experiments\) and no decision log"),
        (f"sqlite:///{tmp_path / 'junk.db'}", "cannot open the decision log"),
        (f"sqlite:///{tmp_path / 'nowhere' / 'decisions.db'}", "folder"),
        ("sqlite://", "must be a file"),
        ("mysql://user@host/db", "must be SQLite or PostgreSQL"),
        (f"postgresql://bandits:s3cret-pw@127.0.0.1:{port}/decisions", f"127.0.0.1:{port}/decisions"),
    ]:
        with pytest.raises(UserError, match=message) as refused:
            DecisionLog(url)
        assert "\n" not in str(refused.value) and "s3cret-pw" not in str(refused.value), refused.value


def test_the_default_log_sits_beside_the_tracking_store_or_on_the_stack(tmp_path):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert default_url(store, environ={}) == f"sqlite:///{tmp_path / 'decisions.db'}"
    beside_default = tracking.DEFAULT_URI.replace("mlflow.db", "decisions.db")
    assert default_url("http://mlflow.example:5000", environ={}) == beside_default
    storage = "postgresql+psycopg://bandits:pw@127.0.0.1:5433/optuna"
    assert default_url("http://127.0.0.1:5000", environ={"OPTUNA_STORAGE": storage}) == \
        "postgresql+psycopg://bandits:pw@127.0.0.1:5433/decisions"
    assert default_url(store, environ={"OPTUNA_STORAGE": storage}).startswith("sqlite:///")  # a local store wins


@pytest.mark.slow
def test_postgresql_round_trip_and_the_stacks_default_database(stack):
    """On the test stack: the log's own database is created when missing (here a fresh one, dropped
    after; `decisions`, where the service logs by default, likewise)."""
    storage = make_url(stack["OPTUNA_STORAGE"])
    default = default_url(stack["MLFLOW_TRACKING_URI"], environ=stack)
    assert make_url(default).database == "decisions"
    DecisionLog(default).close()
    fresh = f"decisions_test_{uuid.uuid4().hex[:12]}"
    log = DecisionLog(storage.set(database=fresh).render_as_string(hide_password=False))
    try:
        check_round_trip(log)
        log.close()
        with pytest.raises(UserError, match=f"schema version {SCHEMA_VERSION + 1}"):
            with psycopg.connect(host=storage.host, port=storage.port, user=storage.username,
                                 password=storage.password, dbname=fresh, autocommit=True) as connection:
                connection.execute("UPDATE schema_version SET version = version + 1")
            DecisionLog(storage.set(database=fresh).render_as_string(hide_password=False))
    finally:
        log.close()
        with psycopg.connect(host=storage.host, port=storage.port, user=storage.username, password=storage.password,
                             dbname="postgres", autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{fresh}" WITH (FORCE)')


HOLD_A_ROUND = """
import sys, time
from src.serving.decision_log import round_lock
with round_lock(sys.argv[1], sys.argv[2]):
    print("held", flush=True)
    time.sleep(600)
"""


def test_one_round_of_a_model_at_a_time_on_sqlite_and_a_killed_round_holds_nothing(tmp_path):
    url = f"sqlite:///{tmp_path / 'decisions.db'}"
    DecisionLog(url).close()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_A_ROUND, url, "recommender"], cwd=PROJECT_ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"  # waits for the lock, whatever the machine's speed
        with pytest.raises(UserError, match="another retraining round of 'recommender' is running"):
            with round_lock(url, "recommender"):
                pass
        with round_lock(url, "other-model"):  # another model's rounds are not held up
            pass
    finally:
        holder.kill()  # a round killed outright: its lock goes with its process
        holder.wait(timeout=60)
    with round_lock(url, "recommender"):
        pass


@pytest.mark.slow
def test_one_round_of_a_model_at_a_time_on_postgresql(stack):
    url = default_url(stack["MLFLOW_TRACKING_URI"], environ=stack)
    DecisionLog(url).close()
    name = f"model-{uuid.uuid4().hex[:8]}"
    with round_lock(url, name):
        with pytest.raises(UserError, match=f"another retraining round of '{name}' is running"):
            with round_lock(url, name):  # an advisory lock is a session's: another connection is refused
                pass
    with round_lock(url, name):  # released with its round
        pass
