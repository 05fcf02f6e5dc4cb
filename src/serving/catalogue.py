"""What a request needs besides the policy: the environment's users, movie ids and titles, so
that serving needs neither the MovieLens files nor the environment code."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from src.errors import UserError

if TYPE_CHECKING:
    from src.envs.base import RewardModel


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
    def of(cls, reward_model: RewardModel, movies: pd.DataFrame, env_cfg) -> Catalogue:
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

    def first(self, movies: int) -> Catalogue:
        """The catalogue of its first `movies` (an environment's movies arrived, in arrival order)."""
        return replace(self, movie_ids=self.movie_ids[:movies], titles=self.titles[:movies],
                       movie_features=None if self.movie_features is None else self.movie_features[:movies])

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
