"""Campaigns on real services: workers on PostgreSQL and an MLflow server, a worker killed
mid-trial, a late joiner, servers that stop answering mid-sweep, workers starting together."""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from pathlib import Path

import mlflow
import optuna
import pytest
import sqlalchemy

from src import metrics, tracking
from src.campaigns.study import compose_sweep, prepare
from src.campaigns.summary import set_alias
from src.campaigns.trials import COMPLETE, FAIL, RUN_ATTR
from src.campaigns.worker import work
from src.paths import PROJECT_ROOT
from tests.campaigns.conftest import overrides_for, runs_of, states
from tests.conftest import free_port, wait_until


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 2])
def test_multirun_workers_on_postgresql_survive_a_killed_worker_and_end_with_exactly_n_trials(
        stack, data_overrides, tmp_path, batch):
    """A worker killed mid-trial (with sweep.batch=2, mid-batch: both its trials)."""
    study_name = f"pg-{uuid.uuid4().hex[:8]}"
    storage, tracking_uri = stack["OPTUNA_STORAGE"], stack["MLFLOW_TRACKING_URI"]
    overrides = overrides_for(data_overrides, study_name, storage, tracking_uri, "training.loops=200",
                              "sweep.heartbeat_s=1", "sweep.grace_s=5", "tracking.save_policy=true",
                              f"sweep.batch={batch}")[1:]
    env = {**os.environ, "SWEEP_LOG_DIR": str(tmp_path / "logs")}
    multirun_out = tmp_path / "multirun.out"
    multirun = subprocess.Popen([str(PROJECT_ROOT / "multirun.sh"), "linucb", "--workers", "2", "--trials", "4",
                                 "--storage", storage, *overrides], cwd=PROJECT_ROOT, env=env,
                                stdout=open(multirun_out, "w"), stderr=subprocess.STDOUT)
    worker_line = re.compile(r"worker (\d+): pid (\d+), log (\S+)")
    wait_until(lambda: len(worker_line.findall(multirun_out.read_text())) == 2, 120, "multirun.sh to start its workers")
    workers = worker_line.findall(multirun_out.read_text())
    # The first worker to ask gets a whole batch (the study needs 4): the one killed.
    training = "Training linucb" if batch == 1 else "Training 2 runs together"
    wait_until(lambda: any(training in Path(log_path).read_text() for _, _, log_path in workers), 240,
               "a worker to train its trials")
    number, pid, _ = next(worker for worker in workers if training in Path(worker[2]).read_text())
    # SIGKILL mid-trial, to the pid multirun.sh printed: no handler runs, the trial and its run stay RUNNING.
    os.kill(int(pid), signal.SIGKILL)
    late = subprocess.Popen([sys.executable, "-m", "src.sweep", "work", "hparams_search=linucb",
                             f"hydra.sweeper.storage={storage}", "hydra.sweeper.n_trials=4", *overrides],
                            cwd=PROJECT_ROOT, env={**env, "SWEEP_WORKER": "2"},
                            stdout=open(tmp_path / "late.log", "w"), stderr=subprocess.STDOUT)
    assert late.wait(timeout=300) == 0, (tmp_path / "late.log").read_text()[-3000:]
    # The study completed without the killed worker: a success, with the stop said.
    assert multirun.wait(timeout=300) == 0, multirun_out.read_text()[-3000:]
    assert (f"note: worker {number} stopped: stopped by signal 9; see" in multirun_out.read_text()
            and "the other workers completed the study" in multirun_out.read_text())
    # A line per trial its surviving worker ended, passed on from the worker's log as it came.
    assert re.search(r"^  Trial \d+ finished: train/cumulative_regret = ", multirun_out.read_text(), re.M)
    # The console also says when each worker loads TensorFlow and each trial starts, values rounded.
    assert re.search(r"^  Worker \d+: loading TensorFlow", multirun_out.read_text(), re.M)
    assert re.search(r"^  Trial \d+ started: agent\.alpha=[\d.e-]{1,10} ", multirun_out.read_text(), re.M)

    study = optuna.load_study(study_name=study_name, storage=storage)
    counts = states(study)
    assert counts["COMPLETE"] == 4 and counts["FAIL"] == batch and counts["RUNNING"] == 0, counts
    found = runs_of(tracking_uri, study_name)
    parents = [run for run in found if run.data.tags.get("sweep.role") == "parent"]
    assert [run.info.status for run in parents] == ["FINISHED"]
    children = [run for run in found if run.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert all(run.info.run_name == f"linucb·s0·t{run.data.tags['sweep.trial']}" for run in children)
    by_status = collections.Counter(run.info.status for run in children)
    assert by_status == {"FINISHED": 4, "FAILED": batch}, by_status
    finished = {run.info.run_id for run in children if run.info.status == "FINISHED"}
    assert {trial.user_attrs[RUN_ATTR] for trial in study.get_trials(states=(COMPLETE,))} == finished
    dead = [run for run in children if run.info.status == "FAILED"]
    assert all("worker died" in run.data.tags["bandits.ended_by"] for run in dead)
    retried = [run for run in children if "sweep.retry_of" in run.data.tags]
    assert sorted(run.data.tags["sweep.retry_of"] for run in retried) == sorted(run.data.tags["sweep.trial"]
                                                                                for run in dead)

    best, parent = study.best_trial, parents[0]
    assert parent.data.tags["best.trial"] == str(best.number)
    assert parent.data.tags["best.run_id"] == best.user_attrs[RUN_ATTR]
    assert parent.data.metrics["best/train/cumulative_regret"] == metrics.rounded(best.value)
    client = mlflow.MlflowClient(tracking_uri)
    assert "optimization_history.png" in {artifact.path for artifact in client.list_artifacts(parent.info.run_id)}
    (version,) = client.search_model_versions(f"name = '{study_name}-best'")
    assert version.run_id == parent.data.tags["best.run_id"]
    assert not (PROJECT_ROOT / "logs" / "sweeps" / study_name).exists()  # the logs went where asked


class Relay:
    """A TCP relay to a real server, cut as a restart would cut it (the connections through it
    drop, and new ones are refused until it is restored) or frozen as a hung server (connections
    stay open, nothing answers until it thaws)."""

    def __init__(self, address: tuple[str, int]):
        self.address, self.port, self.connections = address, free_port(), []
        self.flowing = threading.Event()
        self.flowing.set()
        self.restore()

    def restore(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def cut(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
        self.listener.close()
        for connection in self.connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        self.connections.clear()

    def freeze(self) -> None:
        self.flowing.clear()

    def thaw(self) -> None:
        self.flowing.set()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.address)
            self.connections += [client, server]
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                self.flowing.wait()
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_RDWR)


@pytest.mark.slow
def test_a_tracking_server_that_stops_answering_mid_sweep_stops_the_worker_with_one_line(
        stack, data_overrides, tmp_path):
    name = f"server-stops-{uuid.uuid4().hex[:8]}"
    server = urllib.parse.urlparse(stack["MLFLOW_TRACKING_URI"])
    relay = Relay((server.hostname, server.port))  # the shared server, hung for this worker only
    tracking_uri, storage = f"http://127.0.0.1:{relay.port}", f"sqlite:///{tmp_path / 'optuna.db'}"
    overrides = overrides_for(data_overrides, name, storage, tracking_uri, "hydra.sweeper.n_trials=3",
                              "training.loops=1000000", "tracking.log_every=1")
    log_path = tmp_path / "worker.log"
    # MLflow's bounded retries (the product's default count), with a short wait for an answer.
    worker = subprocess.Popen([sys.executable, "-m", "src.sweep", "work", *overrides], cwd=PROJECT_ROOT,
                              env={**os.environ, "MLFLOW_HTTP_REQUEST_TIMEOUT": "2",
                                   "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0"},
                              stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: "Training linucb on" in log_path.read_text(), 240, "the worker to train")
        time.sleep(2)  # a few chunks' metrics reach the server
        relay.freeze()  # hung: connections open, nothing answers
        assert worker.wait(timeout=120) == 2, log_path.read_text()[-3000:]
    finally:
        worker.kill()
    relay.thaw()  # back, with what it had stored
    log_lines = log_path.read_text().splitlines()
    assert "Traceback" not in log_path.read_text(), log_lines[-40:]
    assert re.match(r".*ERROR.* the MLflow tracking server at .* stopped answering", log_lines[-1]), log_lines[-5:]
    assert states(optuna.load_study(study_name=name, storage=storage)) == {"FAIL": 1}

    prepare(compose_sweep(overrides), overrides)  # a worker resuming the sweep, as src.sweep work does
    (run,) = [run for run in runs_of(tracking_uri, name) if "sweep.trial" in run.data.tags]
    assert run.info.status == "FAILED"
    assert "tracking server" in run.data.tags["bandits.ended_by"]
    assert len(mlflow.MlflowClient(tracking_uri).get_metric_history(run.info.run_id, "train/cumulative_regret")) > 1


@pytest.mark.slow
def test_a_tracking_server_outage_shorter_than_the_patience_is_ridden_out(stack, data_overrides, tmp_path):
    """MLflow's default retries (two, for a single command to fail fast) ended every worker at a
    5 s outage; a worker retries for sweep.storage_patience_s."""
    name = f"outage-{uuid.uuid4().hex[:8]}"
    server = urllib.parse.urlparse(stack["MLFLOW_TRACKING_URI"])
    relay = Relay((server.hostname, server.port))
    tracking_uri, storage = f"http://127.0.0.1:{relay.port}", f"sqlite:///{tmp_path / 'optuna.db'}"
    overrides = overrides_for(data_overrides, name, storage, tracking_uri, "hydra.sweeper.n_trials=2",
                              "training.loops=400", "tracking.log_every=1", "sweep.storage_patience_s=30")
    log_path = tmp_path / "worker.log"
    worker = subprocess.Popen([sys.executable, "-m", "src.sweep", "work", *overrides], cwd=PROJECT_ROOT,
                              env={**os.environ, "MLFLOW_HTTP_REQUEST_TIMEOUT": "2"},
                              stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: "Training linucb on" in log_path.read_text(), 240, "the worker to train")
        relay.cut()  # the server restarting: connections dropped, new ones refused
        time.sleep(5)
        relay.restore()
        assert worker.wait(timeout=600) == 0, log_path.read_text()[-3000:]
    finally:
        worker.kill()
    assert states(optuna.load_study(study_name=name, storage=storage)) == {"COMPLETE": 2}


@pytest.mark.slow
def test_a_study_database_that_restarts_mid_sweep_is_waited_for_then_given_up_on_with_one_line(
        stack, data_overrides, tmp_path):
    study_name = f"restart-{uuid.uuid4().hex[:8]}"
    database = sqlalchemy.engine.make_url(stack["OPTUNA_STORAGE"])
    relay = Relay((database.host, database.port))
    storage = database.set(port=relay.port).render_as_string(hide_password=False)
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = overrides_for(data_overrides, study_name, storage, tracking_uri, "hydra.sweeper.n_trials=2",
                              "training.loops=1000", "sweep.heartbeat_s=1", "sweep.grace_s=5",
                              "sweep.storage_patience_s=6")
    log_path = tmp_path / "worker.log"
    worker = subprocess.Popen([sys.executable, "-m", "src.sweep", "work", *overrides], cwd=PROJECT_ROOT,
                              stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: "Training linucb" in log_path.read_text(), 240, "the first trial to train")
        relay.cut()  # a restart shorter than the patience: waited out
        time.sleep(2)
        relay.restore()
        wait_until(lambda: "answers again" in log_path.read_text(), 300, "the worker to reconnect")
        wait_until(lambda: log_path.read_text().count("Training linucb") == 2, 240, "the second trial to train")
        relay.cut()  # down for good: the worker gives up
        assert worker.wait(timeout=120) == 2, log_path.read_text()[-3000:]
    finally:
        worker.kill()
    text = log_path.read_text()
    assert "Traceback" not in text, text[-3000:]
    assert re.match(r".*ERROR.* the Optuna storage postgresql\+psycopg://bandits:\*\*\*@.* stopped answering for 6 s",
                    text.splitlines()[-1]), text.splitlines()[-5:]

    relay.restore()  # back: a worker started now fails the interrupted trial and runs it again
    work(overrides)
    study = optuna.load_study(study_name=study_name, storage=stack["OPTUNA_STORAGE"])
    assert states(study) == {"COMPLETE": 2, "FAIL": 1}
    found = runs_of(tracking_uri, study_name)
    assert collections.Counter(run.info.status for run in found) == {"FINISHED": 3, "FAILED": 1}  # with the parent
    (failed,) = [run for run in found if run.info.status == "FAILED"]
    assert failed.data.tags["sweep.trial"] == str(study.get_trials(states=(FAIL,))[0].number)


def test_workers_starting_together_share_one_new_experiment(stack):
    mlflow.set_tracking_uri(stack["MLFLOW_TRACKING_URI"])
    name = f"together-{uuid.uuid4().hex[:8]}"
    barrier = threading.Barrier(6)

    def connect_together(_) -> str:
        barrier.wait()
        return tracking.connect(stack["MLFLOW_TRACKING_URI"], name)

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        assert len(set(pool.map(connect_together, range(6)))) == 1


def test_workers_ending_together_both_point_champion_at_the_best_version(stack):
    """MLflow's SQL store reads then inserts an alias: unguarded, 4 workers setting it at once
    broke PostgreSQL's primary key in 8 of 20 tries here."""
    client = mlflow.MlflowClient(stack["MLFLOW_TRACKING_URI"])
    run = client.create_run(client.create_experiment(f"champion-{uuid.uuid4().hex[:8]}"))
    for _ in range(20):
        name = f"champion-{uuid.uuid4().hex[:8]}"
        client.create_registered_model(name)
        version = client.create_model_version(name, f"{run.info.artifact_uri}/model", run.info.run_id).version
        barrier = threading.Barrier(4)

        def set_together(_):
            barrier.wait()
            set_alias(client, name, "champion", version)

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            list(pool.map(set_together, range(4)))
        assert client.get_model_version_by_alias(name, "champion").version == version
