"""The MLflow pyfunc model around a saved policy, which `mlflow models serve` answers with, and
`log_policy`, which packages both into a run.

The pyfunc is self-contained: it bundles the policy's SavedModel and the `Catalogue`, so serving
needs neither the MovieLens files nor the environment code. Requests, JSON or CSV, carry either
MovieLens user ids or raw feature vectors; the answer is the recommended movie and, where the
policy reports them, the predicted reward of every candidate movie (and a slate policy's ranked
slate).
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import warnings
from importlib.metadata import version
from pathlib import Path

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types.schema import Array, ColSpec, DataType, Map, Schema

from src.errors import UserError
from src.paths import PROJECT_ROOT
from src.serving.catalogue import Catalogue
from src.serving.policy import Policy

log = logging.getLogger(__name__)
# PolicySaver warns that epsilon-greedy's and the random policy's distribution() cannot be
# saved; the servable model only calls action(). A filter: holding the absl logger at ERROR
# while saving (`_quiet`) does not stop this one.
logging.getLogger("absl").addFilter(
    lambda record: "Could not serialize policy.distribution()" not in record.getMessage())

USER_ID = "user_id"
FEATURES = "features"
# Predicted rewards are ratings (1-5): four decimals say all a float32 score knows.
SCORE_DECIMALS = 4
# What a served model pins; MLflow would otherwise guess from this whole environment.
SERVING_PACKAGES = ("tensorflow", "tf-keras", "tf-agents", "tensorflow-probability", "numpy", "pandas",
                    "mlflow", "omegaconf")


def signature() -> ModelSignature:
    """The movie and its scores out. No input schema: with one, MLflow's scoring server cuts
    a user id of 1.5 down to user 1 before the model sees it, and refuses every CSV request
    (it cannot type a column of vectors). `PolicyModel` checks each request itself."""
    outputs = Schema([
        ColSpec(DataType.long, "movie_id"),
        ColSpec(DataType.string, "title"),
        ColSpec(DataType.double, "predicted_reward", required=False),
        ColSpec(Map(DataType.double), "scores", required=False),
        ColSpec(Array(DataType.long), "slate_movie_ids", required=False),
        ColSpec(Array(DataType.string), "slate", required=False),
    ])
    return ModelSignature(outputs=outputs)


def input_example(catalogue: Catalogue) -> pd.DataFrame:
    return pd.DataFrame({USER_ID: catalogue.user_ids[:2]})


class PolicyModel(mlflow.pyfunc.PythonModel):
    """The pyfunc around a saved policy; artifacts `policy` (SavedModel) and `catalogue`."""

    def load_context(self, context):
        self._policy = Policy(Path(context.artifacts["policy"]))
        self._catalogue = Catalogue.load(Path(context.artifacts["catalogue"]))

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        try:
            return self._recommend(pd.DataFrame(model_input))
        except UserError as error:
            # The scoring server answers 400 with this message instead of a 500.
            raise MlflowException(str(error), INVALID_PARAMETER_VALUE) from None

    def _recommend(self, frame: pd.DataFrame) -> pd.DataFrame:
        given = [column for column in (USER_ID, FEATURES) if column in frame]
        if len(given) != 1:
            raise UserError(f"send a '{USER_ID}' column (MovieLens user ids) or a '{FEATURES}' column "
                            f"(feature vectors), not both; got columns {list(frame.columns)}")
        if frame[given[0]].isna().any():
            raise UserError(f"every row needs a '{given[0]}'")
        if given == [USER_ID]:
            observations = self._catalogue.observations_of(_user_ids(frame[USER_ID]))
        else:
            observations = _stack(frame[FEATURES])
        actions, scores = self._policy.decide(observations, self._catalogue)
        answer = pd.DataFrame({
            "movie_id": self._catalogue.movie_ids[actions],
            "title": self._catalogue.titles[actions],
        })
        if scores is not None:
            # float32 arithmetic leaves 4.999999046 for 5 and -1.2e-06 for 0: noise, not information.
            scores = np.round(scores.astype(np.float64), SCORE_DECIMALS) + 0.0
            answer["predicted_reward"] = np.take_along_axis(scores, actions[:, None], axis=1)[:, 0]
            keys = [str(movie) for movie in self._catalogue.movie_ids[:self._policy.movies_arrived]]
            answer["scores"] = [dict(zip(keys, row.tolist())) for row in scores]
            if self._policy.slate_size:
                slates = self._policy.slates(scores)
                answer["slate_movie_ids"] = [self._catalogue.movie_ids[row].tolist() for row in slates]
                answer["slate"] = [self._catalogue.titles[row].tolist() for row in slates]
        return answer


def _user_ids(column: pd.Series) -> pd.Series:
    """The ids as numbers: 3 or 3.0 names user 3; 1.5, "abc" or true name no one."""
    # CSV leaves every id as text when one is not a number.
    ids = pd.to_numeric(column, errors="coerce")
    for value, number in zip(column, ids):
        if isinstance(value, bool) or number % 1 != 0:
            raise UserError(f"{USER_ID} must be a MovieLens user id, a whole number, got {value!r}")
    return ids


def _stack(vectors: pd.Series) -> np.ndarray:
    try:
        # CSV carries a vector as text, the way pandas writes a list: "[0.1, 0.2]".
        rows = [np.atleast_1d(np.asarray(json.loads(vector) if isinstance(vector, str) else vector, np.float64))
                for vector in vectors]
    except (TypeError, ValueError):
        raise UserError("feature vectors must hold numbers only") from None
    lengths = {len(row) for row in rows}
    if len(lengths) != 1:
        raise UserError(f"feature vectors differ in length: {sorted(lengths)}")
    return np.stack(rows)


def log_policy(policy, catalogue: Catalogue, movies_arrived: int | None = None) -> None:
    """Save the greedy policy as a SavedModel under the active run's `policy/` artifacts and
    as a pyfunc model named `model` bundling it with the environment's `catalogue` (of which it
    serves the first `movies_arrived`, where movies arrived while it trained)."""
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "policy"
        save_policy(policy, path, movies_arrived)
        mlflow.log_artifacts(str(path), "policy")
        _log_servable_model(path, catalogue)


def save_policy(policy, path: Path, movies_arrived: int | None = None) -> None:
    """The greedy policy as a TF SavedModel in the folder `path`; with `movies_arrived`, that
    count in its metadata (`src.serving.policy.MOVIES_ARRIVED`): the movies it may recommend."""
    import tensorflow as tf
    from tf_agents.policies import policy_saver

    from src.serving.policy import MOVIES_ARRIVED

    metadata = None if movies_arrived is None else {MOVIES_ARRIVED: tf.Variable(movies_arrived, trainable=False)}
    with _quiet("absl", "tensorflow"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Encoding a StructuredValue")
        policy_saver.PolicySaver(policy, batch_size=None, metadata=metadata).save(str(path))


def _log_servable_model(policy: Path, catalogue: Catalogue):
    with tempfile.TemporaryDirectory() as scratch:
        table = Path(scratch) / "catalogue.npz"
        catalogue.save(table)
        # MLflow warns about cloudpickle (the class pickles by reference to src.serving.model, which
        # the model bundles) and about pip, which uv environments do not have.
        with _quiet("mlflow.pyfunc", "mlflow.utils.environment", "mlflow.utils.uv_utils"):
            return mlflow.pyfunc.log_model(
                name="model",
                python_model=PolicyModel(),
                artifacts={"policy": str(policy), "catalogue": str(table)},
                # The server imports the model class from the bundled copy of src/, not from here.
                code_paths=[str(PROJECT_ROOT / "src")],
                signature=signature(),
                input_example=input_example(catalogue),
                # What a request's feature vectors must hold, which a sweep's best trial may have
                # chosen (env.rank_k): shown with the model in MLflow's UI and its MLmodel file.
                metadata={"observation_features": int(catalogue.user_features.shape[1]),
                          "movies": len(catalogue.movie_ids)},
                pip_requirements=[f"{name}=={version(name)}" for name in SERVING_PACKAGES],
            )


@contextlib.contextmanager
def _quiet(*names: str):
    """Hold these loggers at ERROR: the SavedModel writer logs every renamed argument, and
    MLflow's model logging gives advice that does not apply here; all harmless."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
