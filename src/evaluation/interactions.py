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

A slate round (env=movielens_ranking: N candidates offered, a slate of K shown) has instead of
action, movie_id, propensity and reward:

  candidate_0 .. candidate_{N-1}   the MovieLens ids of the candidates, in the order offered
  slot_0 .. slot_{K-1}             the slate, best first: positions in the candidate list
  reward_0 .. reward_{K-1}         each slot's reward: its movie's rating (env.feedback=scores),
                                   or 1 at the click and 0 elsewhere (cascade)
  position_propensity_0 ..         the logging policy's chance of showing that candidate at that
                                   position, whatever else it showed (src.evaluation.slates)
  prefix_propensity_0 ..           its chance of showing the slate down to that position
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig, OmegaConf

from src import config, tracking
from src.errors import UserError
from src.evaluation import estimators, slates

logger = logging.getLogger(__name__)  # `log` is the function that stores a log

ARTIFACT_DIR = "interactions"
FILE = "interactions.parquet"
# "exact" or "unknown": whether the log's propensities are the logging policy's true ones.
PROPENSITIES_TAG = "interactions.propensities"
CONTEXT_PREFIX = "context_"
CANDIDATE_PREFIX, SLOT_PREFIX, SLOT_REWARD_PREFIX = "candidate_", "slot_", "reward_"
POSITION_PROPENSITY_PREFIX, PREFIX_PROPENSITY_PREFIX = "position_propensity_", "prefix_propensity_"
# What must agree between the logs' run and a policy or agent used with them.
ENVIRONMENT_KEYS = ("env", "data")
WHEREABOUTS = ("dir", "path", "cache_dir", "url")  # where the data lives, not what it is
# When a reward reaches the learning agent, if ever: its training, not the users, movies or rewards.
FEEDBACK_TIMING = ("delay", "delay_loops", "delay_longest", "feedback_drop")


class InteractionLog:
    """Collects the engine's recorded interactions chunk by chunk: rounds of the environment's
    `logged_round_kind`; for slates, `slate_probabilities` (src.agents.slate_probabilities, None
    where unknown) turns the logged scores into the propensities of the slates shown."""

    def __init__(self, kind: str = "movie", slate_probabilities=None):
        self._chunks: list[np.ndarray] = []
        self._kind = kind
        self._slate_probabilities = slate_probabilities

    def add(self, interactions: np.ndarray) -> None:
        self._chunks.append(interactions)

    def frame(self, reward_model) -> pd.DataFrame:
        """The rows described above, for the environment's `reward_model`."""
        rows = np.concatenate(self._chunks)
        users = rows[:, 0].astype(np.int64)
        features = reward_model.user_features[users]
        described = {
            "round": np.arange(len(rows)),
            "user_id": reward_model.user_ids[users],
            **{f"{CONTEXT_PREFIX}{i}": features[:, i].astype(np.float32) for i in range(features.shape[1])},
        }
        if self._kind == "slate":
            return pd.DataFrame({**described, **self._slates(rows[:, 1:], reward_model)})
        actions = rows[:, 1].astype(np.int64)
        return pd.DataFrame({**described, "action": actions, "movie_id": reward_model.movie_ids[actions],
                             "propensity": rows[:, 2], "reward": reward_model.rewards[users, actions]})

    def _slates(self, rows: np.ndarray, reward_model) -> dict[str, np.ndarray]:
        """The slate columns, from [n, N candidates, K slots, K slot rewards, N scores] rows."""
        candidates, size = reward_model.num_actions, reward_model.slate_size
        offered = rows[:, :candidates].astype(np.int64)
        shown = rows[:, candidates:candidates + size].astype(np.int64)
        slot_rewards = rows[:, candidates + size:candidates + 2 * size]
        scores = rows[:, candidates + 2 * size:]
        if self._slate_probabilities is None:
            position = prefix = np.full(shown.shape, np.nan)
        else:
            logger.info("Computing the logging policy's propensities of the %d slates shown", len(shown))
            probabilities = self._slate_probabilities(scores, shown)
            position, prefix = probabilities.position, probabilities.prefix
        movie_ids = reward_model.movie_ids[offered]
        return {**_columns(CANDIDATE_PREFIX, movie_ids), **_columns(SLOT_PREFIX, shown),
                **_columns(SLOT_REWARD_PREFIX, slot_rewards), **_columns(POSITION_PROPENSITY_PREFIX, position),
                **_columns(PREFIX_PROPENSITY_PREFIX, prefix)}


def _columns(prefix: str, values: np.ndarray) -> dict[str, np.ndarray]:
    return {f"{prefix}{i}": values[:, i] for i in range(values.shape[1])}


def is_slate_log(frame: pd.DataFrame) -> bool:
    return f"{SLOT_PREFIX}0" in frame


def log(frame: pd.DataFrame, monte_carlo_draws: int = 0) -> None:
    """Store `frame` in the active run and register it as the run's logged dataset; its
    propensities are tagged exact, Monte-Carlo estimates (from `monte_carlo_draws` draws) or unknown."""
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / FILE
        frame.to_parquet(path, index=False)
        mlflow.log_artifact(str(path), ARTIFACT_DIR)
    propensities = frame.filter(like=PREFIX_PROPENSITY_PREFIX) if is_slate_log(frame) else frame.propensity
    known = bool(propensities.notna().all(axis=None))
    kind = (f"monte_carlo ({monte_carlo_draws} draws)" if monte_carlo_draws else "exact") if known else "unknown"
    mlflow.set_tag(PROPENSITIES_TAG, kind)
    mlflow.log_input(as_dataset(frame, source=f"{mlflow.get_artifact_uri()}/{ARTIFACT_DIR}/{FILE}"),
                     context="logged_interactions")


def as_dataset(frame: pd.DataFrame, source: str | None = None):
    return tracking.as_dataset(frame, "interactions", source, targets=None if is_slate_log(frame) else "reward")


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


def context_features(frame: pd.DataFrame) -> np.ndarray:
    """The features each round's policy saw, [rounds, k]."""
    return frame.filter(like=CONTEXT_PREFIX).to_numpy(np.float32)


def environment_of(run_cfg: DictConfig) -> dict:
    """The flattened env and data settings that fix users, movies and rewards (not where the data
    lives, nor when rewards reach the agent); a key its env option gained since the run was made
    (env.drift) at its default, which the run had."""
    described = OmegaConf.masked_copy(run_cfg, list(ENVIRONMENT_KEYS))
    defaults = config.option_file("env", run_cfg.env.name)
    if defaults is not None:
        described.env = OmegaConf.merge(defaults, described.env)
    flat = tracking.flatten(described)
    return {key: value for key, value in flat.items() if key.split(".")[-1] not in WHEREABOUTS
            and key.removeprefix("env.") not in FEEDBACK_TIMING}


def check_same_environment(logs_cfg: DictConfig, other_cfg: DictConfig, logs: str, other: str) -> None:
    """Refuse to use the logs (described as `logs`) with a policy or agent (`other`) of another
    environment: other movies, users, features or rewards."""
    logs_env, other_env = environment_of(logs_cfg), environment_of(other_cfg)
    if logs_env["env.num_movies"] != other_env["env.num_movies"]:
        raise UserError(f"the action spaces differ: {logs} have {logs_env['env.num_movies']} movies, "
                        f"{other} {other_env['env.num_movies']}")
    differing = sorted(key for key in logs_env.keys() | other_env.keys() if logs_env.get(key) != other_env.get(key))
    if differing:
        key = differing[0]
        raise UserError(f"{logs} come from another environment than {other}: {key} is "
                        f"{logs_env.get(key)} in the logs and {other_env.get(key)} for {other}")


def feedback_of(frame: pd.DataFrame, reward_model, logs_run_id: str) -> tuple[estimators.Feedback, np.ndarray]:
    """The logged rounds, and each round's row in `reward_model`; refuses logs whose users and
    features are not this environment's."""
    rows = pd.Index(reward_model.user_ids).get_indexer(frame.user_id)
    contexts = context_features(frame)
    if (rows < 0).any() or contexts.shape[1] != reward_model.user_features.shape[1] or not np.allclose(
            contexts, reward_model.user_features[rows], atol=1e-5):
        raise UserError(f"the interactions of run {logs_run_id} do not match the environment its config "
                        f"describes (other users or features): was the data changed since?")
    feedback = estimators.Feedback(contexts, frame.action.to_numpy(np.int64), frame.reward.to_numpy(np.float64),
                                   frame.propensity.to_numpy(np.float64))
    return feedback, rows


def check_propensities(feedback: estimators.Feedback, names, logs_run_id: str, logging_agent: str) -> None:
    """Refuse logs that the estimators `names` cannot score: without propensities, where one of
    them weights by them, or with a propensity of 0."""
    needing = estimators.needing_propensities(names)
    if not needing:
        return
    if np.isnan(feedback.propensities).any():
        raise UserError(f"the logs of run {logs_run_id} have no propensities: agent={logging_agent} does not "
                        f"expose its action probabilities, so {', '.join(needing)} cannot score them; "
                        f"use estimators=[dm], or log with epsilon_greedy, neural_boltzmann, random or "
                        f"agent=linucb agent.log_epsilon=0.05")
    zero = np.flatnonzero(feedback.propensities <= 0)
    if len(zero):
        raise UserError(f"the logs of run {logs_run_id} hold a propensity of {feedback.propensities[zero[0]]} "
                        f"(round {zero[0]}): importance weights need propensities > 0")


def slate_log_of(frame: pd.DataFrame, reward_model, logs_run_id: str) -> tuple[slates.SlateLog, np.ndarray, np.ndarray]:
    """The logged slates, each round's user row in `reward_model` and its candidates' pool
    columns [n, N]; refuses logs whose users, features or movies are not this environment's, or
    that carry no propensities."""
    rows = pd.Index(reward_model.user_ids).get_indexer(frame.user_id)
    contexts = context_features(frame)
    movie_ids = frame.filter(like=CANDIDATE_PREFIX).to_numpy(np.int64)
    columns = pd.Index(reward_model.movie_ids).get_indexer(movie_ids.ravel()).reshape(movie_ids.shape)
    if ((rows < 0).any() or (columns < 0).any() or contexts.shape[1] != reward_model.user_features.shape[1]
            or not np.allclose(contexts, reward_model.user_features[rows], atol=1e-5)):
        raise UserError(f"the slates of run {logs_run_id} do not match the environment its config describes "
                        f"(other users, features or movies): was the data changed since?")
    position = frame.filter(like=POSITION_PROPENSITY_PREFIX).to_numpy(np.float64)
    prefix = frame.filter(like=PREFIX_PROPENSITY_PREFIX).to_numpy(np.float64)
    if np.isnan(prefix).any():
        raise UserError(f"the slates of run {logs_run_id} have no propensities: its agent's slate sampling has no "
                        f"closed form; log slates with agent=ranking (no_penalty or descending_scores), "
                        f"epsilon_greedy or random")
    log = slates.SlateLog(contexts.astype(np.float64), reward_model.movie_features[columns],
                          frame.filter(like=SLOT_PREFIX).to_numpy(np.int64),
                          frame.filter(like=SLOT_REWARD_PREFIX).to_numpy(np.float64),
                          slates.SlateProbabilities(position, prefix, np.empty((len(frame), 0, 0))))
    return log, rows, columns
