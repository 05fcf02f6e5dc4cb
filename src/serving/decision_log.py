"""The durable decision log: every decision the service makes and the reward that came back for
it, joined into the interactions format off-policy evaluation and retraining read
(`src.evaluation.interactions`).

One SQLAlchemy Core code path serves SQLite (WAL, `synchronous=FULL`: a commit is on disk when
it returns) and PostgreSQL. Writes go through one writer thread that commits whatever has
queued up in one transaction (group commit): a commit costs an fsync, 2-5 ms on the disks
measured here, so one commit per request would cap the log near 300 writes/s; every caller
still returns only once its own write is committed.

Where the log lives (`default_url`): with a tracking server and `OPTUNA_STORAGE` on PostgreSQL
(`./stack.sh up`), the database `decisions` beside them, created when missing; otherwise
`decisions.db` beside the SQLite tracking store.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import math
import os
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sqlalchemy import (BigInteger, Column, Float, ForeignKey, Integer, LargeBinary, MetaData, String, Table, Text,
                        create_engine, event, func, insert, inspect, select)
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import (ArgumentError, DBAPIError, IntegrityError, OperationalError, ProgrammingError,
                            SQLAlchemyError)

from src import tracking
from src.errors import UserError, one_line

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
DATABASE = "decisions"  # on the stack's PostgreSQL, beside `optuna` and `mlflow`
FILE = "decisions.db"  # beside a SQLite tracking store
CONTEXT_PREFIX = "context_"  # src.evaluation.interactions.CONTEXT_PREFIX, without importing TensorFlow
# How long a SQLite writer waits on another process's write before failing.
BUSY_TIMEOUT_MS = 30_000

metadata = MetaData()
schema_version = Table("schema_version", metadata, Column("version", Integer, nullable=False))
decisions = Table(
    "decisions", metadata,
    Column("decision_id", String(64), primary_key=True),
    Column("user_id", BigInteger),  # NULL: the request sent raw features
    Column("context", LargeBinary, nullable=False),  # float32 bytes
    Column("action", Integer, nullable=False),
    Column("movie_id", BigInteger, nullable=False),
    Column("propensity", Float(53)),  # NULL: unknown (SQLite cannot store NaN)
    Column("model_uri", Text, nullable=False),
    Column("model_version", Text, nullable=False),
    Column("decided_at", Float(53), nullable=False, index=True),
    Column("slate", Text),  # "3,1,4": catalogue columns served, best first; NULL for one movie
)
feedback = Table(
    "feedback", metadata,
    Column("decision_id", String(64), ForeignKey("decisions.decision_id"), primary_key=True),
    Column("reward", Float(53), nullable=False),
    Column("rewarded_at", Float(53), nullable=False),
)


class UnknownDecision(UserError):
    """Feedback for a decision id the log never saw."""


@dataclass(frozen=True)
class Decision:
    decision_id: str  # uuid4 hex, made by the service
    user_id: int | None  # MovieLens user id, None when the request sent raw features
    context: np.ndarray  # float32 [k] the features the policy saw
    action: int  # the column of the catalogue served (the first of a slate)
    movie_id: int
    propensity: float  # probability the serving policy (with its exploration) gave `action`; NaN: unknown
    model_uri: str  # e.g. models:/name@champion as configured
    model_version: str  # the registry version (or run id) that decided
    decided_at: float  # epoch seconds
    slate: tuple[int, ...] | None = None  # catalogue columns served, best first, for k > 1


@dataclass(frozen=True)
class _Feedback:
    decision_id: str
    reward: float
    rewarded_at: float


_CLOSE = object()


class DecisionLog:
    """Decisions and their rewards in a SQLite file or a PostgreSQL database (`url`); safe to
    share between threads."""

    def __init__(self, url: str):
        self.url = _normalised(url)
        self.shown = self.url.render_as_string(hide_password=True)
        self._engine = _open(self.url, self.shown)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self._closing = threading.Lock()  # nothing may queue behind the writer's last batch
        self._writer = threading.Thread(target=self._write_forever, name="decision-log-writer", daemon=True)
        self._writer.start()

    def record_decision(self, decision: Decision) -> None:
        """Store `decision`; committed before it returns."""
        self.submit_decision(decision).result()

    def record_feedback(self, decision_id: str, reward: float) -> bool:
        """Store the reward for `decision_id`; committed before it returns. False for a duplicate
        (the first reward is kept); `UnknownDecision` for an id the log never saw."""
        return self.submit_feedback(decision_id, reward).result()

    def submit_decision(self, decision: Decision) -> Future:
        """`record_decision` without waiting: the future resolves once the decision is committed."""
        return self._submit(decision)

    def submit_feedback(self, decision_id: str, reward: float) -> Future:
        """`record_feedback` without waiting: the future resolves to its answer once committed."""
        return self._submit(_Feedback(decision_id, float(reward), time.time()))

    def joined(self, since: float | None = None, until: float | None = None,
               model_name: str | None = None) -> pd.DataFrame:
        """Decisions made in [since, until) that have feedback, oldest first, in the interactions
        format (`src.evaluation.interactions`) plus model_version, decided_at, rewarded_at and
        decision_id; with `model_name`, only those a version of that registered model served
        (`models:/<name>@<alias>` or `models:/<name>/<version>`: a log may hold several models').
        Contexts shorter than the longest (another model's) are padded with NaN."""
        query = (select(decisions, feedback.c.reward, feedback.c.rewarded_at)
                 .join(feedback, feedback.c.decision_id == decisions.c.decision_id)
                 .order_by(decisions.c.decided_at, decisions.c.decision_id))
        if model_name is not None:
            query = query.where(decisions.c.model_uri.startswith(f"models:/{model_name}@", autoescape=True)
                                | decisions.c.model_uri.startswith(f"models:/{model_name}/", autoescape=True))
        if since is not None:
            query = query.where(decisions.c.decided_at >= since)
        if until is not None:
            query = query.where(decisions.c.decided_at < until)
        with self._reading() as connection:
            rows = connection.execute(query).mappings().all()
        return _interactions(rows)

    def counts(self) -> dict[str, int]:
        with self._reading() as connection:
            return {"decisions": connection.execute(select(func.count()).select_from(decisions)).scalar_one(),
                    "feedback": connection.execute(select(func.count()).select_from(feedback)).scalar_one()}

    def close(self) -> None:
        """Commit what is queued, then let go of the database."""
        with self._closing:
            if self._closed:
                return
            self._closed = True
            self._queue.put((_CLOSE, None))
        self._writer.join()
        self._engine.dispose()

    @contextlib.contextmanager
    def _reading(self):
        try:
            with self._engine.connect() as connection:
                yield connection
        except SQLAlchemyError as error:
            raise UserError(f"cannot read the decision log {self.shown}: {_reason(error, self.url)}") from None

    def _submit(self, item) -> Future:
        done: Future = Future()
        with self._closing:
            if self._closed:
                raise RuntimeError("the decision log is closed")
            self._queue.put((item, done))
        return done

    def _write_forever(self) -> None:
        while True:
            batch = [self._queue.get()]
            while True:  # everything queued meanwhile goes into the same commit
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            closing = any(item is _CLOSE for item, _ in batch)
            self._commit([(item, done) for item, done in batch if item is not _CLOSE])
            if closing:
                return

    def _commit(self, batch: list) -> None:
        if not batch:
            return
        try:
            with self._engine.connect().execution_options(immediate=True) as connection, connection.begin():
                answers = [self._apply(connection, item) for item, _ in batch]
        except IntegrityError:
            if len(batch) > 1:  # one bad write (another process's duplicate id) must not fail the others
                for one in batch:
                    self._commit([one])
                return
            answers = [_taken(batch[0][0])]
        except Exception as error:  # the database is away (or a bug): every write of the batch failed
            answers = [self._failure(error)] * len(batch)
        for (_, done), answer in zip(batch, answers):
            if isinstance(answer, Exception):
                done.set_exception(answer)
            else:
                done.set_result(answer)

    @staticmethod
    def _apply(connection: Connection, item):
        if isinstance(item, Decision):
            connection.execute(insert(decisions).values(_row(item)))
            return None
        id_is = feedback.c.decision_id == item.decision_id
        if connection.execute(select(feedback.c.decision_id).where(id_is)).first() is not None:
            return False
        if connection.execute(select(decisions.c.decision_id)
                              .where(decisions.c.decision_id == item.decision_id)).first() is None:
            return UnknownDecision(f"no decision {item.decision_id!r} in the decision log")
        connection.execute(insert(feedback).values(decision_id=item.decision_id, reward=item.reward,
                                                   rewarded_at=item.rewarded_at))
        return True

    def _failure(self, error: Exception) -> Exception:
        if not isinstance(error, SQLAlchemyError):
            return error  # a bug: its traceback goes to the caller
        reason = _reason(error, self.url)
        log.error("the decision log %s failed a write: %s", self.shown, reason)
        return UserError(f"the decision log {self.shown} failed: {reason}")


def _taken(item: Decision | _Feedback) -> UserError | bool:
    """The answer to a write that found its key taken: by another process's decision of the same
    id, or by feedback another process recorded between our check and our insert (a duplicate)."""
    if isinstance(item, _Feedback):
        return False
    return UserError(f"decision {item.decision_id!r} is already in the decision log")


@contextlib.contextmanager
def round_lock(url: str, model_name: str):
    """Held while a retraining round of `model_name` reads this log and registers its verdict:
    two rounds at once would read the same window and could both promote. On PostgreSQL an
    advisory lock of the round's own connection, on SQLite a byte-range lock on `<log>-rounds`
    beside it: either is released when the round ends or its process dies, so no stale lock
    outlives a killed round."""
    parsed = _normalised(url)
    key = int.from_bytes(hashlib.sha256(model_name.encode()).digest()[:7], "big")  # < 2^63: a bigint
    busy = UserError(f"another retraining round of {model_name!r} is running on the decision log "
                     f"{parsed.render_as_string(hide_password=True)}: rounds of one model run one at a time")
    if parsed.get_backend_name() == "postgresql":
        engine = create_engine(parsed)
        try:
            try:
                connection = engine.connect()
            except OperationalError as error:
                raise UserError(f"cannot reach the decision log {parsed.render_as_string(hide_password=True)}: "
                                f"{one_line(error.orig or error)}") from None
            with connection:
                if not connection.execute(select(func.pg_try_advisory_lock(key))).scalar():
                    raise busy
                yield
        finally:
            engine.dispose()
        return
    with open(f"{parsed.database}-rounds", "a+b") as lock_file:
        try:
            fcntl.lockf(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, key % 2**31)
        except BlockingIOError:
            raise busy from None
        yield


def default_url(tracking_uri: str, environ=os.environ) -> str:
    """Where the decision log lives when `serve.decision_log` is null: the database `decisions`
    on the stack's PostgreSQL when the tracking store is a server and OPTUNA_STORAGE names a
    PostgreSQL database (`./stack.sh up` exports both), else `decisions.db` beside the SQLite
    tracking store (beside the default one, mlflow.db at the project root, for a server)."""
    storage = environ.get("OPTUNA_STORAGE", "")
    if tracking_uri.startswith(("http://", "https://")) and storage.startswith("postgresql"):
        return make_url(storage).set(database=DATABASE).render_as_string(hide_password=False)
    store = tracking_uri if tracking_uri.startswith("sqlite:///") else tracking.DEFAULT_URI
    return f"sqlite:///{Path(store.removeprefix('sqlite:///')).parent / FILE}"


def _normalised(url: str) -> URL:
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise UserError(f"the decision log must be a sqlite:///<file> or postgresql://... URL, got {url!r}") from None
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise UserError(f"the decision log must be SQLite or PostgreSQL, got {parsed.get_backend_name()!r} "
                        f"({parsed.render_as_string(hide_password=True)})")
    if parsed.drivername == "postgresql":
        return parsed.set(drivername="postgresql+psycopg")  # the driver installed here
    if parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:"):
        raise UserError("the decision log must be a file (sqlite:///<path>): in memory it would not survive a restart")
    return parsed


def _open(url: URL, shown: str) -> Engine:
    """An engine on `url` whose tables exist and are of this SCHEMA_VERSION."""
    sqlite = url.get_backend_name() == "sqlite"
    if sqlite and not Path(url.database).expanduser().parent.is_dir():
        raise UserError(f"the decision log's folder {Path(url.database).parent} does not exist ({shown})")
    engine = create_engine(url, pool_pre_ping=not sqlite)
    if sqlite:
        _durable_sqlite(engine)
    try:
        try:
            _ensure_schema(engine, shown)
        except OperationalError as error:
            if sqlite or "does not exist" not in str(error.orig):
                raise
            _create_database(url, shown)
            _ensure_schema(engine, shown)
    except DBAPIError as error:
        engine.dispose()
        raise UserError(f"cannot open the decision log {shown}: {_reason(error, url)}") from None
    except UserError:
        engine.dispose()
        raise
    return engine


def _durable_sqlite(engine: Engine) -> None:
    """WAL with a full sync on commit, and transactions SQLAlchemy begins itself: Python's driver
    would defer BEGIN to the first write, after the writer's reads. The writer begins IMMEDIATE,
    taking the write lock before it reads, so another process cannot slip in between."""

    @event.listens_for(engine, "connect")
    def configure(connection, _record):
        connection.isolation_level = None
        for pragma in ("journal_mode=WAL", "synchronous=FULL", "foreign_keys=ON",
                       f"busy_timeout={BUSY_TIMEOUT_MS}"):
            connection.execute(f"PRAGMA {pragma}")

    @event.listens_for(engine, "begin")
    def begin(connection):
        immediate = connection.get_execution_options().get("immediate")
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def _ensure_schema(engine: Engine, shown: str) -> None:
    """Refuse a log of another schema version."""
    try:
        found = _schema_version(engine, shown)
    except (IntegrityError, ProgrammingError):  # another process created the tables at the same moment
        found = _schema_version(engine, shown)
    if found != SCHEMA_VERSION:
        raise UserError(f"the decision log {shown} has schema version {found}; this code reads version "
                        f"{SCHEMA_VERSION}: serve with the code that wrote it, or start a new log "
                        f"(serve.decision_log=...)")


def _schema_version(engine: Engine, shown: str) -> int:
    """The log's schema version, after creating the tables in an empty database; refuses a
    database that holds other tables (someone else's)."""
    with engine.begin() as connection:
        names = set(inspect(connection).get_table_names())
        if "schema_version" in names:
            return connection.execute(select(schema_version.c.version)).scalar()
        if names:
            raise UserError(f"{shown} holds other tables ({', '.join(sorted(names)[:5])}) and no decision log; "
                            f"point serve.decision_log at a database of its own")
        metadata.create_all(connection)
        connection.execute(insert(schema_version).values(version=SCHEMA_VERSION))
        return SCHEMA_VERSION


def _create_database(url: URL, shown: str) -> None:
    """CREATE DATABASE on the same server, from its maintenance database `postgres`."""
    import psycopg
    from psycopg import sql

    try:
        with psycopg.connect(host=url.host, port=url.port, user=url.username, password=url.password,
                             dbname="postgres", autocommit=True, connect_timeout=10) as connection:
            connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(url.database)))
    except psycopg.errors.DuplicateDatabase:
        return  # another process created it just now
    except psycopg.Error as error:
        raise UserError(f"the decision log's database {url.database} does not exist and creating it failed "
                        f"({shown}): {_reason(error, url)}") from None
    log.info("created the database %s for the decision log", url.database)


def _reason(error: Exception, url: URL) -> str:
    """The driver's first line, without the password should a driver ever echo it."""
    text = one_line(getattr(error, "orig", None) or error)
    return text.replace(url.password, "***") if url.password else text


def _row(decision: Decision) -> dict:
    propensity = float(decision.propensity)
    return {
        "decision_id": decision.decision_id,
        "user_id": None if decision.user_id is None else int(decision.user_id),
        "context": np.asarray(decision.context, np.float32).tobytes(),
        "action": int(decision.action),
        "movie_id": int(decision.movie_id),
        "propensity": None if math.isnan(propensity) else propensity,
        "model_uri": decision.model_uri,
        "model_version": str(decision.model_version),
        "decided_at": float(decision.decided_at),
        "slate": None if decision.slate is None else ",".join(str(int(column)) for column in decision.slate),
    }


def _interactions(rows) -> pd.DataFrame:
    contexts = [np.frombuffer(row["context"], np.float32) for row in rows]
    width = max((len(context) for context in contexts), default=0)
    features = np.full((len(rows), width), np.nan, np.float32)
    for i, context in enumerate(contexts):
        features[i, :len(context)] = context
    return pd.DataFrame({
        "round": np.arange(len(rows), dtype=np.int64),
        "user_id": pd.array([row["user_id"] for row in rows], dtype="Int64"),
        **{f"{CONTEXT_PREFIX}{i}": features[:, i] for i in range(width)},
        "action": np.array([row["action"] for row in rows], np.int64),
        "movie_id": np.array([row["movie_id"] for row in rows], np.int64),
        "propensity": np.array([np.nan if row["propensity"] is None else row["propensity"] for row in rows],
                               np.float64),
        "reward": np.array([row["reward"] for row in rows], np.float64),
        "model_version": pd.array([row["model_version"] for row in rows], dtype=object),
        "decided_at": np.array([row["decided_at"] for row in rows], np.float64),
        "rewarded_at": np.array([row["rewarded_at"] for row in rows], np.float64),
        "decision_id": pd.array([row["decision_id"] for row in rows], dtype=object),
    })
