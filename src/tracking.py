"""MLflow run life cycle: where runs go, what each holds, and how a failure is recorded."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import os
import sqlite3
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from importlib.metadata import version
from pathlib import Path

import mlflow
import pandas as pd
from mlflow import environment_variables
from mlflow.entities import Metric, Param, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking.context import registry as context_registry
from omegaconf import DictConfig, OmegaConf

from src.errors import UserError, one_line
from src.metrics import rounded
from src.paths import PROJECT_ROOT

log = logging.getLogger(__name__)

DEFAULT_URI = f"sqlite:///{PROJECT_ROOT / 'mlflow.db'}"
PACKAGES = ("tensorflow", "tf-agents", "tensorflow-probability", "numpy", "mlflow", "hydra-core", "optuna")
BATCH = 1000  # MLflow accepts at most 1000 metrics per log_batch call
# What MLflow's UI shows as the experiment's description.
EXPERIMENT_DESCRIPTION = (
    "Contextual-bandit recommenders learning online on MovieLens 100K. Each training run is named "
    "agent·seed (·trial in a sweep; the long form is the tag bandits.long_name); a sweep is a parent "
    "run with its trials nested under it. Start with train/cumulative_regret and the run's regret.png; "
    "every metric is defined in the project's docs/metrics.md.")

# Marks runs that are not training runs (a comparison, an evaluation), which comparisons skip.
ROLE_TAG = "bandits.role"


def tracking_uri(configured: str | None) -> str:
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


# MLflow's own settings of its HTTP requests: a value it cannot read fails its first request
# with a traceback, after the run has started.
HTTP_SETTINGS = (environment_variables.MLFLOW_HTTP_REQUEST_MAX_RETRIES,
                 environment_variables.MLFLOW_HTTP_REQUEST_TIMEOUT,
                 environment_variables.MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR,
                 environment_variables.MLFLOW_HTTP_REQUEST_BACKOFF_JITTER)


def check_http_settings() -> None:
    """Refuse an MLflow HTTP setting of the wrong type (`MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR=0.5`:
    MLflow wants an integer) in one line, before any request."""
    for setting in HTTP_SETTINGS:
        try:
            setting.get()
        except ValueError as error:
            raise UserError(f"{error} (an environment variable read by MLflow)") from None


def connect(configured_uri: str | None, experiment: str, create: bool = True) -> str | None:
    """Point MLflow at the tracking store and return the id of `experiment`, made when missing
    if `create` (else None); an unreachable or refusing store is a one-line `UserError`.

    Done before any work starts, so an unreachable server costs seconds, not a run.
    """
    uri = tracking_uri(configured_uri)
    if not create:  # only reading: a store that is not there holds nothing to read
        check_store_exists(uri)
    check_sqlite_store(uri)
    mlflow.set_tracking_uri(uri)
    check_http_settings()
    unreachable = UserError(
        f"cannot reach the MLflow tracking server at {uri}: is it running? "
        f"(set tracking.uri=... or MLFLOW_TRACKING_URI)")
    retries = logging.getLogger("urllib3.connectionpool")
    retries.setLevel(logging.ERROR)  # one line of ours says it better than a warning per retry
    try:
        with first_use_in_turn(uri):
            found = mlflow.get_experiment_by_name(experiment)
        if found is not None or not create:
            return found and found.experiment_id
        try:
            return mlflow.create_experiment(experiment, artifact_location=artifact_location(uri, experiment),
                                            tags={"mlflow.note.content": EXPERIMENT_DESCRIPTION})
        except MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            return mlflow.get_experiment_by_name(experiment).experiment_id  # another worker made it just now
    except MlflowException as error:
        if is_unreachable(error):
            raise unreachable from None
        raise UserError(f"MLflow tracking store {uri} refused the request: {error.message}") from None
    except OSError:
        raise unreachable from None
    finally:
        retries.setLevel(logging.NOTSET)


def open_to_read(configured_uri: str | None) -> str:
    """Point MLflow at the tracking store a command only reads runs from; its URI. A SQLite store
    that is not there is refused (MLflow would create an empty one at a mistyped path), as one
    that is not a database or is damaged."""
    uri = tracking_uri(configured_uri)
    check_store_exists(uri)
    check_sqlite_store(uri)
    mlflow.set_tracking_uri(uri)
    return uri


def check_store_exists(uri: str) -> None:
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise UserError(f"no tracking store at {uri}: point the command at the store its runs are in "
                        f"(tracking.uri=, --tracking-uri or MLFLOW_TRACKING_URI)")


def check_sqlite_store(uri: str) -> None:
    """Refuse, in one line, a SQLite store that is not a database or fails SQLite's quick check:
    MLflow would answer with pages of traceback, or write on into damaged pages."""
    path = Path(uri.removeprefix("sqlite:///"))
    if not uri.startswith("sqlite:///") or not path.is_file() or path.stat().st_size == 0:
        return  # a new store MLflow creates
    try:
        with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as store:
            problems = [row[0] for row in store.execute("PRAGMA quick_check(1)")]
    except sqlite3.DatabaseError as error:
        if "not a database" in str(error):
            raise UserError(f"the MLflow store {path} is not a SQLite database: move it aside to start a new "
                            f"one, or set tracking.uri to another store") from None
        problems = [one_line(error)]  # pages too damaged for the check itself to read
    if problems != ["ok"]:
        raise UserError(f"the MLflow store {path} is damaged ({problems[0]}), so nothing is written into it: "
                        f"recover it with `sqlite3 {path} .recover | sqlite3 recovered.db`, or move it aside") \
            from None


@contextlib.contextmanager
def first_use_in_turn(uri: str):
    """MLflow creates and migrates a new SQLite store on its first use in a process, and
    processes starting together on a new store break each other's migrations: they take
    turns, holding a lock on the store's folder (a server store migrates once, itself)."""
    folder = Path(uri.removeprefix("sqlite:///")).parent
    if not uri.startswith("sqlite:///") or not folder.is_dir():
        yield  # a missing folder is reported by MLflow itself
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


def is_unreachable(error: BaseException) -> bool:
    """Whether `error` (or one it arose from) is the tracking server not answering, after
    MLflow's own retries (`MLFLOW_HTTP_REQUEST_MAX_RETRIES`; see `src/__init__`)."""
    while error is not None:
        if isinstance(error, MlflowException) and "Max retries exceeded" in error.message:
            return True
        error = error.__cause__ or error.__context__
    return False


def why_unreachable(error: BaseException) -> str:
    """What MLflow's retries met, in words: a server that answers 503 is up, but what it stores
    in (PostgreSQL) is not."""
    text = str(error)
    if "503" in text:
        return "it answered 503 Service Unavailable: the server runs, its backend store (PostgreSQL) does not answer it"
    if any(code in text for code in ("500", "502", "504")):
        return f"it answered with server errors: {one_line(error)}"
    return "no connection: refused or timed out"


# How long urllib3 sleeps between retries at most (`Retry.DEFAULT_BACKOFF_MAX`).
LONGEST_BACKOFF_S = 120


def be_patient(patience_s: float) -> None:
    """Let MLflow's retries of a request ride out a tracking server's outage of `patience_s`
    (the fail-fast default, src/__init__, suits a single command, not a campaign's worker):
    enough retries for their backoffs (urllib3: none, then 2f, 4f, ... s) to add up to it."""
    factor = environment_variables.MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.get()
    if factor <= 0:
        return  # no backoff asked for: the request timeouts alone set the pace
    retries, waited = 0, 0.0
    while waited < patience_s:
        retries += 1
        waited += 0 if retries == 1 else min(LONGEST_BACKOFF_S, factor * 2 ** (retries - 1))
    configured = environment_variables.MLFLOW_HTTP_REQUEST_MAX_RETRIES.get()
    os.environ[environment_variables.MLFLOW_HTTP_REQUEST_MAX_RETRIES.name] = str(max(configured, retries))


def artifact_location(uri: str, experiment: str) -> str | None:
    """A SQLite store keeps its artifacts beside it in `mlruns/<experiment>`, whatever the
    cwd (MLflow's own default is the cwd's `mlruns/`); a server decides for itself."""
    if uri.startswith("sqlite:///"):
        database = Path(uri.removeprefix("sqlite:///")).resolve()
        return (database.parent / "mlruns" / experiment).as_uri()
    return None


# Logged beside a run's config: how its draws derive from its seed (src/seeding.py). Runs
# logged without it drew from `tf.random.Generator.from_seed`, shifted copies of one stream.
STREAMS_PARAM, STREAMS = "training.streams", "keyed"
ENDED_BY_TAG = "bandits.ended_by"  # who ended a run its own process could not, and why


def flatten(cfg: DictConfig) -> dict[str, str]:
    """Dotted keys for every leaf of the resolved config, as MLflow params."""
    flat = pd.json_normalize(OmegaConf.to_container(cfg, resolve=True), sep=".").iloc[0].to_dict()
    return {key: str(value) for key, value in flat.items()}


def run_params(cfg: DictConfig) -> dict[str, str]:
    """What a training run logs as its params: its config, and how its draws derive from its seed."""
    return {**flatten(cfg), STREAMS_PARAM: STREAMS}


def fail_run(run_id: str, reason: str) -> None:
    """End FAILED a run its process cannot end (it died), tagged with why (`bandits.ended_by`)."""
    client = mlflow.MlflowClient()
    client.set_tag(run_id, ENDED_BY_TAG, reason)
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))


class RunStopped(Exception):
    """Raised to stop a run on purpose before its end (a sweep's pruner): KILLED, not FAILED."""


@contextlib.contextmanager
def run(cfg: DictConfig, run_name: str, experiment_id: str, extra_tags: dict[str, str]):
    """An MLflow run holding the config; FAILED if the body raises, KILLED on Ctrl-C or when
    stopped on purpose (`RunStopped`)."""
    # MLflow adds the source's git commit, branch and repository itself (mlflow.source.git.*).
    tags = {**extra_tags, **version_tags()}
    sampling = cfg.tracking.system_metrics_every_s
    if sampling:
        mlflow.set_system_metrics_sampling_interval(sampling)
        # Its start and stop lines, and a line saying there is no GPU, tell a user nothing.
        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    active = mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags,
                              log_system_metrics=bool(sampling))
    log.info("MLflow run %s (%s) in %s", run_name, active.info.run_id, mlflow.get_tracking_uri())
    try:
        mlflow.log_params(run_params(cfg))
        try:  # the artifact store's first write, before any training it could lose
            mlflow.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
        except (OSError, MlflowException) as error:
            raise UserError(f"cannot write to the artifact store {mlflow.get_artifact_uri()}: "
                            f"{one_line(error)}") from None
        yield active
    except KeyboardInterrupt:
        mlflow.end_run(RunStatus.to_string(RunStatus.KILLED))
        log.warning("Interrupted: run %s marked KILLED", active.info.run_id)
        raise
    except RunStopped as stop:
        mlflow.end_run(RunStatus.to_string(RunStatus.KILLED))
        log.info("Run %s stopped early and marked KILLED: %s", active.info.run_id, stop)
        raise
    except BaseException:
        mlflow.end_run(RunStatus.to_string(RunStatus.FAILED))
        log.warning("Run %s marked FAILED", active.info.run_id)
        raise
    else:
        finished_alive(active.info.run_id)
        mlflow.end_run()
        log.info("Run %s finished: %s", run_name, where_to_see(active.info.run_id, experiment_id))


def finished_alive(run_id: str) -> None:
    """A run about to end FINISHED that another process ended FAILED meanwhile (`src.runs reap` on
    a run quiet for longer than asked, a sweep's recovery on a late heartbeat) was alive after all:
    the tag saying it died goes, with a warning, or the run would say FINISHED and dead at once."""
    client = mlflow.MlflowClient()
    ended_by = client.get_run(run_id).data.tags.get(ENDED_BY_TAG)
    if ended_by is not None:
        client.delete_tag(run_id, ENDED_BY_TAG)
        log.warning("Run %s was ended FAILED by another process while it trained (%s); it ends FINISHED", run_id,
                    ended_by)


def version_tags() -> dict[str, str]:
    return {f"version.{name}": version(name) for name in PACKAGES}


@contextlib.contextmanager
def group_runs(cfgs: list[DictConfig], run_names: list[str], experiment_id: str, tags: list[dict[str, str]]):
    """A run per config of a group trained together (src.replicas), each holding its config, as
    `run` makes one; yields their ids. A run still RUNNING when the body raises is marked as
    `run` would mark it; each is finished where its artifacts are logged (`finishing`). Without
    system metrics: the machine's use is the group's, not a run's."""
    client = mlflow.MlflowClient()
    ids = []
    try:
        for cfg, name, extra in zip(cfgs, run_names, tags):
            # What `mlflow.start_run` adds itself: the source, its git commit, the user.
            run_tags = context_registry.resolve_tags({**extra, **version_tags()})
            run_id = client.create_run(experiment_id, run_name=name, tags=run_tags).info.run_id
            ids.append(run_id)
            params = [Param(key, value) for key, value in run_params(cfg).items()]
            for start in range(0, len(params), 100):  # MLflow takes at most 100 params a call
                client.log_batch(run_id, params=params[start:start + 100], synchronous=True)
            try:
                client.log_text(run_id, OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
            except (OSError, MlflowException) as error:
                raise UserError(f"cannot write to the artifact store of run {run_id}: {one_line(error)}") from None
        log.info("MLflow runs %s in %s", ", ".join(run_names), mlflow.get_tracking_uri())
        yield ids
    except BaseException as error:
        status = RunStatus.to_string(
            RunStatus.KILLED if isinstance(error, (KeyboardInterrupt, RunStopped)) else RunStatus.FAILED)
        running = [run_id for run_id in ids if client.get_run(run_id).info.status == "RUNNING"]
        for run_id in running:
            client.set_terminated(run_id, status)
        if running:
            log.warning("%d run(s) of the group marked %s: %s", len(running), status, ", ".join(running))
        raise


@contextlib.contextmanager
def finishing(run_id: str, run_name: str, experiment_id: str):
    """Run `run_id` of `group_runs` as the active run, FINISHED when the body ends (FAILED if it raises)."""
    with mlflow.start_run(run_id=run_id):
        yield
        finished_alive(run_id)
    log.info("Run %s finished: %s", run_name, where_to_see(run_id, experiment_id))


def where_to_see(run_id: str, experiment_id: str) -> str:
    """The run's page on a tracking server, or the command that serves a SQLite store's UI."""
    uri = mlflow.get_tracking_uri()
    if uri.startswith("http"):
        return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"run {run_id}; to see it: uv run mlflow ui --backend-store-uri {uri}"


def log_dataset(name: str, ratings: pd.DataFrame, source: str) -> None:
    """The ratings the active run learns from, as its training input: MLflow records their name,
    a digest of their content, their schema and size, and where they were read from (a URL or a
    file:// URI)."""
    mlflow.log_input(as_dataset(ratings, name, source), context="training")


def as_dataset(frame: pd.DataFrame, name: str, source: str | None = None, targets: str | None = None):
    """`frame` as an MLflow dataset, its digest and schema computed here, where MLflow's
    warnings about them are silenced."""
    with warnings.catch_warnings():
        # MLflow registers two equivalent sources for local files and says so; its advice on
        # integer columns concerns serving inputs that may lack values, not complete training
        # data; and its digest code calls pandas in a way pandas 4 will refuse.
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
        warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer")
        warnings.filterwarnings("ignore", message="Starting with pandas version 4.0")
        dataset = mlflow.data.from_pandas(frame, source=source, name=name, targets=targets)
        if not all(pd.api.types.is_numeric_dtype(dtype) for dtype in frame.dtypes):
            dataset.schema  # noqa: B018  (inferred once, lazily, and here its warning is silenced)
            return dataset
        # MLflow tests every value for a missing one in Python (0.25 s for 100,000 ratings, a
        # fifth of a quick run). Numeric columns' schema is their types and whether any value is
        # missing, which pandas answers at once.
        key = (tuple(frame.dtypes.astype(str).items()), tuple(frame.isna().any()))
        if key not in _numeric_schemas:
            _numeric_schemas[key] = dataset.schema
        dataset.__dict__["schema"] = _numeric_schemas[key]  # where MLflow's cached_property keeps it
    return dataset


_numeric_schemas: dict[tuple, object] = {}


def log_history(run_id: str, frame: pd.DataFrame, step_column: str = "step") -> None:
    """Log every column of `frame` but the step as metric histories, rounded (`metrics.rounded`),
    1,000 values a call."""
    client = mlflow.MlflowClient()
    timestamp = int(pd.Timestamp.now().timestamp() * 1000)
    metrics = [
        Metric(key, rounded(value), timestamp, int(step))
        for key in frame.columns.drop(step_column)
        for step, value in zip(frame[step_column], frame[key])
    ]
    for start in range(0, len(metrics), BATCH):
        client.log_batch(run_id, metrics=metrics[start:start + BATCH], synchronous=True)


class HistoryLogger:
    """Logs metric histories from a background thread, so training goes on while the store
    writes (a SQLite commit, an HTTP round trip): on 2 cores, waiting for each write cost
    LinUCB a quarter of its speed. One write is in flight at a time, and a write starts at most
    every `every_s` seconds; rows that come meanwhile wait and go together in the next. Each
    write costs Python time the training thread then waits for (the GIL): writing after every
    chunk kept epsilon-greedy at 0.69 of its untracked speed. A failed write
    raises the store's own exception at the next write or at the end. The last rows are always
    written, even when the run stops for another reason, so nothing already logged is lost."""

    def __init__(self, run_id: str, every_s: float = 1.0, writer: ThreadPoolExecutor | None = None):
        """`writer`: a one-thread executor shared by the loggers of a group's runs (src.replicas), so
        that one write at a time reaches the store whatever their number (MLflow's SQL store holds
        15 connections); None: one of its own."""
        self.run_id = run_id
        self.every_s = every_s
        self._own_writer = writer is None
        self._writer = writer or history_writer()
        self._in_flight: Future | None = None
        self._waiting: list[pd.DataFrame] = []
        self._last_write = -math.inf

    def log(self, frame: pd.DataFrame) -> None:
        self._waiting.append(frame)
        idle = self._in_flight is None or self._in_flight.done()
        if idle and time.monotonic() - self._last_write >= self.every_s:
            self._write_waiting()

    def wait(self) -> None:
        """Write every row logged so far, and wait until it is written."""
        self._write_waiting()  # the rows still waiting go out once the write in flight is done,
        self._write_waiting()  # and are waited for

    def _write_waiting(self) -> None:
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is not None:
            in_flight.result()
        if self._waiting:
            rows, self._waiting = pd.concat(self._waiting, ignore_index=True), []
            self._in_flight = self._writer.submit(log_history, self.run_id, rows)
            self._last_write = time.monotonic()

    def __enter__(self) -> HistoryLogger:
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        try:
            if error_type is None:
                self.wait()
            else:
                with contextlib.suppress(Exception):  # the error already stopping the run says more
                    self.wait()
        finally:
            if self._own_writer:
                self._writer.shutdown()


def history_writer() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="metric-history")
