"""A standing hostile battery: faults and bad input a user or the machine can throw at the
product, each of which must end in one clear line, a non-zero exit, no run left RUNNING and
nothing lost. Signals and dead processes are tried in tests/test_train.py and
tests/campaigns/test_workers_on_services.py (Ctrl-C bursts, SIGTERM, SIGKILLed workers, lost servers)."""

from __future__ import annotations

import copy
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import pytest
from omegaconf import OmegaConf

from src import cli, config, training
from src.errors import UserError
from src.paths import PROJECT_ROOT

# A run of its own in a fresh process, started at an agreed moment.
FIRST_RUN = """
import sys, time
import mlflow
from src import tracking
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
with mlflow.start_run(experiment_id=tracking.connect(sys.argv[1], "fresh")):
    mlflow.log_metric("train/regret", 1.0)
"""


def test_parallel_first_runs_on_a_new_store_all_record(tmp_path):
    """Processes that start together on a store that does not exist yet all create it; they
    must not break each other's schema migrations."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    start_at = str(time.time() + 8)  # after every process has imported MLflow
    processes = [subprocess.Popen([sys.executable, "-c", FIRST_RUN, uri, start_at], cwd=PROJECT_ROOT,
                                  env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}, stderr=subprocess.PIPE,
                                  text=True) for _ in range(2)]
    errors = [process.communicate(timeout=600)[1] for process in processes]
    assert [process.returncode for process in processes] == [0] * 2, "\n".join(e[-1500:] for e in errors)
    client = mlflow.MlflowClient(uri)
    found = client.search_runs([client.get_experiment_by_name("fresh").experiment_id])
    assert [run.info.status for run in found] == ["FINISHED"] * 2


def leaves(node: dict, prefix: str) -> Iterator[tuple[str, object]]:
    for key, value in node.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            yield from leaves(value, name)
        elif not key.startswith("_"):
            yield name, value


def bad_values(default) -> list:
    if isinstance(default, bool):
        return ["maybe", 1]
    if isinstance(default, (int, float)):
        return [float("inf"), float("nan"), 1e308, -1e308, "abc", [1]]
    return []


def configs_to_spoil(data_overrides) -> Iterator[tuple[str, OmegaConf]]:
    """Every option of every config group the training reads, and the top-level keys; each
    as (its keys' prefix, the composed config)."""
    for group in ("agent", "env", "training", "data"):
        for path in sorted((config.CONFIG_DIR / group).glob("*.yaml")):
            overrides = [o for o in data_overrides if group != "data"] + [f"{group}={path.stem}"]
            yield group, config.compose(overrides)
    yield "", config.compose(data_overrides)


def test_every_number_and_switch_in_every_yaml_refuses_spoilt_values(data_overrides, tmp_path):
    """Non-finite, huge and wrongly typed values for every numeric or boolean key, found in the
    YAMLs, so that new keys are covered as they come: each must be one line naming the key,
    before any run exists."""
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    problems, tried = [], 0
    for prefix, base in configs_to_spoil(data_overrides):
        OmegaConf.update(base, "tracking.uri", tracking_uri)
        section = OmegaConf.to_container(base[prefix] if prefix else base, resolve=True)
        for key, default in leaves(section, prefix):
            if not prefix and key.split(".")[0] in ("agent", "env", "training", "data"):
                continue  # the group options' own keys, tried above
            for value in bad_values(default):
                tried += 1
                spoilt = copy.deepcopy(base)
                OmegaConf.update(spoilt, key, value)
                try:
                    training.train(spoilt)
                    problems.append(f"{key}={value!r}: accepted")
                except UserError as error:
                    if key not in str(error) or "\n" in str(error):
                        problems.append(f"{key}={value!r}: unclear error {error}")
                except Exception as error:  # noqa: BLE001 (what the battery looks for)
                    problems.append(f"{key}={value!r}: {type(error).__name__}: {error}")
    assert tried > 200 and not problems, "\n".join(problems)
    if (tmp_path / "mlflow.db").exists():
        client = mlflow.MlflowClient(tracking_uri)
        assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []


def test_a_closed_terminal_stops_a_run_like_ctrl_c_with_its_own_exit_status():
    # Under `nohup` (as a background job may run the tests) SIGHUP is ignored, and the product
    # rightly leaves it so: this test is about a terminal that closes, so it starts from the default.
    previous = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    try:
        with pytest.raises(cli.Terminated) as stop, cli.interrupts_handled() as interrupts:
            os.kill(os.getpid(), signal.SIGHUP)  # without a handler, SIGHUP kills at once: no clean-up
            deadline = time.monotonic() + 60  # the handler runs when the main thread next can: wait for it
            while not interrupts.received and time.monotonic() < deadline:
                time.sleep(0.01)
            interrupts.check()
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert stop.value.signum == signal.SIGHUP
    with pytest.raises(SystemExit) as exit, cli.exit_on_user_error():
        raise stop.value
    assert exit.value.code == 129


def test_an_artifact_store_that_cannot_be_written_is_refused_before_training(make_config, tracking_uri, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.create_experiment("blocked", artifact_location=(blocker / "artifacts").as_uri())
    with pytest.raises(UserError, match="cannot write to the artifact store") as error:
        training.train(make_config("tracking.experiment=blocked"))
    assert "\n" not in str(error.value)
    (run,) = mlflow.search_runs(experiment_names=["blocked"], output_format="list")
    assert run.info.status == "FAILED" and "train/cumulative_regret" not in run.data.metrics


def test_artifacts_refused_after_training_are_kept_on_local_disk(make_config, tmp_path, monkeypatch):
    monkeypatch.setattr(training, "UNLOGGED", tmp_path / "unlogged")

    def break_the_store(step: int, value: float, run_id: str) -> None:  # its artifact folder becomes a file mid-run
        artifacts = Path(urlparse(mlflow.get_artifact_uri()).path)
        if artifacts.is_dir():
            shutil.rmtree(artifacts)
            artifacts.write_text("")

    with pytest.raises(UserError, match="artifacts could not be written to .*; they are kept in") as error:
        training.train(make_config("tracking.save_policy=true"), report=break_the_store)
    assert "\n" not in str(error.value)
    run = mlflow.last_active_run()
    assert run.info.status == "FAILED"
    kept = tmp_path / "unlogged" / run.info.run_id
    assert str(kept) in str(error.value)
    assert {"metrics.csv", "regret.png", "policy"} <= {path.name for path in kept.iterdir()}
    assert (kept / "policy" / "saved_model.pb").is_file()
    assert len(mlflow.MlflowClient().get_metric_history(run.info.run_id, "train/cumulative_regret")) > 1


def test_a_logging_window_longer_than_a_chunk_trains_and_logs_every_window(make_config):
    """`tracking.log_every` above `training.chunk_loops` (as the default window is for runs of
    32,320 loops or more) leaves chunks that complete no window."""
    final, run_id = training.train(make_config("tracking.log_every=25"))
    history = mlflow.MlflowClient().get_metric_history(run_id, "train/cumulative_regret")
    assert [point.step for point in history] == [25 * 16, 50 * 16, 60 * 16]
    assert history[-1].value == pytest.approx(final["train/cumulative_regret"], rel=1e-5)
    assert mlflow.get_run(run_id).info.status == "FINISHED"


def damaged_store(path: Path) -> None:
    """A real MLflow store with pages in its middle overwritten, as a full disk or a crash can leave it."""
    from src import tracking

    tracking.connect(f"sqlite:///{path}", "movielens-bandits")
    with open(path, "r+b") as store:
        store.seek(20 * 4096)
        store.write(bytes(range(256)) * 64)


@pytest.mark.parametrize("spoil, problem", [
    (lambda path: path.write_text("not a database\n" * 100), "is not a SQLite database"),
    (damaged_store, "is damaged"),
])
def test_a_store_that_is_not_a_database_or_is_damaged_is_one_line_and_not_written(make_config, tmp_path, spoil,
                                                                                   problem):
    store = tmp_path / "mlflow.db"
    spoil(store)
    before = store.read_bytes()
    with pytest.raises(UserError, match=problem) as error:
        training.train(make_config())
    assert str(store) in str(error.value) and "\n" not in str(error.value)
    for command in (["src.compare", "--tracking-uri", f"sqlite:///{store}"],
                    ["src.runs", "reap", "--tracking-uri", f"sqlite:///{store}"],
                    ["src.predict", f"tracking.uri=sqlite:///{store}", "run_id=abc", "user_id=1"],
                    ["src.evaluate", f"tracking.uri=sqlite:///{store}", "target_run_id=abc", "logs_run_id=def"]):
        done = subprocess.run([sys.executable, "-m", *command], cwd=tmp_path, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}, timeout=300)
        assert done.returncode == 2 and problem in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert store.read_bytes() == before


EXPECTED_REFUSALS = ("cannot take this environment's per-arm features", "cannot recommend slates",
                     "offline.logs_run_id must be")


def test_every_search_on_every_environment_builds_or_says_why_in_one_line():
    """A search config fixes values (env.reward_rank) that not every environment has; each
    pairing must build its first trial's engine or refuse in one line."""
    from src import data, experiment

    dataset, problems = None, []
    for search in sorted(path.stem for path in (config.CONFIG_DIR / "hparams_search").glob("*.yaml")):
        for env in sorted(path.stem for path in (config.CONFIG_DIR / "env").glob("*.yaml")):
            try:
                cfg = config.compose([f"hparams_search={search}", f"env={env}", "data=synthetic", "data.num_users=100", "training.loops=60"])
                config.check_run(cfg)
                dataset = dataset or data.load(cfg.data)
                experiment.assemble(cfg, dataset)
            except UserError as error:
                # Only what the pairing itself rules out: an agent that cannot act there, logs to name.
                if "\n" in str(error) or not any(reason in str(error) for reason in EXPECTED_REFUSALS):
                    problems.append(f"{search} x {env}: {error}")
            except Exception as error:  # noqa: BLE001 (what the battery looks for)
                problems.append(f"{search} x {env}: {type(error).__name__}: {error}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("command", [["src.train", "hydra.run.dir=/proc/forbidden"],
                                     ["src.compare", "--out", "/proc/forbidden"]])
def test_an_output_folder_that_cannot_be_written_is_one_line(command, tmp_path):
    done = subprocess.run([sys.executable, "-m", *command], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert f"{command[1].split('=')[0]}=/proc/forbidden cannot hold files" in done.stderr


def test_a_run_ended_failed_by_another_process_while_alive_finishes_without_the_tag(make_config, caplog):
    """Found by a hostile try: `src.runs reap --older-than 8s` ended a quiet live run, which then
    finished FINISHED still tagged as reaped."""
    from src import tracking

    cfg = make_config()
    experiment_id = tracking.connect(cfg.tracking.uri, cfg.tracking.experiment)
    with tracking.run(cfg, "alive", experiment_id, {}) as active:
        tracking.fail_run(active.info.run_id, "src.runs reap: no activity for 0 min")
    run = mlflow.MlflowClient().get_run(active.info.run_id)
    assert run.info.status == "FINISHED" and tracking.ENDED_BY_TAG not in run.data.tags
    assert "was ended FAILED by another process while it trained (src.runs reap" in caplog.text
