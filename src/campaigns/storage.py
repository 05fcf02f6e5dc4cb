"""The study's storage: Optuna's RDB storage, patient with a database that restarts, and
every failure to reach it one line naming it (without its password)."""

from __future__ import annotations

import contextlib
import functools
import logging
import random
import time
from collections.abc import Iterator

import optuna
import sqlalchemy
from omegaconf import DictConfig

from src.campaigns.repair import RetryDeadWorkersTrial
from src.errors import UserError, one_line

log = logging.getLogger(__name__)

# How often a worker with nothing to do looks again, and fails trials whose worker died.
POLL_SECONDS = 2.0
# Tries to open a storage whose tables another worker may be creating at the same moment.
SCHEMA_ATTEMPTS = 5
# Every call that reaches the database: Optuna's storage API and what its cache and heartbeat call.
DATABASE_CALLS = [*vars(optuna.storages.BaseStorage), "_create_new_trial", "_set_trial_param", "_get_best_trial_id",
                  "_get_trials", "_get_stale_trial_ids"]


class StorageLost(UserError):
    """The study's database stopped answering for longer than `sweep.storage_patience_s`:
    the worker stops; a worker started when it is back fails and reruns the trial."""


def storage_url(cfg: DictConfig) -> str:
    url = str(cfg.hydra.sweeper.storage or "")
    if not url:
        raise UserError("hydra.sweeper.storage is empty: a sweep needs a storage to share and resume")
    # The PostgreSQL driver installed here is psycopg 3; SQLAlchemy's plain scheme means psycopg2.
    return url.replace("postgresql://", "postgresql+psycopg://", 1)


def shown_storage(cfg: DictConfig) -> str:
    """The storage URL for messages and tags: its password stays out of logs."""
    return sqlalchemy.engine.make_url(storage_url(cfg)).render_as_string(hide_password=True)


@contextlib.contextmanager
def reaching_storage(cfg: DictConfig) -> Iterator[None]:
    """Whatever fails to reach the storage inside, as one line naming it (SQLAlchemy reports an
    unreachable database in many types); a `UserError` says more, and passes as it is."""
    try:
        yield
    except UserError:
        raise
    except Exception as error:
        raise UserError(f"cannot open Optuna storage {shown_storage(cfg)}: {one_line(error)}") from None


def _patiently(method):
    @functools.wraps(method)
    def call(storage: PatientStorage, *args, **kwargs):
        deadline = None
        while storage.lost is None:
            try:
                result = method(storage, *args, **kwargs)
            except Exception as error:  # Optuna wraps SQLAlchemy's errors in its own
                cause = connection_error(error)
                if cause is None:
                    raise
                if deadline is None:
                    deadline = time.monotonic() + storage.patience_s
                    log.warning("The Optuna storage %s does not answer (%s); trying again for %.0f s",
                                storage.shown_url, cause, storage.patience_s)
                if time.monotonic() < deadline:
                    time.sleep(POLL_SECONDS)
                    continue
                storage.lost = StorageLost(f"the Optuna storage {storage.shown_url} stopped answering for "
                                           f"{storage.patience_s:.0f} s ({cause}); a worker started when it is "
                                           f"back fails the interrupted trial and runs it again")
            else:
                if deadline is not None:
                    log.info("The Optuna storage %s answers again", storage.shown_url)
                return result
        raise storage.lost

    return call


def _patient(cls: type[optuna.storages.RDBStorage]) -> type[optuna.storages.RDBStorage]:
    """`cls` with each of its `DATABASE_CALLS` made `_patiently`."""
    for name in DATABASE_CALLS:
        if not name.startswith("__") and callable(getattr(optuna.storages.RDBStorage, name, None)):
            setattr(cls, name, _patiently(getattr(cls, name)))
    return cls


@_patient
class PatientStorage(optuna.storages.RDBStorage):
    """Optuna's RDB storage, waiting out a database that restarts: every call that loses its
    connection is tried again for `patience_s`, then raises `StorageLost` (at once, from then on)."""

    def __init__(self, url: str, shown_url: str, patience_s: float, **kwargs):
        self.shown_url, self.patience_s, self.lost = shown_url, patience_s, None
        super().__init__(url, **kwargs)

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            _patiently(optuna.storages.RDBStorage.record_heartbeat)(self, trial_id)
        except StorageLost:
            pass  # Optuna's heartbeat thread has no handler; the worker's own next call reports it


def connection_error(error: BaseException) -> str | None:
    """The first line of the lost or refused connection behind `error`, if that is its cause."""
    cause = in_chain(error, sqlalchemy.exc.OperationalError)
    return None if cause is None else one_line(cause.orig or cause)


def in_chain(error: BaseException | None, kind: type[BaseException]) -> BaseException | None:
    """`error`, or the first error it arose from, that is a `kind`; None if there is none."""
    while error is not None and not isinstance(error, kind):
        error = error.__cause__ or error.__context__
    return error


def open_storage(cfg: DictConfig) -> PatientStorage:
    """The study's storage, with a heartbeat per running trial: a trial whose worker stops
    beating for `sweep.grace_s` is failed, its MLflow run too, and it is queued again."""
    campaign, url = cfg.sweep, storage_url(cfg)
    for attempt in range(1, SCHEMA_ATTEMPTS + 1):
        with reaching_storage(cfg):
            try:
                return PatientStorage(
                    url, shown_storage(cfg), campaign.storage_patience_s,
                    heartbeat_interval=campaign.heartbeat_s, grace_period=campaign.grace_s,
                    heartbeat_stale_trial_callback=RetryDeadWorkersTrial(campaign.max_retries,
                                                                         cfg.tracking.experiment),
                    engine_kwargs={"pool_pre_ping": True} if not url.startswith("sqlite") else None)
            except ImportError as error:
                raise UserError(f"Optuna storage {shown_storage(cfg)} needs a driver that is not installed: "
                                f"{error}") from None
            except Exception as error:
                # Workers starting together on a new database all create Optuna's tables; those
                # that lose the race find them made a moment later.
                if attempt < SCHEMA_ATTEMPTS and is_schema_race(error):
                    log.info("Optuna's tables were being created by another worker; opening the storage again")
                    time.sleep(random.uniform(0.2, 1.0))
                    continue
                raise


def is_schema_race(error: Exception) -> bool:
    return isinstance(error, sqlalchemy.exc.IntegrityError) or "already exists" in str(error)
