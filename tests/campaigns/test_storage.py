"""The study's storage: unreachable, refusing the password, or new to the workers that open it
together, always one line before any trial."""

from __future__ import annotations

import concurrent.futures
import re
import threading
import uuid

import optuna
import pytest
import sqlalchemy
from omegaconf import OmegaConf

from src.campaigns.storage import open_storage
from src.campaigns.study import prepare
from src.campaigns.worker import work
from src.errors import UserError
from tests.campaigns.conftest import compose, overrides_for


def test_unreachable_storage_is_refused_before_any_trial(data_overrides, tmp_path):
    cfg = compose(data_overrides, tmp_path, f"hydra.sweeper.storage=sqlite:///{tmp_path}/missing/dir/optuna.db")
    with pytest.raises(UserError, match="cannot open Optuna storage"):
        prepare(cfg)


def test_an_unreachable_database_is_one_line_before_any_trial(data_overrides, tmp_path):
    url = "postgresql://nobody:secret@127.0.0.1:1/optuna"  # the plain scheme works too
    overrides = overrides_for(data_overrides, "unreachable", url, f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(UserError, match=re.escape("cannot open Optuna storage postgresql+psycopg://")) as error:
        work(overrides)
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
        return open_storage(cfg)

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        storages = list(pool.map(open_together, range(6)))
    assert len(storages) == 6
    optuna.create_study(study_name="after-the-race", storage=storages[0])
    assert [study.study_name for study in storages[-1].get_all_studies()] == ["after-the-race"]


def test_a_wrong_database_password_is_one_line(stack, data_overrides, tmp_path):
    storage = re.sub(r":[^:@/]+@", ":wrong@", stack["OPTUNA_STORAGE"])
    overrides = overrides_for(data_overrides, "wrong-password", storage, f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(UserError, match="password authentication failed") as error:
        work(overrides)
    assert "\n" not in str(error.value)
    assert "wrong" not in str(error.value) and "***" in str(error.value)  # no password in logs
