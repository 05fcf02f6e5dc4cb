"""A trained policy for inference: the saved TF-Agents policy and, around it, an MLflow pyfunc
model that `mlflow models serve` answers with; `log_policy` packages both into a run.

The pyfunc is self-contained: it bundles the policy's SavedModel and a small catalogue (the
environment's user features, movie ids and titles), so serving needs neither the MovieLens
files nor the environment code. Requests, JSON or CSV, carry either MovieLens user ids or
raw feature vectors; the answer is the recommended movie and, where the policy reports them,
the predicted reward of every candidate movie (and a slate policy's ranked slate).
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import warnings
from dataclasses import asdict, dataclass
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

from src import tf_runtime  # noqa: F401,I001  (quiet TensorFlow, and the TypeSpecs a saved policy needs)

from src.errors import UserError
from src.paths import PROJECT_ROOT

log = logging.getLogger(__name__)
# PolicySaver warns that epsilon-greedy's and the random policy's distribution() cannot be
# saved; the servable model only calls action(). A filter: holding the absl logger at ERROR
# while saving (`_quiet`) does not stop this one.
logging.getLogger("absl").addFilter(
    lambda record: "Could not serialize policy.distribution()" not in record.getMessage())

USER_ID = "user_id"
FEATURES = "features"
# What a served model pins; MLflow would otherwise guess from this whole environment.
SERVING_PACKAGES = ("tensorflow", "tf-keras", "tf-agents", "tensorflow-probability", "numpy", "pandas",
                    "mlflow", "omegaconf")


@dataclass(frozen=True)
class Catalogue:
    """What a request needs besides the policy: who the users are and what the actions are."""

    user_ids: np.ndarray  # [users] MovieLens user ids, one per environment row
    user_features: np.ndarray  # [users, rank_k] the observation of each user
    movie_ids: np.ndarray  # [actions] MovieLens item id behind each action (per-arm: the pool)
    titles: np.ndarray  # [actions]
    # Per-arm environments only: each movie's features and how a candidate shows them
    # (src.envs.movielens_per_arm.ARM_FEATURES).
    movie_features: np.ndarray | None = None  # [movies, rank_k]
    arm_features: str | None = None

    @classmethod
    def of(cls, reward_model, movies: pd.DataFrame, env_cfg) -> Catalogue:
        """The catalogue of an environment's `reward_model`, titled from MovieLens `movies`, for
        the environment `env_cfg` describes (per-arm ones set `arm_features`)."""
        arm_features = env_cfg.get("arm_features")
        return cls(np.asarray(reward_model.user_ids), np.asarray(reward_model.user_features, np.float32),
                   np.asarray(reward_model.movie_ids), movies.title.loc[reward_model.movie_ids].to_numpy(str),
                   None if arm_features is None else np.asarray(reward_model.movie_features, np.float32),
                   arm_features)

    def save(self, path: Path) -> None:
        np.savez(path, **{name: value for name, value in asdict(self).items() if value is not None})

    @classmethod
    def load(cls, path: Path) -> Catalogue:
        with np.load(path) as stored:
            return cls(**{name: stored[name][()] if stored[name].ndim == 0 else stored[name] for name in stored.files})

    def candidates_for(self, user: np.ndarray) -> np.ndarray:
        """[movies, features]: every movie as a per-arm policy sees it offered to `user`."""
        if self.arm_features == "interaction":
            return np.concatenate([self.movie_features, self.movie_features * user], axis=1)
        return self.movie_features

    def observations_of(self, user_ids) -> np.ndarray:
        """The observed features of each MovieLens user id, in order."""
        rows = pd.Index(self.user_ids).get_indexer(user_ids)
        missing = [int(user) for user, row in zip(user_ids, rows) if row < 0]
        if missing:
            raise UserError(
                f"user_id {missing[0]} is not in this environment: it holds {len(self.user_ids)} "
                f"users with ids {self.user_ids.min()}..{self.user_ids.max()}, leaving out those "
                f"who rated none of its {len(self.movie_ids)} movies")
        return self.user_features[rows]


class Policy:
    """A policy saved by TF-Agents' `PolicySaver`, loaded in this process."""

    def __init__(self, path: Path):
        from tf_agents.bandits.specs import utils as bandit_spec_utils
        from tf_agents.policies import py_tf_eager_policy

        self._policy = py_tf_eager_policy.SavedModelPyTFEagerPolicy(
            str(path), load_specs_from_pbtxt=True, batch_time_steps=False)
        observation = self._policy.time_step_spec.observation
        self.per_arm = isinstance(observation, dict) and bandit_spec_utils.PER_ARM_FEATURE_KEY in observation
        action = self._policy.action_spec
        # A slate policy (env=movielens_ranking) recommends this many movies, best first.
        self.slate_size = int(action.shape[0]) if len(action.shape) == 1 else None
        if self.per_arm:
            self.candidates = int(observation[bandit_spec_utils.PER_ARM_FEATURE_KEY].shape[0])
            observation = observation[bandit_spec_utils.GLOBAL_FEATURE_KEY]
        if not hasattr(observation, "shape") or len(observation.shape) != 1:
            raise UserError(f"the policy in {path} observes {observation}; only policies that "
                            f"observe one feature vector, or one beside each candidate's, can recommend from here")
        self.dimension = int(observation.shape[0])

    def decide(self, observations, catalogue: Catalogue | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """The action (a column of the catalogue) for each user observation, and each movie's
        predicted reward if the policy reports them. A per-arm policy needs the `catalogue`
        whose movies it ranks; a slate policy's action is then its best movie (`slates`)."""
        observations = np.asarray(observations, np.float32)
        if observations.ndim != 2 or observations.shape[1] != self.dimension:
            width = observations.shape[-1] if observations.ndim else 1
            raise UserError(f"an observation must have {self.dimension} features (the run's "
                            f"env.rank_k), got {width}")
        if not np.isfinite(observations).all():
            raise UserError("observations must be finite numbers")
        if self.per_arm:
            scores = np.stack([self._score_catalogue(user, catalogue) for user in observations])
            return scores.argmax(axis=1), scores
        step = self._policy.action(self._first_step(observations, len(observations)))
        scores = getattr(step.info, "predicted_rewards_mean", None)
        return np.asarray(step.action), None if scores is None else np.asarray(scores)

    def _first_step(self, observation, batch_size: int):
        """A time step for `observation`; the reward's structure is the environment's (a slate's
        cascade feedback is two tensors), though the policy reads the observation only."""
        from tf_agents.trajectories import time_step as ts

        return ts.restart(observation, batch_size=batch_size, reward_spec=self._policy.time_step_spec.reward)

    def slates(self, scores: np.ndarray) -> np.ndarray:
        """[observations, slate_size] the columns of the best-scoring movies, best first."""
        return np.argsort(-scores, axis=1, kind="stable")[:, :self.slate_size]

    def _score_catalogue(self, user: np.ndarray, catalogue: Catalogue) -> np.ndarray:
        """A per-arm policy's predicted reward of every movie for `user`. It scores candidate sets
        of its own size, so the catalogue goes in as many sets as it fills (the last padded);
        the pick is then the best predicted movie, without the exploration a set's pick has."""
        from tf_agents.bandits.specs import utils as bandit_spec_utils

        movies = catalogue.candidates_for(user)
        sets = -(-len(movies) // self.candidates)
        padded = np.resize(movies, (sets * self.candidates, movies.shape[1]))
        observation = {bandit_spec_utils.GLOBAL_FEATURE_KEY: np.repeat(user[None], sets, axis=0),
                       bandit_spec_utils.PER_ARM_FEATURE_KEY: padded.reshape(sets, self.candidates, -1)}
        step = self._policy.action(self._first_step(observation, sets))
        scores = getattr(step.info, "predicted_rewards_mean", None)
        if scores is None:
            raise UserError("this per-arm policy reports no predicted rewards, so it cannot rank the catalogue")
        return np.asarray(scores).reshape(-1)[:len(movies)]


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
            answer["predicted_reward"] = np.take_along_axis(scores, actions[:, None], axis=1)[:, 0]
            keys = [str(movie) for movie in self._catalogue.movie_ids]
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


def log_policy(policy, catalogue: Catalogue) -> None:
    """Save the greedy policy as a SavedModel under the active run's `policy/` artifacts and
    as a pyfunc model named `model` bundling it with the environment's `catalogue`."""
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "policy"
        save_policy(policy, path)
        mlflow.log_artifacts(str(path), "policy")
        _log_servable_model(path, catalogue)


def save_policy(policy, path: Path) -> None:
    """The greedy policy as a TF SavedModel in the folder `path`."""
    from tf_agents.policies import policy_saver

    with _quiet("absl", "tensorflow"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Encoding a StructuredValue")
        policy_saver.PolicySaver(policy, batch_size=None).save(str(path))


def _log_servable_model(policy: Path, catalogue: Catalogue):
    with tempfile.TemporaryDirectory() as scratch:
        table = Path(scratch) / "catalogue.npz"
        catalogue.save(table)
        # MLflow warns about cloudpickle (the class pickles by reference to src.serving, which
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
