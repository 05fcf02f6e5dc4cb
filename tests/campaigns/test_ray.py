"""Campaigns on a real Ray cluster, started from the repo's script on this machine as a head and a
worker node: a leaderboard and a sweep placed by Ray's scheduler, the study in PostgreSQL and the
runs on the MLflow server, and a worker node killed mid-sweep."""

from __future__ import annotations

import collections
import contextlib
import os
import re
import signal
import subprocess
import uuid
from pathlib import Path

import mlflow
import optuna
import psutil
import pytest

from src.paths import PROJECT_ROOT
from tests.campaigns.conftest import overrides_for, runs_of, states
from tests.conftest import SMALL, free_port, wait_until

SCRIPT = str(PROJECT_ROOT / "ray_cluster.sh")


class Cluster:
    """Ray nodes started with `ray_cluster.sh ... --block`, each in a session of its own; killing
    one takes its raylet and its workers down at once, as a machine's end would."""

    def __init__(self, logs: Path):
        self.logs, self.nodes = logs, []
        self.address = f"127.0.0.1:{free_port()}"

    def start(self, *command: str) -> subprocess.Popen:
        log = open(self.logs / f"node-{len(self.nodes)}.log", "w")
        before = self.alive_nodes()
        node = subprocess.Popen([SCRIPT, *command, "--cpus", "1", "--block"], cwd=PROJECT_ROOT, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.nodes.append(node)
        wait_until(lambda: self.alive_nodes() - before, 180, f"Ray node {len(self.nodes)} to join")
        return node

    def alive_nodes(self) -> set[str]:
        status = subprocess.run([SCRIPT, "status", self.address], capture_output=True, text=True, timeout=60)
        active = status.stdout.split("Active:")[-1].split("Pending:")[0] if status.returncode == 0 else ""
        return set(re.findall(r"\bnode_[0-9a-f]+", active))

    @staticmethod
    def kill(node: subprocess.Popen) -> None:
        """The node's processes, its workers among them (Ray starts them in sessions of their own)."""
        with contextlib.suppress(psutil.NoSuchProcess):
            for process in psutil.Process(node.pid).children(recursive=True):
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.pid, signal.SIGKILL)
        node.wait(timeout=60)

    def stop(self) -> None:
        for node in reversed(self.nodes):
            self.kill(node)


@pytest.fixture
def cluster(tmp_path):
    ray = Cluster(tmp_path)
    try:
        ray.start("up", "--port", ray.address.rsplit(":", 1)[1])
        yield ray
    finally:
        ray.stop()


def test_an_address_where_no_cluster_answers_is_one_line_before_anything_is_made(tmp_path, data_overrides):
    nowhere = f"127.0.0.1:{free_port()}"
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    sweep = subprocess.run([str(PROJECT_ROOT / "multirun.sh"), "linucb", "--ray", nowhere, "--storage", storage,
                            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", *data_overrides],
                           capture_output=True, text=True, timeout=300, cwd=PROJECT_ROOT)
    assert sweep.returncode == 2, sweep.stderr[-2000:]
    assert f"--ray {nowhere}: no Ray cluster answers there" in sweep.stderr and "Traceback" not in sweep.stderr
    assert not (tmp_path / "optuna.db").exists() and not (tmp_path / "mlflow.db").exists()
    board = subprocess.run(["uv", "run", "--no-sync", "python", "-m", "benchmarks.leaderboard", "--ray", "nowhere",
                            "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"],
                           capture_output=True, text=True, timeout=300, cwd=PROJECT_ROOT)
    assert board.returncode == 2 and "--ray nowhere: not a Ray cluster address" in board.stderr, board.stderr[-2000:]
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
def test_a_board_and_a_sweep_on_a_two_node_ray_cluster_survive_a_killed_node(cluster, stack, data_overrides,
                                                                             tmp_path):
    # The leaderboard's runs placed by Ray, tracked as ever. Once both nodes train a job (one CPU
    # each), the worker node dies: its job trains again on the head, the runs of the try that
    # died end FAILED, and each run of the board FINISHED once.
    doomed = cluster.start("join", cluster.address)
    tracking_uri, experiment = stack["MLFLOW_TRACKING_URI"], f"board-{uuid.uuid4().hex[:8]}"
    client = mlflow.MlflowClient(tracking_uri)
    out = tmp_path / "board.out"
    board = subprocess.Popen(["uv", "run", "--no-sync", "python", "-m", "benchmarks.leaderboard", "--ray",
                              cluster.address, "--agents", "linucb,lints", "--envs", "movielens", "--seeds", "2",
                              "--loops", "20000", "--out", str(tmp_path / "board"), "--tracking-uri", tracking_uri,
                              "--experiment", experiment, *data_overrides,
                              *[o for o in SMALL if not o.startswith("training.loops=")]],
                             cwd=PROJECT_ROOT, stdout=open(out, "w"), stderr=subprocess.STDOUT)

    def entries_training() -> set[str]:
        found = client.get_experiment_by_name(experiment)
        running = client.search_runs([found.experiment_id], "attributes.status = 'RUNNING'") if found else []
        return {run.data.tags["leaderboard.entry"] for run in running}

    wait_until(lambda: len(entries_training()) == 2, 300, "both nodes to train a job of the board")
    cluster.kill(doomed)
    assert board.wait(timeout=600) == 0, out.read_text()[-3000:]
    assert f"on the Ray cluster at {cluster.address}" in (tmp_path / "board" / "leaderboard.md").read_text()
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id],
                              "tags.`leaderboard.entry` != ''")
    finished = collections.Counter((run.data.tags["leaderboard.entry"], run.data.params["training.seed"])
                                   for run in runs if run.info.status == "FINISHED")
    assert sorted(finished.values()) == [1] * 4, finished
    died = [run for run in runs if run.info.status != "FINISHED"]  # as many as the try had made
    assert died and {run.info.status for run in died} == {"FAILED"}, [run.info.status for run in died]
    assert all("Ray task's worker or node died" in run.data.tags["bandits.ended_by"] for run in died)

    doomed = cluster.start("join", cluster.address)  # a fresh worker node, to die mid-sweep
    study_name = f"ray-{uuid.uuid4().hex[:8]}"
    storage = stack["OPTUNA_STORAGE"]
    overrides = overrides_for(data_overrides, study_name, storage, tracking_uri, "training.loops=3000",
                              "sweep.heartbeat_s=1", "sweep.grace_s=5")[1:]
    out = tmp_path / "multirun.out"
    sweep = subprocess.Popen([str(PROJECT_ROOT / "multirun.sh"), "linucb", "--workers", "2", "--trials", "6",
                              "--storage", storage, "--ray", cluster.address, *overrides], cwd=PROJECT_ROOT,
                             stdout=open(out, "w"), stderr=subprocess.STDOUT)
    # Once the two tasks both run trials (each node has one CPU), the worker node
    # dies with its task mid-work; a trial it was running fails, and runs again elsewhere.
    wait_until(lambda: len(re.findall(r"Trial \d+ started", out.read_text())) >= 2, 300, "two trials to start")
    cluster.kill(doomed)
    assert sweep.wait(timeout=600) == 0, out.read_text()[-3000:]

    study = optuna.load_study(study_name=study_name, storage=storage)
    counts = states(study)
    # Exactly the trials asked for, nothing left running; the task killed between two trials leaves
    # none failed, killed in one leaves that one.
    assert counts["COMPLETE"] == 6 and counts["RUNNING"] == 0 and counts["FAIL"] <= 1, counts
    found = runs_of(tracking_uri, study_name)
    by_status = collections.Counter(run.info.status for run in found if run.data.tags.get("sweep.role") != "parent")
    assert by_status["FINISHED"] == 6 and set(by_status) <= {"FINISHED", "FAILED"}, by_status
    for dead in (run for run in found if run.info.status == "FAILED"):
        assert "worker died" in dead.data.tags["bandits.ended_by"]
    assert [run.info.status for run in found if run.data.tags.get("sweep.role") == "parent"] == ["FINISHED"]
    assert "RUNNING" not in {run.info.status for run in mlflow.MlflowClient(tracking_uri).search_runs(
        [mlflow.MlflowClient(tracking_uri).get_experiment_by_name(study_name).experiment_id])}
