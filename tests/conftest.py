"""Shared fixtures: synthetic MovieLens data and the real configs, shrunk to test size."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import mlflow
import pytest

from src import config, tf_runtime  # noqa: F401  (a quiet TensorFlow start-up before any test imports it)
from src.data.synthetic import checksum_override, write_movielens
from src.paths import PROJECT_ROOT

SMALL = ["env.num_movies=10", "env.rank_k=4", "training.loops=60", "training.chunk_loops=20"]
# What the tools that run the tests leave in the checkout; anything else new is a test's doing.
# Names the test run (the controller and its workers), so that it stops only a stack it used.
TEST_RUN = "BANDITS_TEST_RUN"
TOOLING = (".venv/", "uv.lock", ".pytest_cache/", ".ruff_cache/", ".stack/", "__pycache__/")


def checkout_entries() -> set[str] | None:
    """`git status` of the checkout, ignored files included; None outside a git checkout."""
    try:
        status = subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=PROJECT_ROOT,
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return {line for line in status.splitlines() if not line[3:].endswith(TOOLING)}


def pytest_sessionstart(session):
    session.config.checkout_before = checkout_entries()
    # The test workers inherit the controller's environment: one id for the whole test run.
    os.environ.setdefault(TEST_RUN, uuid.uuid4().hex)


def pytest_sessionfinish(session):
    """Stop the test stack this run started, and fail the session when its tests left files in
    the checkout (under multirun/, logs/, ...): the controller does both once every test worker is done."""
    if hasattr(session.config, "workerinput"):
        return
    stop_the_test_stack()
    if session.config.checkout_before is None:
        return
    left = sorted(checkout_entries() - session.config.checkout_before)
    if left:
        writer = session.config.get_terminal_writer()
        writer.line()
        writer.line(f"The tests left these in the checkout (git status --ignored): {', '.join(left)}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def stop_the_test_stack() -> None:
    """`./stack.sh down` on the test stack, if this test run used it and nobody asked to keep it
    (KEEP_TEST_STACK=1 saves the next run its start-up, half a minute)."""
    used_by = TEST_STACK / "used-by"
    if os.environ.get("KEEP_TEST_STACK") == "1" or not used_by.is_file() or used_by.read_text() != os.environ[TEST_RUN]:
        return
    subprocess.run([str(PROJECT_ROOT / "stack.sh"), "down"], env={**os.environ, "STACK_DIR": str(TEST_STACK)},
                   capture_output=True, timeout=300)
    used_by.unlink()


@pytest.fixture(scope="session")
def movielens_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ml-100k")
    checksums = write_movielens(directory)
    return directory, checksums


@pytest.fixture
def data_overrides(movielens_dir):
    directory, checksums = movielens_dir
    return [f"data.dir={directory}", checksum_override(checksums)]


@pytest.fixture
def tracking_uri(tmp_path):
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture
def make_config(data_overrides, tracking_uri):
    """Compose conf/ as the CLI would, on synthetic data with tracking in tmp_path."""

    def make(*overrides: str):
        return config.compose([*data_overrides, f"tracking.uri={tracking_uri}", "tracking.save_policy=false",
                               *SMALL, *overrides])

    return make


@pytest.fixture
def run_cli(tmp_path):
    """Run a module of ours in a fresh process from tmp_path; return the CompletedProcess."""

    def run(module: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
        return subprocess.run([sys.executable, "-m", module, *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=timeout)

    return run


@pytest.fixture(scope="session")
def logged_runs(movielens_dir, tmp_path_factory):
    """Training runs on synthetic data for off-policy evaluation, shared by its tests: logs of
    epsilon-greedy and of LinUCB, and LinUCB policies on the same environment and on one of 8
    movies. Returns (tracking URI, data overrides, run ids)."""
    from src.training import train  # here: only these runs need the whole training stack

    directory, checksums = movielens_dir
    data = [f"data.dir={directory}", checksum_override(checksums)]
    uri = f"sqlite:///{tmp_path_factory.mktemp('ope') / 'mlflow.db'}"

    def run(*overrides):
        train(config.compose([*data, f"tracking.uri={uri}", *SMALL, "tracking.artifacts=light", *overrides]))
        return mlflow.last_active_run().info.run_id

    ids = {
        "logs": run("agent=epsilon_greedy", "agent.epsilon=0.3", "tracking.log_interactions=true",
                    "tracking.save_policy=false"),
        "linucb_logs": run("agent=linucb", "tracking.log_interactions=true", "tracking.save_policy=false"),
        "target": run("agent=linucb", "tracking.artifacts=full"),
        "target_other_movies": run("agent=linucb", "tracking.artifacts=full", "env.num_movies=8"),
    }
    return uri, data, ids


TEST_STACK = PROJECT_ROOT / ".stack" / "test"


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    """PostgreSQL and an MLflow server on 127.0.0.1, started by `./stack.sh up` (installed by
    `./stack.sh install` when missing) in `.stack/test`, shared by the test workers and stopped
    when the test run that started it ends (unless KEEP_TEST_STACK=1):
    {"MLFLOW_TRACKING_URI": ..., "OPTUNA_STORAGE": ...}."""
    env = {**os.environ, "STACK_DIR": str(TEST_STACK)}
    lock = PROJECT_ROOT / ".stack" / "test.lock"
    lock.parent.mkdir(exist_ok=True)
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # one `up` at a time across the test workers
        TEST_STACK.mkdir(exist_ok=True)
        (TEST_STACK / "used-by").write_text(os.environ[TEST_RUN])
        for command in ("install", "up"):
            done = subprocess.run([str(PROJECT_ROOT / "stack.sh"), command], env=env, capture_output=True,
                                  text=True, timeout=600)
            assert done.returncode == 0, done.stderr[-3000:]
    return dict(line.removeprefix("export ").split("=", 1) for line in done.stdout.splitlines())


def breaking_after_first_chunk(run, interruption: BaseException):
    """An engine's `run` or `run_replicas` that yields its first chunk, then raises `interruption`."""

    def breaks(self, loops, chunk):
        runner = run(self, loops, chunk)
        yield next(runner)
        raise interruption

    return breaks


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(condition, timeout: float, what: str):
    """`condition()`'s first truthy value, polled every half second for up to `timeout` s."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"waited {timeout:.0f} s for {what}"
        time.sleep(0.5)
    return value


@contextlib.contextmanager
def mlflow_ui(store: Path, meanwhile: Callable[[], object] = lambda: None):
    """`mlflow server` (the UI) on the SQLite store in folder `store`, on 127.0.0.1; yields its
    URL and the id of the experiment the runs went to, once it answers. `meanwhile` runs while
    the server starts (on 2 busy cores it takes tens of seconds)."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                               f"sqlite:///{store / 'mlflow.db'}", "--host", "127.0.0.1", "--port", str(port),
                               "--workers", "1"], cwd=store, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    client = mlflow.MlflowClient(base)

    def experiment():
        try:
            return client.get_experiment_by_name("movielens-bandits")
        except Exception:  # not listening yet
            return None

    try:
        meanwhile()
        # Generous: it starts in seconds on quiet cores, in minutes on a loaded machine.
        yield base, wait_until(experiment, 600, "mlflow server to answer").experiment_id
    finally:
        server.terminate()
        server.wait(timeout=30)
