"""A policy saved by TF-Agents' `PolicySaver`, loaded for inference: its action for each user
observation and, where it reports them, every movie's predicted reward (and a slate policy's
ranked slate). A policy trained while movies arrived (`env.arrivals`) recommends among the movies
arrived by the end of its training, which its metadata counts (`MOVIES_ARRIVED`): an action
mask of those beside each observation, or, per-arm, the first of its catalogue (both in arrival
order)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from src import tf_runtime  # noqa: F401,I001  (quiet TensorFlow, and the TypeSpecs a saved policy needs)

from src.errors import UserError
from src.serving.catalogue import Catalogue

# The policy's metadata entry counting the movies that had arrived when it was saved.
MOVIES_ARRIVED = "movies_arrived"


class Policy:
    """A policy saved by TF-Agents' `PolicySaver`, loaded in this process."""

    def __init__(self, path: Path):
        from tf_agents.bandits.specs import utils as bandit_spec_utils
        from tf_agents.policies import py_tf_eager_policy

        self._policy = py_tf_eager_policy.SavedModelPyTFEagerPolicy(
            str(path), load_specs_from_pbtxt=True, batch_time_steps=False)
        observation = self._policy.time_step_spec.observation
        arrived = self._policy.get_metadata().get(MOVIES_ARRIVED)
        self.movies_arrived = None if arrived is None else int(arrived.numpy())
        self.masked = isinstance(observation, tuple)
        if self.masked:
            observation, mask = observation
            self._mask = (np.arange(mask.shape[0]) < (self.movies_arrived or mask.shape[0])).astype(np.int32)
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
        predicted reward if the policy reports them (NaN for a movie that had not arrived by the
        end of its training). A per-arm policy needs the `catalogue` whose movies it ranks; a slate
        policy's action is then its best movie (`slates`)."""
        observations = np.asarray(observations, np.float32)
        if observations.ndim != 2 or observations.shape[1] != self.dimension:
            width = observations.shape[-1] if observations.ndim else 1
            raise UserError(f"an observation must have {self.dimension} features (the env.rank_k this "
                            f"policy was trained with; a sweep's best trial may have chosen it), got {width}")
        if not np.isfinite(observations).all():
            raise UserError("observations must be finite numbers")
        if self.per_arm:
            scores = np.stack([self._score_catalogue(user, catalogue) for user in observations])
            return np.nanargmax(scores, axis=1), scores
        batch = len(observations)
        if self.masked:
            observations = observations, np.tile(self._mask, (batch, 1))
        step = self._policy.action(self._first_step(observations, batch))
        scores = getattr(step.info, "predicted_rewards_mean", None)
        if scores is None:
            return np.asarray(step.action), None
        scores = np.array(scores, np.float32)
        if self.movies_arrived is not None:
            scores[:, self.movies_arrived:] = np.nan  # no prediction for a movie yet to arrive
        return np.asarray(step.action), scores

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

        movies = catalogue.candidates_for(user)[:self.movies_arrived]
        sets = -(-len(movies) // self.candidates)
        padded = np.resize(movies, (sets * self.candidates, movies.shape[1]))
        observation = {bandit_spec_utils.GLOBAL_FEATURE_KEY: np.repeat(user[None], sets, axis=0),
                       bandit_spec_utils.PER_ARM_FEATURE_KEY: padded.reshape(sets, self.candidates, -1)}
        step = self._policy.action(self._first_step(observation, sets))
        scores = getattr(step.info, "predicted_rewards_mean", None)
        if scores is None:
            raise UserError("this per-arm policy reports no predicted rewards, so it cannot rank the catalogue")
        scores = np.asarray(scores).reshape(-1)[:len(movies)]
        return np.pad(scores, (0, len(catalogue.movie_ids) - len(movies)), constant_values=np.nan)
