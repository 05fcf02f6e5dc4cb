"""Campaigns on real services: workers on PostgreSQL and an MLflow server, a worker killed
mid-trial, a late joiner; pruning, grids, failures, stale-run cleanup and reproducibility."""

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
import numpy as np
import optuna
import pytest
import sqlalchemy
from mlflow.entities import RunStatus
from omegaconf import OmegaConf

from src import campaign, config, data, experiment, metrics, runs, tracking
from src.errors import UserError
from src.paths import PROJECT_ROOT
from src.sweep_trials import RUN_ATTR
from src.training import train
from tests.conftest import free_port, wait_until

FIXED = ["env.num_movies=10", "env.reward_rank=4", "env.rank_k=3", "training.chunk_loops=20",
         "tracking.save_policy=false"]


def overrides_for(data_overrides, study: str, storage: str, tracking_uri: str, *extra: str) -> list[str]:
    return ["hparams_search=linucb", f"hydra.sweeper.study_name={study}", f"hydra.sweeper.storage={storage}",
            *data_overrides, *FIXED, f"tracking.uri={tracking_uri}", f"tracking.experiment={study}", *extra]


def states(study: optuna.Study) -> collections.Counter:
    return collections.Counter(trial.state.name for trial in study.trials)


def runs_of(tracking_uri: str, experiment: str) -> list:
    client = mlflow.MlflowClient(tracking_uri)
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id])


@pytest.mark.slow
def test_multirun_workers_on_postgresql_survive_a_killed_worker_and_end_with_exactly_n_trials(
        stack, data_overrides, tmp_path):
    study_name = f"pg-{uuid.uuid4().hex[:8]}"
    storage, tracking_uri = stack["OPTUNA_STORAGE"], stack["MLFLOW_TRACKING_URI"]
    overrides = overrides_for(data_overrides, study_name, storage, tracking_uri, "training.loops=200",
                              "sweep.heartbeat_s=1", "sweep.grace_s=5", "tracking.save_policy=true")[1:]
    env = {**os.environ, "SWEEP_LOG_DIR": str(tmp_path / "logs")}
    multirun_out = tmp_path / "multirun.out"
    multirun = subprocess.Popen([str(PROJECT_ROOT / "multirun.sh"), "linucb", "--workers", "2", "--trials", "4",
                                 "--storage", storage, *overrides], cwd=PROJECT_ROOT, env=env,
                                stdout=open(multirun_out, "w"), stderr=subprocess.STDOUT)
    worker_line = re.compile(r"worker 1: pid (\d+), log (\S+)")
    wait_until(lambda: worker_line.search(multirun_out.read_text()), 120, "multirun.sh to start its workers")
    pid, log_path = worker_line.search(multirun_out.read_text()).groups()
    wait_until(lambda: "Training linucb" in Path(log_path).read_text(), 240, "worker 1 to train a trial")
    # SIGKILL mid-trial (the worker is `uv run`'s child): no handler runs, the trial and its run stay RUNNING.
    for python in subprocess.run(["pgrep", "-P", pid], capture_output=True, text=True).stdout.split():
        os.kill(int(python), signal.SIGKILL)
    late = subprocess.Popen([sys.executable, "-m", "src.sweep", "work", "hparams_search=linucb",
                             f"hydra.sweeper.storage={storage}", "hydra.sweeper.n_trials=4", *overrides],
                            cwd=PROJECT_ROOT, env={**env, "SWEEP_WORKER": "2"},
                            stdout=open(tmp_path / "late.log", "w"), stderr=subprocess.STDOUT)
    assert late.wait(timeout=300) == 0, (tmp_path / "late.log").read_text()[-3000:]
    assert multirun.wait(timeout=300) == 1, multirun_out.read_text()[-3000:]
    assert "error: worker 1 failed: stopped by signal 9" in multirun_out.read_text()
    # A line per trial its surviving worker ended, passed on from the worker's log as it came.
    assert re.search(r"^  Trial \d+ finished: train/cumulative_regret = ", multirun_out.read_text(), re.M)
    # The console also says when each worker loads TensorFlow and each trial starts, values rounded.
    assert re.search(r"^  Worker \d+: loading TensorFlow", multirun_out.read_text(), re.M)
    assert re.search(r"^  Trial \d+ started: agent\.alpha=[\d.e-]{1,10} ", multirun_out.read_text(), re.M)

    study = optuna.load_study(study_name=study_name, storage=storage)
    counts = states(study)
    assert counts["COMPLETE"] == 4 and counts["FAIL"] == 1 and counts["RUNNING"] == 0, counts
    found = runs_of(tracking_uri, study_name)
    parents = [run for run in found if run.data.tags.get("sweep.role") == "parent"]
    assert [run.info.status for run in parents] == ["FINISHED"]
    children = [run for run in found if run.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert all(run.info.run_name == f"linucb·s0·t{run.data.tags['sweep.trial']}" for run in children)
    by_status = collections.Counter(run.info.status for run in children)
    assert by_status == {"FINISHED": 4, "FAILED": 1}, by_status
    finished = {run.info.run_id for run in children if run.info.status == "FINISHED"}
    assert {trial.user_attrs[RUN_ATTR] for trial in study.get_trials(states=(campaign.COMPLETE,))} == finished
    (dead,) = [run for run in children if run.info.status == "FAILED"]
    assert "worker died" in dead.data.tags["bandits.ended_by"]
    retried = [run for run in children if "sweep.retry_of" in run.data.tags]
    assert [run.data.tags["sweep.retry_of"] for run in retried] == [dead.data.tags["sweep.trial"]]

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

    campaign.prepare(campaign.compose_sweep(overrides))  # a worker resuming the sweep
    (run,) = [run for run in runs_of(tracking_uri, name) if "sweep.trial" in run.data.tags]
    assert run.info.status == "FAILED"
    assert "tracking server" in run.data.tags["bandits.ended_by"]
    assert len(mlflow.MlflowClient(tracking_uri).get_metric_history(run.info.run_id, "train/cumulative_regret")) > 1


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
        wait_until(lambda: "answers again" in log_path.read_text(), 60, "the worker to reconnect")
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
    campaign.work(overrides)
    study = optuna.load_study(study_name=study_name, storage=stack["OPTUNA_STORAGE"])
    assert states(study) == {"COMPLETE": 2, "FAIL": 1}
    found = runs_of(tracking_uri, study_name)
    assert collections.Counter(run.info.status for run in found) == {"FINISHED": 3, "FAILED": 1}  # with the parent
    (failed,) = [run for run in found if run.info.status == "FAILED"]
    assert failed.data.tags["sweep.trial"] == str(study.get_trials(states=(campaign.FAIL,))[0].number)


def test_resuming_fails_the_runs_of_failed_trials_only(tmp_path):
    """A worker joining late fails the runs a lost server left RUNNING, but not the best
    trial's run, RUNNING again while the summarising worker adds its policy."""
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    experiment = client.create_experiment("resume")
    study = optuna.create_study(study_name="resume", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    study.add_trial(optuna.trial.create_trial(value=1.0))
    study.add_trial(optuna.trial.create_trial(state=campaign.FAIL))
    completing, orphaned = (client.create_run(experiment, tags={"sweep.study": "resume", "sweep.trial": str(number)})
                            for number in (0, 1))
    campaign.end_orphaned_runs(study, "resume")
    assert client.get_run(completing.info.run_id).info.status == "RUNNING"
    assert client.get_run(orphaned.info.run_id).info.status == "FAILED"


def test_an_unreachable_database_is_one_line_before_any_trial(data_overrides, tmp_path):
    url = "postgresql://nobody:secret@127.0.0.1:1/optuna"  # the plain scheme works too
    overrides = overrides_for(data_overrides, "unreachable", url, f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(UserError, match=re.escape("cannot open Optuna storage postgresql+psycopg://")) as error:
        campaign.work(overrides)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "mlflow.db").exists()  # no run was started


def test_workers_opening_a_new_database_together_all_get_the_storage(stack):
    """The first workers on a new database all create Optuna's tables; none may fail for it."""
    admin = sqlalchemy.engine.make_url(stack["OPTUNA_STORAGE"])
    database = f"race_{uuid.uuid4().hex[:8]}"
    engine = sqlalchemy.create_engine(admin.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(sqlalchemy.text(f"CREATE DATABASE {database}"))
    cfg = OmegaConf.create({"hydra": {"sweeper": {"storage": admin.set(database=database).render_as_string(False)}},
                            "sweep": {"heartbeat_s": 5, "grace_s": 30, "max_retries": 0, "storage_patience_s": 0},
                            "tracking": {"experiment": database}})
    barrier = threading.Barrier(6)

    def open_together(_) -> optuna.storages.RDBStorage:
        barrier.wait()
        return campaign.open_storage(cfg)

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        storages = list(pool.map(open_together, range(6)))
    assert len(storages) == 6
    optuna.create_study(study_name="after-the-race", storage=storages[0])
    assert [study.study_name for study in storages[-1].get_all_studies()] == ["after-the-race"]


def test_workers_starting_together_share_one_new_experiment(stack):
    mlflow.set_tracking_uri(stack["MLFLOW_TRACKING_URI"])
    name = f"together-{uuid.uuid4().hex[:8]}"
    barrier = threading.Barrier(6)

    def connect_together(_) -> str:
        barrier.wait()
        return tracking.connect(stack["MLFLOW_TRACKING_URI"], name)

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        assert len(set(pool.map(connect_together, range(6)))) == 1


def test_a_wrong_database_password_is_one_line(stack, data_overrides, tmp_path):
    storage = re.sub(r":[^:@/]+@", ":wrong@", stack["OPTUNA_STORAGE"])
    overrides = overrides_for(data_overrides, "wrong-password", storage, f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(UserError, match="password authentication failed") as error:
        campaign.work(overrides)
    assert "\n" not in str(error.value)
    assert "wrong" not in str(error.value) and "***" in str(error.value)  # no password in logs


def test_a_sweep_whose_every_trial_fails_says_why_and_leaves_nothing_running(data_overrides, tmp_path):
    storage, tracking_uri = f"sqlite:///{tmp_path / 'optuna.db'}", f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = overrides_for(data_overrides, "doomed", storage, tracking_uri, "training.loops=20",
                              "env.rank_k=50", "sweep.max_failures=2")
    with pytest.raises(UserError, match=r"study 'doomed' stopped: 2 trials failed .* because: env.rank_k must be"):
        campaign.work(overrides)
    assert states(optuna.load_study(study_name="doomed", storage=storage)) == {"FAIL": 2}
    statuses = collections.Counter(run.info.status for run in runs_of(tracking_uri, "doomed"))
    assert statuses == {"FAILED": 1}  # the parent; a config error starts no run


def test_pruning_stops_hopeless_trials_and_a_trial_reproduces_standalone(make_config, data_overrides, tmp_path):
    storage, tracking_uri = f"sqlite:///{tmp_path / 'optuna.db'}", f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = overrides_for(data_overrides, "pruned", storage, tracking_uri, "hydra.sweeper.n_trials=9",
                              "training.loops=60", "sweep.pruner=median")
    campaign.work(overrides)
    study = optuna.load_study(study_name="pruned", storage=storage)
    counts = states(study)
    assert counts["COMPLETE"] == 9 and counts["PRUNED"] >= 1, counts
    found = runs_of(tracking_uri, "pruned")
    pruned = [run for run in found if "sweep.pruned" in run.data.tags]
    assert len(pruned) == counts["PRUNED"] and all(run.info.status == "KILLED" for run in pruned)
    # A trial's value is the value of its configuration, trained anywhere else.
    best = study.best_trial
    params = [f"{name}={value}" for name, value in best.params.items()]
    final, _ = train(make_config("agent=linucb", "env.reward_rank=4", "env.rank_k=3", "training.loops=60", *params))
    assert final["train/cumulative_regret"] == best.value


def test_a_grid_of_agents_and_seeds_runs_each_point_once(data_overrides, tmp_path):
    storage, tracking_uri = f"sqlite:///{tmp_path / 'optuna.db'}", f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [o.replace("hparams_search=linucb", "hparams_search=grid") for o in overrides_for(
        data_overrides, "grid", storage, tracking_uri, "training.loops=20",
        "agent=choice(linucb, random)", "training.seed=choice(0, 1)")]
    campaign.work(overrides)
    study = optuna.load_study(study_name="grid", storage=storage)
    assert sorted((t.params["agent"], t.params["training.seed"]) for t in study.trials) == [
        ("linucb", 0), ("linucb", 1), ("random", 0), ("random", 1)]
    assert states(study) == {"COMPLETE": 4}


def test_reap_ends_only_runs_idle_longer_than_the_threshold(tracking_uri, capsys):
    client = mlflow.MlflowClient(tracking_uri)
    experiment = client.create_experiment("reap")
    stale, fresh = client.create_run(experiment), client.create_run(experiment)
    time.sleep(1.5)
    client.log_metric(fresh.info.run_id, "train/regret", 1.0)  # activity keeps a run alive
    runs.main(["reap", "--older-than", "1s", "--experiment", "reap", "--tracking-uri", tracking_uri])
    assert client.get_run(stale.info.run_id).info.status == RunStatus.to_string(RunStatus.FAILED)
    assert "reap" in client.get_run(stale.info.run_id).data.tags["bandits.ended_by"]
    assert client.get_run(fresh.info.run_id).info.status == "RUNNING"
    with pytest.raises(SystemExit) as exit:
        runs.main(["reap", "--older-than", "soon", "--tracking-uri", tracking_uri])
    assert exit.value.code == 2


# Each source of randomness once: sampled actions, network weights, dropout, posterior draws,
# uniform picks. (NeuralLinUCB's come from the same network weights and epsilon sampling.)
STOCHASTIC = ["epsilon_greedy", "neural_boltzmann", "dropout_ts", "lints", "random"]


def test_a_jobs_metrics_do_not_depend_on_the_jobs_before_it(make_config):
    """Every stochastic agent's job, run after the others in one order and then in the reverse
    order (other jobs before it each time), gives the same metrics. A job is what `train` runs:
    the engine `experiment.assemble` seeds and builds, in a process that ran other jobs."""
    jobs = {agent: make_config(f"agent={agent}", "training.loops=20", "training.seed=5") for agent in STOCHASTIC}

    def job_metrics(cfg):
        engine = experiment.assemble(cfg, data.load(cfg.data))
        return np.concatenate([np.stack([chunk.regret, chunk.reward, chunk.suboptimal])
                               for chunk in engine.run(cfg.training.loops, cfg.training.chunk_loops)], axis=1)

    forward = {agent: job_metrics(job) for agent, job in jobs.items()}
    backward = {agent: job_metrics(job) for agent, job in reversed(jobs.items())}
    for agent in STOCHASTIC:
        np.testing.assert_array_equal(backward[agent], forward[agent], err_msg=agent)


def test_the_sweep_settings_are_checked(data_overrides, tmp_path):
    cfg = config.compose(["hparams_search=linucb", "sweep.pruner=sometimes"], with_hydra=True)
    with pytest.raises(UserError, match="sweep.pruner must be null, median or hyperband"):
        campaign.check_sweeper(cfg)
