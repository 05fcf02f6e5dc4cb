"""MovieLens replayed in its own time order (env=movielens_timeline), per-arm.

The ratings are sorted by timestamp. The first `history_share` of them are the past when the
replay starts; from there each interaction is the next rating's user, arriving when they really
rated, offered `num_actions` candidates among the movies rated at least once by then (a movie
arrives with its first rating). Features and rewards come from the rank-`reward_rank` SVD of the
ratings before the last refit, made again every `refit_every` interactions: nothing from the
future reaches them. A user's factors are folded in from all their ratings before the
interaction, the fit's movie factors fixed (least squares: for a rating row r and movie factors
V, r V (V'V)^-1, which is the fit's own user factor for a user in the fit), so a user who rated
minutes ago is known though the fit is older: MovieLens users rate in sessions, and 78% of the
second half's ratings of 100K come from users with no rating before a fit 5,000 ratings old.
A step's `batch_size` rounds happen at once, among the movies rated before its first one, and
its ratings are revealed after it. A user's first rating and a movie without a rating before the
fit are cold starts: zero factors, every candidate earning 0 for such a user, a new movie 0 for
everyone. Each fit is turned onto the previous one (orthogonal Procrustes on the
movies' factors; their products, the rewards, do not change), so features keep their meaning
for an agent across refits as far as the data allow. Regret is against the best candidate under
the current fit. Fits run between the compiled steps (`tf.numpy_function`), rarely.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np
import tensorflow as tf
from tf_agents.bandits.specs import utils as bandit_spec_utils
from scipy import sparse
from scipy.linalg import orthogonal_procrustes

from src.envs.movielens import factorise, is_dense_svd
from src.envs.movielens_per_arm import CandidateSetRewardModel, MovieLensPerArmEnvironment
from src.errors import UserError, require

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Timeline:
    """The ratings in time order, movies numbered in the order they arrive (NumPy)."""

    users: np.ndarray  # [events] the rater's row
    movies: np.ndarray  # [events] the movie's column: columns 0..n-1 are the first n movies to arrive
    stars: np.ndarray  # [events]
    user_ids: np.ndarray  # [users] MovieLens ids of the rows
    movie_ids: np.ndarray  # [movies] MovieLens ids of the columns
    arrived: np.ndarray  # [events] movies rated at least once up to and including each event

    @classmethod
    def of(cls, ratings) -> Timeline:
        """From a ratings table (user_id, item_id, rating, timestamp), sorted by time (stable)."""
        ordered = ratings.sort_values("timestamp", kind="stable")
        user_ids, users = np.unique(ordered.user_id.to_numpy(), return_inverse=True)
        items = ordered.item_id.to_numpy()
        movie_ids, first_event = np.unique(items, return_index=True)  # ids sorted, each's first event
        arrival_order = np.argsort(first_event, kind="stable")
        column_of = np.empty(len(movie_ids), np.int64)
        column_of[arrival_order] = np.arange(len(movie_ids))
        movies = column_of[np.searchsorted(movie_ids, items)]
        arrived = np.maximum.accumulate(movies) + 1  # columns arrive in order: the largest seen + 1
        return cls(users, movies, ordered.rating.to_numpy(np.float64), user_ids, movie_ids[arrival_order], arrived)

    def fit(self, before: int, rank: int, previous: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The rank-`rank` SVD of the ratings of events 0..before-1, turned onto the `previous`
        movie factors when given: (movie factors, each user's sum of rating x movie factors over
        those events, the inverse of the movie factors' Gram matrix), what folding in needs."""
        past = sparse.csr_array((self.stars[:before], (self.users[:before], self.movies[:before])),
                                shape=(len(self.user_ids), len(self.movie_ids)))
        _, movie_factors = factorise(past, rank)
        if previous is not None:
            turn, _ = orthogonal_procrustes(movie_factors, previous)
            movie_factors = movie_factors @ turn
        sums = np.zeros((len(self.user_ids), rank))
        np.add.at(sums, self.users[:before], self.stars[:before, None] * movie_factors[self.movies[:before]])
        return movie_factors, sums, np.linalg.pinv(movie_factors.T @ movie_factors)


class MovieLensTimelineEnvironment(MovieLensPerArmEnvironment):
    """Per-arm rounds in the data's time order, from factors refitted on the past."""

    def __init__(self, timeline: Timeline, model: CandidateSetRewardModel, fitted: tuple, start: int,
                 refit_every: int, batch_size: int, seed: int, arm_features: str, name: str):
        super().__init__(model, batch_size, seed, arm_features, name)
        self._timeline, self._start, self._refit_every = timeline, start, refit_every
        self.interactions_available = len(timeline.users) - start
        self._event_users = tf.constant(timeline.users, tf.int32)
        self._event_movies = tf.constant(timeline.movies, tf.int32)
        self._event_stars = tf.constant(timeline.stars, tf.float64)
        self._event_arrived = tf.constant(timeline.arrived, tf.int32)
        movie_factors, sums, gram_inverse = fitted
        # The fit's tables change at each refit: variables, where the stationary env has constants.
        self._movie_factors = tf.Variable(movie_factors, trainable=False, name="movie_factors")
        self._movie_features = tf.Variable(movie_factors[:, :model.rank_k].astype(np.float32), trainable=False,
                                           name="movie_features")
        self._sums = tf.Variable(sums, trainable=False, name="sums")
        self._gram_inverse = tf.Variable(gram_inverse, trainable=False, name="gram_inverse")
        self._step_users = tf.Variable(tf.zeros([batch_size, movie_factors.shape[1]], tf.float64), trainable=False,
                                       name="step_users")
        self._events = tf.Variable(tf.constant(0, tf.int64), trainable=False, name="events")
        self._fitted_at = tf.Variable(tf.constant(start, tf.int64), trainable=False, name="fitted_at")

    @property
    def reward_model(self) -> CandidateSetRewardModel:
        """The last fit, every user folded in from the ratings replayed so far, as a model of the
        whole pool (what a saved policy's catalogue is built from); in a graph, the first fit,
        whose sizes (all a step reads of it) are the same."""
        if not tf.executing_eagerly():
            return self._first_fit
        return replace(self._first_fit, user_factors=(self._sums @ self._gram_inverse).numpy(),
                       movie_factors=self._movie_factors.numpy())

    @reward_model.setter
    def reward_model(self, model: CandidateSetRewardModel) -> None:
        self._first_fit = model

    def _observe(self):
        done = self._events.read_value()  # interactions replayed before this step
        refit = done // self._refit_every > (self._fitted_at - self._start) // self._refit_every
        tf.cond(refit, lambda: self._refit(self._start + done), self._reveal_last_step)
        rows = self._start + done + tf.range(self.batch_size, dtype=tf.int64)
        users = tf.gather(self._event_users, rows)
        self._step_users.assign(tf.gather(self._sums, users) @ self._gram_inverse)
        # Before the step's first event: not even the movie its own rating is the first of.
        arrived = tf.gather(self._event_arrived, rows[0] - 1)
        size = self.reward_model.num_actions
        generator = self._generators[0]
        candidates = tf.cond(size * size > arrived, lambda: self._top_keys(generator, size, arrived),
                             lambda: self._drawn_without_repeats(generator, size, arrived))
        self._events.assign_add(self.batch_size)
        self._users.assign(users)
        self._candidates.assign(candidates)
        return self._features_of(users, candidates)

    def _reveal_last_step(self):
        """Fold the last step's real ratings into their users' sums (a refit counts them itself)."""
        done = self._events.read_value()
        rows = self._start + done - self.batch_size + tf.range(self.batch_size, dtype=tf.int64)
        shown = tf.gather(self._movie_factors, tf.gather(self._event_movies, rows))
        added = tf.gather(self._event_stars, rows)[:, None] * shown
        return tf.cond(done > 0, lambda: self._sums.scatter_nd_add(tf.gather(self._event_users, rows)[:, None], added).op,
                       tf.no_op)

    def _refit(self, before: tf.Tensor):
        movie_factors, sums, gram_inverse = tf.numpy_function(
            self._fit, [before, self._movie_factors], [tf.float64, tf.float64, tf.float64], stateful=True)
        rank_k = self.reward_model.rank_k
        movie_factors = tf.reshape(movie_factors, self._movie_factors.shape)
        return tf.group(self._movie_factors.assign(movie_factors),
                        self._movie_features.assign(tf.cast(movie_factors[:, :rank_k], tf.float32)),
                        self._sums.assign(tf.reshape(sums, self._sums.shape)),
                        self._gram_inverse.assign(tf.reshape(gram_inverse, self._gram_inverse.shape)),
                        self._fitted_at.assign(before))

    def _fit(self, before, previous):
        return self._timeline.fit(int(before), previous.shape[1], previous)

    def _features_of(self, users: tf.Tensor, candidates: tf.Tensor) -> dict:
        """As the per-arm environment's, the users' features folded in for this step."""
        user_features = tf.cast(self._step_users[:, :self.reward_model.rank_k], tf.float32)
        movie_features = tf.gather(self._movie_features, candidates)
        if self._interaction:
            movie_features = tf.concat([movie_features, movie_features * user_features[:, tf.newaxis]], axis=-1)
        return {bandit_spec_utils.GLOBAL_FEATURE_KEY: user_features,
                bandit_spec_utils.PER_ARM_FEATURE_KEY: movie_features}

    def _candidate_rewards(self) -> tf.Tensor:
        movies = tf.gather(self._movie_factors, self._candidates)
        return tf.einsum("br,bcr->bc", self._step_users, movies)


def build(data, batch_size: int, seed: int, num_actions: int, rank_k: int, history_share: float,
          refit_every: int, num_movies: int | None = None, reward_rank: int | None = None,
          arm_features: str = "interaction", name: str = "movielens_timeline") -> MovieLensTimelineEnvironment:
    """The environment `conf/env/movielens_timeline.yaml` describes, over MovieLens `data`."""
    ratings = data.ratings
    if num_movies is not None:
        require(isinstance(num_movies, int) and 2 <= num_movies <= data.num_movies, "env.num_movies", num_movies,
                f"null or between 2 and the {data.num_movies} movies in the data")
        ratings = ratings[ratings.item_id <= num_movies]
    if ratings.timestamp.nunique() < 2:
        raise UserError(f"env=movielens_timeline replays ratings in time order, but the {len(ratings):,} "
                        f"ratings of this data have no timestamps (one value): pick data with a timestamp column")
    require(isinstance(history_share, float) and 0 < history_share < 1, "env.history_share", history_share,
            "a share in (0, 1): the ratings that are the past when the replay starts")
    require(isinstance(refit_every, int) and refit_every >= batch_size, "env.refit_every", refit_every,
            f"an integer number of interactions, at least training.batch_size={batch_size}")
    reward_rank = rank_k if reward_rank is None else reward_rank
    timeline = Timeline.of(ratings)
    start = int(history_share * len(timeline.users))
    require(start >= 1, "env.history_share", history_share, f"large enough to hold a rating of the {len(timeline.users)}")
    history = timeline.arrived[start - 1]
    require(isinstance(num_actions, int) and 2 <= num_actions <= history, "env.num_actions", num_actions,
            f"an integer between 2 and the {history} movies rated in the history (env.history_share={history_share})")
    shape = (len(timeline.user_ids), len(timeline.movie_ids))
    largest = min(shape) - (not is_dense_svd(shape))  # ARPACK finds fewer than all
    require(isinstance(rank_k, int) and rank_k >= 1, "env.rank_k", rank_k, "an integer >= 1")
    require(rank_k <= reward_rank <= largest, "env.rank_k", rank_k,
            f"between 1 and env.reward_rank={reward_rank}, at most {largest}")
    log.info("Timeline: %s ratings, the first %s the history; a refit every %s interactions", f"{len(timeline.users):,}",
             f"{start:,}", f"{refit_every:,}")
    fitted = timeline.fit(start, reward_rank, None)
    movie_factors, sums, gram_inverse = fitted
    model = CandidateSetRewardModel(user_ids=timeline.user_ids, movie_ids=timeline.movie_ids,
                                    user_factors=sums @ gram_inverse, movie_factors=movie_factors, rank_k=rank_k,
                                    num_actions=num_actions)
    return MovieLensTimelineEnvironment(timeline, model, fitted, start, refit_every, batch_size, seed, arm_features,
                                        name)
