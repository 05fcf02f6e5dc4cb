"""Logged bandit feedback: every interaction of a run, kept for off-policy evaluation.

With `tracking.log_interactions=true` a run stores `interactions/interactions.parquet`, one
row per interaction in the order they happened, and registers it with `mlflow.data` as the
run's input dataset (context `logged_interactions`). Columns:

  round        the interaction's index in the run
  user_id      the MovieLens user; `context_0 .. context_{k-1}` the features the policy saw
  action       the movie's index in the environment's action set; `movie_id` its MovieLens id
  propensity   the logging policy's probability of that action when it chose it (NaN when
               the policy's propensities are unknown: the run's tag says which)
  reward       the reward received
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException

from src.errors import UserError

ARTIFACT_DIR = "interactions"
FILE = "interactions.parquet"
# "exact" or "unknown": whether the log's propensities are the logging policy's true ones.
PROPENSITIES_TAG = "interactions.propensities"
CONTEXT_PREFIX = "context_"


class InteractionLog:
    """Collects the engine's recorded interactions chunk by chunk."""

    def __init__(self):
        self._chunks: list[np.ndarray] = []

    def add(self, interactions: np.ndarray) -> None:
        self._chunks.append(interactions)

    def frame(self, reward_model) -> pd.DataFrame:
        """The rows described above, for the environment's `reward_model`."""
        rows = np.concatenate(self._chunks)
        users, actions = rows[:, 0].astype(np.int64), rows[:, 1].astype(np.int64)
        features = reward_model.user_features[users]
        return pd.DataFrame({
            "round": np.arange(len(rows)),
            "user_id": reward_model.user_ids[users],
            **{f"{CONTEXT_PREFIX}{i}": features[:, i].astype(np.float32) for i in range(features.shape[1])},
            "action": actions,
            "movie_id": reward_model.movie_ids[actions],
            "propensity": rows[:, 2],
            "reward": rows[:, 3],
        })


def log(frame: pd.DataFrame) -> None:
    """Store `frame` in the active run and register it as the run's logged dataset."""
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / FILE
        frame.to_parquet(path, index=False)
        mlflow.log_artifact(str(path), ARTIFACT_DIR)
    exact = bool(frame.propensity.notna().all())
    mlflow.set_tag(PROPENSITIES_TAG, "exact" if exact else "unknown")
    mlflow.log_input(as_dataset(frame, source=f"{mlflow.get_artifact_uri()}/{ARTIFACT_DIR}/{FILE}"),
                     context="logged_interactions")


def as_dataset(frame: pd.DataFrame, source: str | None = None):
    """`frame` as an MLflow dataset, digest and schema included."""
    with warnings.catch_warnings():
        # MLflow warns that an artifact path could be two kinds of source (both are the
        # artifact store's), and that integer columns cannot hold NaN (ours never do).
        warnings.simplefilter("ignore", UserWarning)
        dataset = mlflow.data.from_pandas(frame, source=source, name="interactions", targets="reward")
        dataset.schema  # noqa: B018  (inferred once, here, where its warning is silenced)
    return dataset


def load(run_id: str) -> pd.DataFrame:
    """The interactions a run logged."""
    with tempfile.TemporaryDirectory() as scratch:
        try:
            path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"{ARTIFACT_DIR}/{FILE}",
                                                       dst_path=scratch)
        except (MlflowException, OSError):
            raise UserError(f"run {run_id} logged no interactions ({ARTIFACT_DIR}/{FILE}); "
                            f"train it with tracking.log_interactions=true") from None
        return pd.read_parquet(path)


def contexts(frame: pd.DataFrame) -> np.ndarray:
    """The features each round's policy saw, [rounds, k]."""
    return frame.filter(like=CONTEXT_PREFIX).to_numpy(np.float32)
