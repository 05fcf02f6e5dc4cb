"""src.tracking: how patient a campaign's requests are, what an outage is called, what a dataset's
schema says."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from mlflow.types.utils import _infer_schema

from src import tracking

RETRIES = "MLFLOW_HTTP_REQUEST_MAX_RETRIES"


@pytest.mark.parametrize("patience_s, factor, retries", [(60, "2", 5), (6, "2", 3), (300, "2", 8), (60, "0", 2)])
def test_a_workers_retries_wait_out_its_patience(monkeypatch, patience_s, factor, retries):
    monkeypatch.setenv(RETRIES, "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", factor)
    tracking.be_patient(patience_s)
    assert os.environ[RETRIES] == str(retries)


def test_more_retries_asked_for_are_kept(monkeypatch):
    monkeypatch.setenv(RETRIES, "9")
    tracking.be_patient(6)
    assert os.environ[RETRIES] == "9"


@pytest.mark.parametrize("message, said", [
    ("API request to http://x/api failed with exception HTTPConnectionPool: Max retries exceeded (Caused by "
     "ResponseError('too many 503 error responses'))", "the server runs, its backend store (PostgreSQL) does not"),
    ("Max retries exceeded with url: /api (Caused by NewConnectionError: Connection refused)", "no connection"),
])
def test_an_outage_is_named_by_its_cause(message, said):
    assert said in tracking.why_unreachable(MlflowException(message))


@pytest.mark.parametrize("frame", [
    pd.DataFrame({"user_id": [1, 2], "rating": [4.0, 5.0]}),
    pd.DataFrame({"user_id": [1, 2], "rating": [4.0, np.nan]}),  # same types, a value missing: not required
    pd.DataFrame({"user_id": [1, 2], "rating": [4, 5]}),
    pd.DataFrame({"user_id": [1, 2], "title": ["Heat", None]}),  # not numeric: MLflow's own inference
])
def test_a_datasets_schema_is_mlflows_whatever_was_logged_before(frame):
    for earlier in (pd.DataFrame({"user_id": [3, 4], "rating": [1.0, 2.0]}), frame):
        tracking.as_dataset(earlier, "ratings")
    assert tracking.as_dataset(frame, "ratings").schema == _infer_schema(frame)
