"""MovieLens rewarded by people's real ratings, not by a low-rank reconstruction.

Each user's ratings are split, seeded, into a feature part and a reward part. The SVD of the
feature part gives the user and movie embeddings (scaled as in `src.envs.movielens`); the
reward part is never seen by it. Each round a user is drawn uniformly among those with at
least `num_actions` reward ratings and offered `num_actions` distinct movies among the ones
they rated in the reward part; the agent observes the user's and the candidates' embeddings
(per-arm, like `src.envs.movielens_per_arm`), and earns the real rating of its pick, or 1 for
a movie they liked (rating >= `liked_threshold`) and 0 otherwise. Regret is measured against
the best really-rated candidate: the replay-style check of what a simulator says.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import tensorflow as tf
from scipy import sparse

from src.envs.base import FeedbackDelay
from src.envs.movielens import MOST_CELLS, MOVIE_SELECTIONS, factorise, select_movies
from src.envs.movielens_per_arm import MovieLensPerArmEnvironment, expected_top_weights
from src.errors import UserError, require

log = logging.getLogger(__name__)

REWARDS = ("rating", "liked")


@dataclass(frozen=True)
class RatingsSplit:
    """A ratings matrix cut in two, 0 where a user has not rated a movie (or it is in the other part)."""

    features: np.ndarray  # [users, movies] the ratings the embeddings are fit on
    rewards: np.ndarray  # [users, movies] the ratings held out as rewards


def split_ratings(matrix: np.ndarray, feature_share: float, seed: int) -> RatingsSplit:
    """Each user's ratings in a random order (seeded): the first round(share x count) go to the
    features, the rest to the rewards, so that every user with ratings keeps some in each part
    wherever its count allows."""
    users, movies = np.nonzero(matrix)
    order = np.lexsort((np.random.default_rng(seed).random(len(users)), users))
    users, movies = users[order], movies[order]
    counts = np.bincount(users, minlength=matrix.shape[0])
    position = np.arange(len(users)) - np.searchsorted(users, users)
    to_features = position < np.rint(feature_share * counts[users])
    features, rewards = np.zeros_like(matrix), np.zeros_like(matrix)
    features[users[to_features], movies[to_features]] = matrix[users[to_features], movies[to_features]]
    rewards[users[~to_features], movies[~to_features]] = matrix[users[~to_features], movies[~to_features]]
    return RatingsSplit(features, rewards)


@dataclass(frozen=True)
class RatedCandidatesModel:
    """The users who can be offered a candidate set, their embeddings, and their held-out rewards:
    a `src.envs.base.RewardModel` with rewards only where they rated, so no policy has an exact value."""

    user_ids: np.ndarray  # [users] MovieLens user ids behind each row
    movie_ids: np.ndarray  # [movies] MovieLens item ids behind each column
    user_features: np.ndarray  # [users, rank_k]
    movie_features: np.ndarray  # [movies, rank_k]
    rewards: np.ndarray  # [users, movies] the reward of each held-out rating, NaN where none
    num_actions: int
    skipped_users: int  # users with ratings but fewer than num_actions held out

    def rated(self, row: int) -> np.ndarray:
        """Columns of the movies user `row` rated in the reward part."""
        return np.flatnonzero(~np.isnan(self.rewards[row]))

    @cached_property  # a model is fixed; a large pool's or a drift's regret takes a while
    def random_policy_regret(self) -> float:
        """Exact expected per-interaction regret of a uniform pick among a user's random candidate
        set: E[best of the set] (order statistics, `expected_top_weights`) minus the mean."""
        def regret(row: int) -> float:
            rewards = np.sort(self.rewards[row, self.rated(row)])
            return rewards @ expected_top_weights(len(rewards), self.num_actions, 1) - rewards.mean()

        return float(np.mean([regret(row) for row in range(len(self.user_ids))]))


def build_rated_candidates_model(
    ratings_matrix: sparse.csr_array, num_actions: int, rank_k: int, feature_share: float, split_seed: int,
    reward: str = "rating", liked_threshold: float = 4, num_movies: int | None = None,
    movie_selection: str = "first",
) -> RatedCandidatesModel:
    require(reward in REWARDS, "env.reward", reward, f"one of {', '.join(REWARDS)}")
    require(movie_selection in MOVIE_SELECTIONS, "env.movie_selection", movie_selection,
            f"one of {', '.join(MOVIE_SELECTIONS)}")
    pool = ratings_matrix.shape[1] if num_movies is None else num_movies
    require(isinstance(pool, int) and 2 <= pool <= ratings_matrix.shape[1], "env.num_movies", num_movies,
            f"null or between 2 and the {ratings_matrix.shape[1]} movies in the data")
    require(isinstance(num_actions, int) and num_actions >= 2, "env.num_actions", num_actions, "an integer >= 2")
    require(0 < feature_share < 1, "env.feature_share", feature_share,
            "between 0 and 1 (exclusive): both the features and the rewards need ratings")
    columns = select_movies(ratings_matrix, pool, movie_selection)
    cells = ratings_matrix.shape[0] * len(columns)
    require(cells <= MOST_CELLS, "env.num_movies", num_movies,
            f"small enough for the dense split of the ratings: {ratings_matrix.shape[0]:,} users x {len(columns):,} "
            f"movies is more than {MOST_CELLS:,} cells")
    split = split_ratings(ratings_matrix[:, columns].toarray(), feature_share, split_seed)
    for part, matrix in (("features", split.features), ("rewards", split.rewards)):
        if not matrix.any():
            raise UserError(f"env.feature_share={feature_share} leaves no rating for the {part}: "
                            f"pick a share that gives both parts ratings")
    held_out = np.count_nonzero(split.rewards, axis=1)
    rows = np.flatnonzero(held_out >= num_actions)
    if not len(rows):
        raise UserError(f"env.num_actions={num_actions} is more than any user's held-out ratings (at most "
                        f"{held_out.max()} with env.feature_share={feature_share}): offer fewer candidates")
    largest_rank = min(split.features.shape)
    require(isinstance(rank_k, int) and 1 <= rank_k <= largest_rank, "env.rank_k", rank_k,
            f"between 1 and min(users, movies) = {largest_rank}")
    user_features, movie_features = factorise(split.features, rank_k)
    rated = split.rewards[rows]
    rewards = rated if reward == "rating" else (rated >= liked_threshold).astype(float)
    skipped = int(np.count_nonzero((held_out > 0) & (held_out < num_actions)))
    log.info("Real-ratings environment: %d users with at least %d held-out ratings; %d users with fewer are "
             "skipped; %d ratings embed users and movies, %d are rewards", len(rows), num_actions, skipped,
             np.count_nonzero(split.features), np.count_nonzero(rated))
    return RatedCandidatesModel(
        user_ids=rows + 1,
        movie_ids=columns + 1,
        user_features=user_features[rows],
        movie_features=movie_features,
        rewards=np.where(rated > 0, rewards, np.nan),
        num_actions=num_actions,
        skipped_users=skipped,
    )


class MovieLensRatingsEnvironment(MovieLensPerArmEnvironment):
    """Per-arm rounds whose candidates are movies the user really rated in the reward part."""

    def __init__(self, model: RatedCandidatesModel, batch_size: int, seed: int, arm_features: str = "interaction",
                 name: str = "movielens_ratings"):
        rated = [model.rated(row) for row in range(len(model.user_ids))]
        padded = np.zeros([len(rated), max(map(len, rated))], np.int32)
        for row, columns in enumerate(rated):
            padded[row, :len(columns)] = columns
        self._rated = tf.constant(padded)
        self._rated_counts = tf.constant([len(columns) for columns in rated], tf.int32)
        super().__init__(model, batch_size, seed, arm_features, name)

    def _keep_rewards(self, model: RatedCandidatesModel) -> None:
        self._rewards = tf.constant(model.rewards, tf.float64)

    def _candidate_rewards(self) -> tf.Tensor:
        return tf.gather(tf.gather(self._rewards, self._users), self._candidates, batch_dims=1)

    def _draw_candidates(self, generator: tf.random.Generator, users: tf.Tensor) -> tf.Tensor:
        # Uniform keys on a user's rated movies and -1 on the padding: the top k is a uniform
        # k-subset of what they rated.
        width = tf.shape(self._rated)[1]
        keys = generator.uniform([self._users_drawn, width])
        rated = tf.range(width)[tf.newaxis] < tf.gather(self._rated_counts, users)[:, tf.newaxis]
        positions = tf.math.top_k(tf.where(rated, keys, -1.0), k=self.reward_model.num_actions).indices
        return tf.gather(tf.gather(self._rated, users), positions, batch_dims=1)


def build(data, batch_size: int, seed: int, num_actions: int, rank_k: int, feature_share: float,
          split_seed: int, reward: str = "rating", liked_threshold: float = 4, num_movies: int | None = None,
          movie_selection: str = "first", arm_features: str = "interaction", reward_rank: int | None = None,
          delay: str = "none", delay_loops: int = 0, delay_longest: int | None = None, feedback_drop: float = 0.0,
          name: str = "movielens_ratings") -> MovieLensRatingsEnvironment:
    """The environment `conf/env/movielens_ratings.yaml` describes, over MovieLens `data`.
    `reward_rank`, which searches set to fix a simulator's ground truth, has no meaning here:
    the rewards are real ratings, the same for every rank_k. Tastes cannot drift here: real
    ratings have no model to turn."""
    feedback_delay = FeedbackDelay(delay, delay_loops, delay_longest, feedback_drop)
    model = build_rated_candidates_model(data.ratings_matrix(), num_actions, rank_k, feature_share, split_seed,
                                         reward, liked_threshold, num_movies, movie_selection)
    environment = MovieLensRatingsEnvironment(model, batch_size, seed, arm_features, name)
    environment.feedback_delay = feedback_delay
    return environment
