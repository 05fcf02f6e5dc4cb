"""`python -m src.train` end to end on synthetic data, and its failure modes."""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from mlflow.exceptions import MlflowException

from src import config, metrics, tracking, train, training
from src.cli import exit_on_user_error
from src.data import movielens
from src.data.synthetic import checksum_override
from src.engine import Engine
from src.envs import build_environment
from src.errors import UserError
from src.paths import PROJECT_ROOT
from tests.conftest import SMALL, breaking_after_first_chunk

METRICS = [metrics.REGRET, metrics.CUMULATIVE_REGRET, metrics.REWARD, metrics.SUBOPTIMAL_ARM_RATE]


def runs(uri: str):
    client = mlflow.MlflowClient(uri)
    experiments = client.search_experiments()
    return client, client.search_runs([e.experiment_id for e in experiments])


def cli_args(movielens_dir, uri, *extra):
    """The command line of a test run: its data, its store, and Hydra's output folder beside
    the store (not in the checkout, where an in-process run would put it)."""
    directory, checksums = movielens_dir
    outputs = Path(uri.removeprefix("sqlite:///")).parent / "outputs"
    return [f"data.dir={directory}", checksum_override(checksums), f"tracking.uri={uri}",
            f"hydra.run.dir={outputs}", *SMALL, *extra]


def test_cli_run_is_tracked_end_to_end(run_cli, movielens_dir, tracking_uri):
    result = run_cli("src.train", *cli_args(movielens_dir, tracking_uri, "agent=linucb", "tracking.log_every=2",
                                              "tracking.system_metrics_every_s=1"))
    assert result.returncode == 0, result.stderr[-2000:]
    client, found = runs(tracking_uri)
    assert len(found) == 1
    run = found[0]
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "linucb·loops=60·num_movies=10·…·s0"  # the test's sizes differ from the defaults
    assert run.data.tags[training.LONG_NAME_TAG].startswith("movielens__linucb__loops=60__num_movies=10__rank_k=4__seed0__")
    assert float(run.data.tags[metrics.RANDOM_REGRET_TAG]) > 0
    experiment_tags = client.get_experiment(run.info.experiment_id).tags
    assert "MovieLens" in experiment_tags["mlflow.note.content"]
    (ratings,) = run.inputs.dataset_inputs
    directory, _ = movielens_dir
    assert (ratings.dataset.name, ratings.dataset.source_type) == ("movielens", "local")
    assert directory.name in ratings.dataset.source and len(ratings.dataset.digest) >= 8
    assert run.data.params["agent.alpha"] == "10.0"
    assert run.data.params["env.rank_k"] == "4"
    assert run.data.tags["version.tf-agents"] == "0.19.0"
    assert len(run.data.tags["mlflow.source.git.commit"]) == 40
    assert run.data.metrics["system/cpu_utilization_percentage"] >= 0  # MLflow's System metrics tab
    interactions = 8 * 2
    for key in METRICS:
        history = client.get_metric_history(run.info.run_id, key)
        # 60 loops logged every 2 loops.
        assert [m.step for m in history] == [2 * interactions * i for i in range(1, 31)], key
        # Rounded as logged: no float noise such as 5947.0000000020955 in the UI.
        assert all(m.value == metrics.rounded(m.value) for m in history), key
    cumulative = [m.value for m in client.get_metric_history(run.info.run_id, metrics.CUMULATIVE_REGRET)]
    assert np.all(np.diff(cumulative) >= 0)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"regret.png", "config.yaml", "metrics.csv", "policy"} <= artifacts
    local = Path(client.download_artifacts(run.info.run_id, ""))
    assert (local / "regret.png").read_bytes()[:4] == b"\x89PNG"
    assert (local / "policy" / "saved_model.pb").is_file()
    table = np.genfromtxt(local / "metrics.csv", delimiter=",", names=True)
    assert len(table) == 60
    assert metrics.rounded(table["traincumulative_regret"][-1]) == cumulative[-1]  # the CSV as computed
    # TensorBoard's copy holds the curve MLflow shows.
    (events,) = (local / "tensorboard").iterdir()
    board = {event.step: float(tf.make_ndarray(value.tensor))
             for event in tf.compat.v1.train.summary_iterator(str(events))
             for value in event.summary.value if value.tag == metrics.CUMULATIVE_REGRET}
    assert list(board) == [m.step for m in client.get_metric_history(run.info.run_id, metrics.CUMULATIVE_REGRET)]
    assert list(board.values()) == pytest.approx(cumulative, rel=1e-5)  # float32 there, 6 digits here
    assert "Done in" in result.stderr
    # Said before the imports that take tens of seconds; in a log (stderr is a pipe here) no
    # progress-bar frames, but a line per tenth of the run.
    assert result.stderr.splitlines()[0].endswith("Loading TensorFlow, MLflow and Optuna...")
    assert "loop/s" not in result.stderr and "Loop 60 of 60: cumulative regret" in result.stderr


@pytest.mark.parametrize("override", ["training.steps_per_loop=2147483647", "agent.alpha=abc", "+agent.alpah=3",
                                      "objective=train/nothing", "tracking.log_every=0"])
def test_a_config_error_is_refused_before_tensorflow_loads(run_cli, movielens_dir, tracking_uri, override):
    result = run_cli("src.train", *cli_args(movielens_dir, tracking_uri, override))
    assert result.returncode == 2 and override.split("=")[0].lstrip("+") in result.stderr, result.stderr[-2000:]
    assert "Loading TensorFlow" not in result.stderr and "Traceback" not in result.stderr


def test_a_multiruns_override_hydra_cannot_compose_is_one_line(run_cli, movielens_dir, tracking_uri):
    """Hydra composes a multirun's overrides itself, after the command line's own checks."""
    result = run_cli("src.train", "-m", *cli_args(movielens_dir, tracking_uri, "hydra.foo=1"))
    assert result.returncode == 2 and result.stderr.rstrip().endswith(
        "Could not override 'hydra.foo'. To append to your config use +hydra.foo=1: Key 'foo' not in 'HydraConf'"
    ), result.stderr[-2000:]


def test_an_override_of_the_wrong_type_says_why_in_its_line(run_cli, movielens_dir, tracking_uri):
    """Hydra's own line ("Error merging override ...") says why only in its cause."""
    result = run_cli("src.train", *cli_args(movielens_dir, tracking_uri, "hydra.job.chdir=maybe"))
    assert result.returncode == 2 and result.stderr.rstrip().endswith(
        "Error merging override hydra.job.chdir=maybe: Value 'maybe' is not a valid bool (type str)"), result.stderr[-2000:]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command, status, said", [
    ("pass", 0, ""),
    ("sys.exit(3)", 3, ""),
    ("sys.exit('one line')", 1, "one line"),
])
def test_a_command_exits_with_its_status_after_its_exit_handlers(tmp_path, command, status, said):
    """`src.cli.run_and_exit` skips the interpreter's teardown, not what exit handlers write."""
    marker = tmp_path / "handled"
    script = ("import atexit, sys; from pathlib import Path; from src.cli import run_and_exit\n"
              f"atexit.register(lambda: Path({str(marker)!r}).write_text('flushed'))\n"
              "def command():\n"
              "    print('working', flush=False)\n"
              f"    {command}\n"
              "run_and_exit(command)\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=PROJECT_ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == status and result.stdout == "working\n" and result.stderr.strip() == said
    assert marker.read_text() == "flushed"


def test_tensorflows_warnings_reach_stderr_after_its_quiet_import():
    script = "import src.tf_runtime, tensorflow as tf; tf.get_logger().warning('retraced, say')"
    result = subprocess.run([sys.executable, "-c", script], cwd=PROJECT_ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.stderr.strip() == "WARNING:tensorflow:retraced, say"


def test_imports_run_without_the_collector_and_leave_it_on():
    """`src.cli.uncollected`: TensorFlow's objects are frozen out of the collector's reach, which is
    on again afterwards (only once the outermost of nested blocks ends); a block that imports
    nothing new (a multirun's later job) freezes nothing, as garbage made since would stay."""
    script = ("import gc; from src.cli import uncollected\n"
              "with uncollected():\n"
              "    with uncollected():\n"
              "        import src.tf_runtime\n"
              "    inner_left_it_off = not gc.isenabled()\n"
              "frozen = gc.get_freeze_count()\n"
              "with uncollected():\n"
              "    import src.tf_runtime\n"
              "print(inner_left_it_off, gc.isenabled(), frozen, gc.get_freeze_count())\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=PROJECT_ROOT, capture_output=True, text=True,
                            timeout=120)
    inner_left_it_off, enabled, frozen, frozen_later = result.stdout.split()
    assert inner_left_it_off == enabled == "True" and int(frozen) > 100_000 and frozen_later == frozen


@pytest.mark.parametrize("overrides, name", [
    ([], "linucb·s0"),
    (["training=quick"], "linucb·quick·s0"),
    (["data=synthetic"], "linucb·synthetic·s0"),
    (["data=synthetic", "training=quick", "training.seed=3"], "linucb·synthetic·quick·s3"),
    (["agent=epsilon_greedy", "agent.epsilon=0.2"], "epsilon_greedy·epsilon=0.2·s0"),
    (["env=movielens_per_arm", "agent.alpha=3"], "linucb·per_arm·alpha=3·s0"),
    (["env.rank_k=5"], "linucb·rank_k=5·s0"),  # not reward_rank, which follows rank_k
    (["training.chunk_loops=50", "training.threads.inter_op=1"], "linucb·s0"),  # speed, not what is run
    (["tuned=linucb-movielens"], "linucb·tuned·s0"),
    (["training.loops=60000", "env.num_movies=100", "agent.alpha=2.5", "agent.tikhonov_weight=0.5"],
     "linucb·loops=60000·alpha=2.5·…·s0"),
])
def test_run_names_tell_apart_what_differs_from_the_defaults_and_stay_short(overrides, name):
    cfg = config.compose(overrides)
    assert training.run_name(cfg, {}) == name
    assert training.run_name(cfg, {"sweep.trial": "7"}) == f"{cfg.agent.name}{'·per_arm' * ('per_arm' in name)}·s{cfg.training.seed}·t7"
    assert all(part in training.long_name(cfg, {}) for part in config.differences(cfg))


def test_same_seed_same_metrics_other_seed_differs(make_config):
    first, _ = training.train(make_config("training.seed=0"))
    assert training.train(make_config("training.seed=0"))[0] == first
    assert training.train(make_config("training.seed=1"))[0] != first


@pytest.mark.parametrize("overrides, loops_per_point", [
    (["training.loops=20000"], 62), (["training.loops=2000"], 6), (["training.loops=100"], 1),
    (["training.loops=20000", "tracking.log_every=10"], 10)])
def test_a_curve_gets_as_many_points_as_mlflow_draws_unless_told(make_config, overrides, loops_per_point):
    assert training.loops_per_point(make_config(*overrides)) == loops_per_point


def test_metrics_csv_is_what_pandas_writes_read_back_exactly(tmp_path):
    """Arrow writes the table (10x pandas' speed): every float reads back to the bit and as a float
    (a column of whole ones too: a loss of 0 where nothing trains, a count), a NaN as pandas
    writes it (an empty cell), and the header unquoted."""
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"step": np.arange(1, 1001) * 16, metrics.REGRET: rng.random(1000) * 1e-5,
                          metrics.CUMULATIVE_REGRET: np.cumsum(rng.random(1000)) * 1e6, metrics.LOSS: rng.random(1000),
                          metrics.CATALOGUE_SIZE: np.arange(1000) % 7 - 3.0, metrics.BEST_MOVIE_MOVED: 0.0})
    frame.loc[[0, 7], metrics.LOSS] = np.nan
    frame.loc[1, metrics.REGRET] = np.inf
    training.write_csv(frame, tmp_path / "metrics.csv")
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "metrics.csv"), frame, check_exact=True)
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines[0] == frame.to_csv(index=False).splitlines()[0]
    assert lines[1].split(",")[3:] == ["", "-3.0", "0.0"] and lines[2].split(",")[1] == "inf"


def test_linucb_beats_uniform_random_by_a_clear_margin(make_config):
    cfg = make_config("agent=linucb", "training.loops=200", "training.seed=3")
    final, _ = training.train(cfg)
    data = movielens.parse(Path(cfg.data.dir))
    random_regret = build_environment(cfg, data).reward_model.random_policy_regret
    interactions = 200 * 16
    # Uniform choice would cost random_regret per interaction; LinUCB learns the
    # planted rank-3 structure and pays well under a third of that over the run.
    assert final[metrics.CUMULATIVE_REGRET] < interactions * random_regret / 3
    assert final[metrics.REGRET] < random_regret / 10


@pytest.mark.parametrize("override, message", [
    ("agent=nope", "unknown agent 'nope'; choose one of"),
    ("agent.alpha=-1", "agent.alpha must be > 0, got -1 (conf/agent/linucb.yaml)"),
    ("foo=1", "foo is not a setting here; the settings are: tracking, sweep, objective, offline"),
    ("training.threads.intra_op=-1", "training.threads.intra_op must be an integer >= 0"),
    ("training.threads.inter_op=100000", "training.threads.inter_op must be at most 4 x the"),
    ("training.steps_per_loop=2147483647", "training.steps_per_loop must be at most 64"),
    ("training.chunk_loops=100000", "training.chunk_loops must be such that chunk_loops x batch_size x steps_per_loop"),
    ("training.loops=2000000000", "training.loops must be small enough for the run's history to fit"),
])
def test_bad_input_exits_with_one_line_and_no_running_run(movielens_dir, tracking_uri, override, message, capfd,
                                                         caplog, monkeypatch):
    # In-process through the real entry point (test_cli_run_is_tracked_end_to_end starts a
    # real process). Log lines reach the test's log capture until Hydra's own logging set-up
    # replaces it with the console (stderr), so the one error line is looked for in both.
    monkeypatch.setattr(sys, "argv", ["src.train", *cli_args(movielens_dir, tracking_uri, override)])
    monkeypatch.setattr(signal, "signal", lambda *_: None)  # leave this test process's handlers alone
    # An earlier in-process Hydra job left a console handler on a stream pytest has closed since.
    monkeypatch.setattr(logging.root, "handlers", [])
    with pytest.raises(SystemExit) as exit:
        train.cli()
    assert exit.value.code == 2
    stderr = capfd.readouterr().err
    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    errors += [line for line in stderr.splitlines() if "[ERROR]" in line]
    assert len(errors) == 1 and message in errors[0], errors
    assert "Traceback" not in stderr
    assert all(run.info.status != "RUNNING" for run in runs(tracking_uri)[1])


@pytest.mark.parametrize("override, message", [
    ("env.rank_k=50", "env.rank_k must be between 1 and"),
    ("env.reward_rank=2", "env.rank_k must be between 1 and env.reward_rank=2"),
    ("env.rank_k=0", "env.rank_k must be an integer >= 1, got 0"),  # said reward_rank=0, rank_k's own copy
    ("agent.tikhonov_weight=0", "agent.tikhonov_weight must be > 0"),
    ("training.loops=0", "training.loops must be an integer >= 1"),
    ("training.seed=-1", "training.seed must be an integer >= 0"),
    ("objective=train/nothing", "objective must be one of"),
    ("agent.alpha=abc", "agent.alpha must be a number, got 'abc' (conf/agent/linucb.yaml)"),
    ("env.rank_k=2.5", "env.rank_k must be an integer, got 2.5 (conf/env/movielens.yaml)"),
    ("tracking.uri=http://127.0.0.1:9", "cannot reach the MLflow tracking server at http://127.0.0.1:9"),
])
def test_impossible_config_fails_before_training(make_config, tracking_uri, override, message):
    with pytest.raises(UserError, match=re.escape(message)):
        training.train(make_config(override))
    # Every check, the builders' too, comes before the run: a typo leaves no FAILED run behind.
    if not override.startswith("tracking.uri"):
        assert runs(tracking_uri)[1] == []


def test_an_mlflow_http_setting_it_cannot_read_is_one_line_before_any_run(make_config, tracking_uri, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0.5")  # MLflow reads an integer
    with pytest.raises(UserError, match=r"^Failed to convert '0.5' for MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR: .* "
                                        r"\(an environment variable read by MLflow\)$"):
        training.train(make_config())
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR")
    assert runs(tracking_uri)[1] == []


def test_corrupt_data_file_fails_before_any_run(make_config, movielens_dir, tmp_path, tracking_uri):
    directory, _ = movielens_dir
    corrupt = tmp_path / "corrupt"
    shutil.copytree(directory, corrupt)
    (corrupt / "u.data").write_bytes(b"garbage\n")
    with pytest.raises(UserError, match="u.data is corrupt"):
        training.train(make_config(f"data.dir={corrupt}"))
    assert runs(tracking_uri)[1] == []


@pytest.mark.parametrize("interruption, status", [(RuntimeError("boom"), "FAILED"), (KeyboardInterrupt(), "KILLED")])
def test_a_run_that_breaks_keeps_what_it_logged(make_config, tracking_uri, monkeypatch, interruption, status):
    monkeypatch.setattr(Engine, "run", breaking_after_first_chunk(Engine.run, interruption))
    with pytest.raises(type(interruption)):
        training.train(make_config("tracking.log_every=1"))
    client, found = runs(tracking_uri)
    assert [run.info.status for run in found] == [status]
    history = client.get_metric_history(found[0].info.run_id, metrics.CUMULATIVE_REGRET)
    assert len(history) == 20  # the first chunk's loops were logged before the break
    # Artifacts live beside the SQLite store, not in whatever directory the run started from.
    store = Path(tracking_uri.removeprefix("sqlite:///")).parent
    assert found[0].info.artifact_uri.startswith((store / "mlruns" / "movielens-bandits").as_uri())


def test_a_diverging_agent_fails_its_run_with_one_line(make_config, tracking_uri):
    with pytest.raises(UserError, match="training diverged: the agent's loss is (nan|inf)"):
        training.train(make_config("agent=epsilon_greedy", "agent.learning_rate=1e6"))
    client, found = runs(tracking_uri)
    assert [run.info.status for run in found] == ["FAILED"]
    losses = [m.value for m in client.get_metric_history(found[0].info.run_id, metrics.LOSS)]
    assert not np.isfinite(losses[-1])  # the history up to the divergence is kept
    assert "metrics.csv" in {artifact.path for artifact in client.list_artifacts(found[0].info.run_id)}


def test_sigterm_marks_the_run_killed_keeps_its_history_and_exits_143(make_config, tracking_uri):
    def terminate(step: int, value: float, run_id: str) -> None:  # as a scheduler would, mid-run
        os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(SystemExit) as exit, exit_on_user_error():
        training.train(make_config("training.loops=1000000", "tracking.log_every=1"), report=terminate)
    assert exit.value.code == 143
    client, (run,) = runs(tracking_uri)
    assert run.info.status == "KILLED"
    assert {"metrics.csv", "regret.png"} <= {artifact.path for artifact in client.list_artifacts(run.info.run_id)}
    assert len(client.get_metric_history(run.info.run_id, metrics.CUMULATIVE_REGRET)) >= 20


def test_a_burst_of_ctrl_c_marks_the_run_killed_keeps_its_history_and_exits_quietly(movielens_dir, tracking_uri,
                                                                                   tmp_path):
    """A user hammering Ctrl-C must still get a clean stop: no interrupt may land inside a
    write to the store, or the run's end waits on a SQLite lock and leaves it RUNNING."""
    signals, code = [signal.SIGINT] * 30, 130
    args = cli_args(movielens_dir, tracking_uri, "training.loops=1000000", "training.chunk_loops=5",
                    "tracking.log_every=1")
    # A job started in the background inherits an ignored SIGINT; a user's terminal does not.
    process = subprocess.Popen([sys.executable, "-m", "src.train", *args], cwd=tmp_path, text=True,
                               stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)},
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for line in process.stderr:  # wait until training starts
            if "Training linucb on" in line:
                break
        time.sleep(1)  # a few chunks logged
        for signum in signals:
            process.send_signal(signum)
            time.sleep(0.01)
        _, rest = process.communicate(timeout=600)  # its clean-up, on a loaded machine
    finally:
        process.kill()
    assert process.returncode == code, rest[-3000:]
    assert "Traceback" not in rest and "Interrupted" in rest
    client, (run,) = runs(tracking_uri)
    assert run.info.status == "KILLED"
    assert {"metrics.csv", "regret.png"} <= {artifact.path for artifact in client.list_artifacts(run.info.run_id)}


def test_history_writes_start_at_most_once_per_interval(tracking_uri, monkeypatch):
    """Each write costs the training thread time: rows that come within `every_s` of the last
    write wait for the next, even when the store is idle."""
    client = mlflow.MlflowClient(tracking_uri)
    run_id = client.create_run(client.create_experiment("history")).info.run_id
    mlflow.set_tracking_uri(tracking_uri)
    writes = []
    write = tracking.log_history
    monkeypatch.setattr(tracking, "log_history", lambda *args: (writes.append(len(args[1])), write(*args)))
    with tracking.HistoryLogger(run_id, every_s=3600) as logger:
        for step in range(1, 6):
            logger.log(pd.DataFrame({"step": [step], metrics.REGRET: [step / 2]}))
            time.sleep(0.3)  # long enough for any write to be done
        assert writes == [1]
    assert writes == [1, 4]
    assert len(client.get_metric_history(run_id, metrics.REGRET)) == 5


def test_histories_written_in_the_background_keep_every_row_and_raise_the_stores_error(tracking_uri):
    client = mlflow.MlflowClient(tracking_uri)
    run_id = client.create_run(client.create_experiment("history")).info.run_id
    mlflow.set_tracking_uri(tracking_uri)
    with tracking.HistoryLogger(run_id) as logger:
        for step in range(1, 41):  # rows that come while a write is in flight go in the next
            logger.log(pd.DataFrame({"step": [step], metrics.REGRET: [step / 2]}))
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, metrics.REGRET)] == [
        (step, step / 2) for step in range(1, 41)]
    with pytest.raises(MlflowException, match="not found"), tracking.HistoryLogger("no-such-run") as logger:
        logger.log(pd.DataFrame({"step": [1], metrics.REGRET: [0.5]}))
