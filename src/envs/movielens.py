"""MovieLens as a contextual bandit, with TF-Agents' `MovieLensPyEnvironment` semantics.

The ratings matrix (users x the chosen movies) is factorised by SVD; a user is observed
as `u[:, :k] * sqrt(s[:k])`, and recommending movie j to user i earns the rank-R
reconstruction of the rating, `(U_R sqrt(S_R)) (sqrt(S_R) V_R^T)[i, j]`. TF-Agents ties
R to k; here the ground truth rank `reward_rank` is separate, so a sweep over the
observation rank `rank_k` compares agents on the same rewards, each seeing the first k
components. Sampling and rewards are TensorFlow ops, so a whole training loop compiles
into one graph; the sampler is this instance's own seeded generator, not the global
`random` TF-Agents' version shares with everything else.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, fields
from functools import cached_property
from typing import ClassVar

import numpy as np
import tensorflow as tf
from scipy import sparse
from scipy.sparse.linalg import svds
from tf_agents.specs import tensor_spec
from tf_agents.trajectories import time_step as ts

from src import metrics, seeding
from src.envs.base import Arrivals, FeedbackDelay, InGraphBandit, first_rating_order
from src.errors import require

MOVIE_SELECTIONS = ("first", "most_rated")
DRIFTS = ("none", "rotate", "switch")
# The second taste regime of drift=switch is one fixed random rotation, the same for every run
# and agent, so that their regrets compare on the same drift.
SWITCH_SEED = 0
# Beyond this many cells LAPACK's full SVD takes minutes: see `factorise`.
DENSE_SVD_CELLS = 4_000_000
# Full SVDs kept by the content of their matrix (`dense_svd`).
DENSE_SVDS_KEPT = 4
_dense_svds: OrderedDict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = OrderedDict()
_dense_svds_lock = threading.Lock()
# The most cells of a dense [users, movies] table of float64 an environment makes (1.6 GB).
MOST_CELLS = 200_000_000
# Angles over a rotation's cycle at which its uniform-random regret is averaged.
ROTATION_SAMPLES = 64
UNLOGGED_IN_TIME = ("a round happens at a time (tastes that drift, movies that arrive) that off-policy evaluation, "
                    "replaying it against the reward model, would need and the log does not keep")


@dataclass(frozen=True)
class RewardModel:
    """The ground truth the simulator samples from (NumPy, float64); a
    `src.envs.base.CompleteRewardModel`."""

    user_ids: np.ndarray  # [users] MovieLens user ids behind each row
    movie_ids: np.ndarray  # [actions] MovieLens item ids behind each action
    user_factors: np.ndarray  # [users, reward_rank] the users' side of the factorisation
    movie_factors: np.ndarray  # [actions, reward_rank] the movies' side
    rank_k: int  # how many of the factors the agent observes
    # Every user who rated a chosen movie is kept (those who rated none carry no signal).
    skipped_users: ClassVar[None] = None

    @property
    def user_features(self) -> np.ndarray:
        """[users, rank_k] what the agent observes."""
        return self.user_factors[:, :self.rank_k]

    @property
    def movie_features(self) -> np.ndarray:
        return self.movie_factors[:, :self.rank_k]

    @cached_property
    def rewards(self) -> np.ndarray:
        """[users, actions] reconstructed ratings, made when first read: environments whose
        candidates come from a large pool compute only the candidates' rewards, from the factors."""
        require(self.user_factors.shape[0] * self.movie_factors.shape[0] <= MOST_CELLS, "env.num_movies",
                len(self.movie_ids), f"small enough for a dense rewards table: {len(self.user_ids):,} users x "
                f"{len(self.movie_ids):,} movies is more than {MOST_CELLS:,} cells; draw candidates from a large "
                f"pool with env=movielens_per_arm")
        return self.user_factors @ self.movie_factors.T

    @property
    def optimal_reward(self) -> np.ndarray:
        return self.rewards.max(axis=1)

    def value_of(self, choices: np.ndarray) -> float:
        """Exact mean reward of a deterministic policy picking `choices[u]` for each user row u,
        users drawn uniformly as the environment draws them."""
        return float(self.rewards[np.arange(len(choices)), choices].mean())

    @cached_property  # a model is fixed; a large pool's or a drift's regret takes a while
    def random_policy_regret(self) -> float:
        """Expected per-interaction regret of picking movies uniformly at random."""
        return float(np.mean(self.optimal_reward - self.rewards.mean(axis=1)))


def fields_of(model) -> dict:
    """A reward model's fields, to build a richer one from it (`vars` would copy cached tables too)."""
    return {field.name: getattr(model, field.name) for field in fields(model)}


def select_movies(ratings_matrix: sparse.csr_array, num_movies: int, selection: str) -> np.ndarray:
    """Column indices of the movies that form the action set, in ascending id order."""
    if selection == "first":
        return np.arange(num_movies)
    counts = np.bincount(ratings_matrix.indices, minlength=ratings_matrix.shape[1])
    return np.sort(np.argsort(-counts, kind="stable")[:num_movies])


def is_dense_svd(shape: tuple[int, int]) -> bool:
    return shape[0] * shape[1] <= DENSE_SVD_CELLS


def factorise(matrix: sparse.csr_array | np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """User and movie factors of the rank-`rank` SVD of `matrix`, each carrying the square root
    of the singular values, so that their products reconstruct it. LAPACK's full SVD up to
    DENSE_SVD_CELLS users x movies (MovieLens 100K has 1.6 million); beyond, ARPACK's truncated SVD of the sparse matrix (the
    same factors to its tolerance, up to each component's sign) in time and memory linear in
    the ratings: MovieLens 25M's 162,541 x 62,423 would be 80 GB dense."""
    if is_dense_svd(matrix.shape):
        u, s, vh = dense_svd(matrix.toarray() if sparse.issparse(matrix) else matrix)
    else:
        # A fixed start vector: the same data gives the same factors, signs included.
        start = np.random.default_rng(0).uniform(-1, 1, min(matrix.shape))
        u, s, vh = svds(sparse.csr_array(matrix), k=rank, v0=start, solver="arpack")
        u, s, vh = u[:, ::-1], s[::-1], vh[::-1]  # ARPACK's come in ascending order
    root_s = np.sqrt(s[:rank])
    return u[:, :rank] * root_s, vh[:rank].T * root_s


def dense_svd(dense: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """LAPACK's thin SVD of `dense`, read-only, kept for the DENSE_SVDS_KEPT matrices last asked
    for: a process that builds many environments on the same ratings (a leaderboard's or a sweep's
    worker, a replica group, every rank of a rank sweep, each a truncation of the one SVD)
    factorises them once. The SVD of MovieLens 100K's 943 users x 1,682 movies took 1.5-6 s a run
    on 2 cores; the same numbers come back, to the bit."""
    key = hashlib.sha256(np.ascontiguousarray(dense).tobytes()).hexdigest() + str(dense.shape) + str(dense.dtype)
    with _dense_svds_lock:
        if key in _dense_svds:
            _dense_svds.move_to_end(key)
            return _dense_svds[key]
    factors = np.linalg.svd(dense, full_matrices=False)
    for factor in factors:
        factor.setflags(write=False)
    with _dense_svds_lock:
        _dense_svds[key] = factors
        while len(_dense_svds) > DENSE_SVDS_KEPT:
            _dense_svds.popitem(last=False)
    return factors


def build_reward_model(
    ratings_matrix: sparse.csr_array, num_movies: int, rank_k: int, reward_rank: int | None,
    movie_selection: str = "first",
) -> RewardModel:
    """Factorise the ratings of the chosen movies as TF-Agents' MovieLens environment does."""
    reward_rank = rank_k if reward_rank is None else reward_rank
    require(movie_selection in MOVIE_SELECTIONS, "env.movie_selection", movie_selection,
            f"one of {', '.join(MOVIE_SELECTIONS)}")
    require(2 <= num_movies <= ratings_matrix.shape[1], "env.num_movies", num_movies,
            f"between 2 and the {ratings_matrix.shape[1]} movies in the data")
    columns = select_movies(ratings_matrix, num_movies, movie_selection)
    matrix = sparse.csr_array(ratings_matrix[:, columns])
    # Users who rated none of the chosen movies carry no signal (TF-Agents drops them too).
    rows = np.flatnonzero(np.diff(matrix.indptr) > 0)
    matrix = matrix[rows]
    largest_rank = min(matrix.shape) - (not is_dense_svd(matrix.shape))  # ARPACK finds fewer than all
    require(rank_k >= 1, "env.rank_k", rank_k, "an integer >= 1")
    require(rank_k <= min(reward_rank, largest_rank), "env.rank_k", rank_k,
            f"between 1 and env.reward_rank={reward_rank}, at most {largest_rank} (users, movies: {matrix.shape})")
    require(reward_rank <= largest_rank, "env.reward_rank", reward_rank,
            f"at most {largest_rank} (users, movies: {matrix.shape})")
    user_factors, movie_factors = factorise(matrix, reward_rank)
    return RewardModel(user_ids=rows + 1, movie_ids=columns + 1, user_factors=user_factors,
                       movie_factors=movie_factors, rank_k=rank_k)


class MovieLensEnvironment(InGraphBandit):
    """Each step samples `batch_size` distinct users; the reward is the reconstructed rating.

    With `replica_seeds`, it is that many environments side by side (src.replicas): replica r
    draws its `batch_size` users from the generator of the run of seed replica_seeds[r], and a
    step's batch holds each replica's users after the last one's.

    With `arrivals` (the model's movies in arrival order) the catalogue grows: an observation is
    (user features, action mask) as TF-Agents' masked agents take it, the mask 1 on the movies
    arrived, and the best movie, which regret is measured against, is the best arrived."""

    logged_round_kind = "movie"
    # Whether the users' tastes drift (DriftingMovieLensEnvironment); with drift or arrivals the
    # environment counts its steps, its time.
    drifts = False

    def __init__(self, model: RewardModel, batch_size: int, seed: int, name: str = "movielens",
                 replica_seeds: Sequence[int] = (), arrivals: Arrivals = Arrivals()):
        num_users, rank_k = model.user_features.shape
        require(1 <= batch_size <= num_users, "training.batch_size", batch_size,
                f"between 1 and the {num_users} users in the environment")
        seeds = list(replica_seeds) or [seed]
        self.replicas = replicas = len(seeds)
        self.reward_model = model
        num_movies = len(model.movie_ids)
        observation_spec = tf.TensorSpec([rank_k], tf.float32, name="observation")
        self._arrivals = arrivals
        if arrivals.active:
            self.logged_round_kind = None
            self.unlogged_because = UNLOGGED_IN_TIME
            self.extra_metric_names = (metrics.CATALOGUE_SIZE,)
            mask_spec = tensor_spec.BoundedTensorSpec([num_movies], tf.int32, minimum=0, maximum=1, name="mask")
            observation_spec = (observation_spec, mask_spec)
            self._arrived = tf.Variable(tf.constant(arrivals.start, tf.int32), trainable=False, name="arrived")
        self._steps = tf.Variable(tf.constant(0, tf.int64), trainable=False, name="steps")
        action_spec = tensor_spec.BoundedTensorSpec((), tf.int32, minimum=0, maximum=num_movies - 1, name="action")
        self._num_users = num_users
        self._features = tf.constant(model.user_features, tf.float32)
        self._rewards = tf.constant(model.rewards, tf.float64)
        self._optimal_reward = tf.constant(model.optimal_reward, tf.float64)
        self._generators = [seeding.stream(each, seeding.USERS) for each in seeds]
        self._users_drawn = batch_size
        self._users = tf.Variable(tf.zeros([replicas * batch_size], tf.int32), trainable=False, name="users")
        super().__init__(ts.time_step_spec(observation_spec), action_spec, replicas * batch_size, name)

    @property
    def users(self) -> tf.Variable:
        """The reward model's rows of the users observed at the last `reset()`."""
        return self._users

    def _observe(self) -> tf.Tensor:
        # Distinct users within a batch, like TF-Agents' `random.sample`.
        if self.replicas == 1:
            users = tf.math.top_k(self._generators[0].uniform([self._num_users]), k=self._users_drawn).indices
        else:
            keys = tf.stack([generator.uniform([self._num_users]) for generator in self._generators])
            users = tf.reshape(tf.math.top_k(keys, k=self._users_drawn).indices, [-1])
        self._users.assign(users)
        features = tf.gather(self._features, users)
        if not (self.drifts or self._arrivals.active):
            return features
        interactions = self._steps * self._users_drawn  # each replica's, before this step
        self._steps.assign_add(1)
        self._at_time(interactions)
        if not self._arrivals.active:
            return features
        mask = tf.cast(tf.range(len(self.reward_model.movie_ids)) < self._arrived, tf.int32)
        return features, tf.broadcast_to(mask, [self.batch_size, tf.size(mask)])

    @property
    def movies_arrived(self) -> int | None:
        return int(self._arrived.numpy()) if self._arrivals.active else None

    def _at_time(self, interactions: tf.Tensor) -> None:
        """Bring the environment to its state after `interactions` (int64), for the step's users."""
        if self._arrivals.active:
            self._arrived.assign(self._arrivals.arrived(interactions, len(self.reward_model.movie_ids)))

    def _best(self, rewards: tf.Tensor) -> tf.Tensor:
        """[batch] the best of each row of `rewards` [batch, movies] among the movies arrived."""
        if self._arrivals.active:
            rewards = rewards[:, :self._arrived]
        return tf.reduce_max(rewards, axis=1)

    def _apply_action(self, action: tf.Tensor) -> tf.Tensor:
        return tf.cast(self._rewards_of(action), tf.float32)

    def _rewards_of(self, action: tf.Tensor) -> tf.Tensor:
        indices = tf.stack([self._users, tf.cast(action, tf.int32)], axis=-1)
        return tf.gather_nd(self._rewards, indices)

    def outcome(self, action: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """(reward, optimal reward) for the current users, in float64.

        Read between `reset()` and `step()`: it describes the users the policy just saw,
        which is what a regret metric needs (TF-Agents' own metric reads the previous
        users through a `py_function` that a compiled graph does not order).
        """
        if self._arrivals.active:
            return self._rewards_of(action), self._best(tf.gather(self._rewards, self._users))
        return self._rewards_of(action), tf.gather(self._optimal_reward, self._users)

    def extra_metrics(self, action: tf.Tensor) -> tf.Tensor:
        """[batch, 1] the catalogue's size (movies arrived) at each interaction."""
        return tf.fill([self.batch_size, 1], tf.cast(self._arrived, tf.float64))


def rotation(drift: str, rank: int, interactions: float, period: int, switched: np.ndarray) -> np.ndarray:
    """[rank, rank] the rotation of the users' observed tastes after `interactions` (NumPy, for
    the tests and the random policy's regret; `DriftingMovieLensEnvironment._at_time` in-graph)."""
    if drift == "switch":
        return switched if (interactions // period) % 2 else np.eye(rank)
    angle = 2 * np.pi * interactions / period
    paired, turn = rotation_parts(rank)
    return np.eye(rank) + (np.cos(angle) - 1) * paired + np.sin(angle) * turn


def rotation_parts(rank: int) -> tuple[np.ndarray, np.ndarray]:
    """The rotation by an angle a is I + (cos a - 1) paired + sin a turn: dimensions (0, 1),
    (2, 3), ... turn together in their plane; an odd last one stays."""
    paired, turn = np.zeros((rank, rank)), np.zeros((rank, rank))
    for first in range(0, rank - 1, 2):
        paired[first, first] = paired[first + 1, first + 1] = 1.0
        turn[first, first + 1], turn[first + 1, first] = -1.0, 1.0
    return paired, turn


def random_rotation(rank: int) -> np.ndarray:
    """A uniformly random rotation: the QR of a Gaussian matrix with its signs fixed (Haar over
    the orthogonal matrices), a reflection turned into a rotation."""
    q, r = np.linalg.qr(np.random.default_rng(SWITCH_SEED).standard_normal((rank, rank)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


@dataclass(frozen=True)
class TimedRewardModel(RewardModel):
    """The reward model without drift or arrivals, and what time changes.

    Drift: user u's taste x_u (its first rank_k factors, what the agent observes) is x_u R_t at
    time t, so the reward of movie m is rewards[u, m] + x_u (R_t - I) m_k. The agent keeps
    observing x_u: the mapping from what it sees to what it earns changes. `rewards` stay the
    stationary ones (what nothing but the training loop reads).

    Arrivals: the movies are in arrival order, the catalogue growing through `arrival_sizes`
    (equally spaced in time; empty: every movie throughout)."""

    drift: str = "none"
    period: int = 1  # interactions per rotation (rotate) or between switches (switch)
    arrival_sizes: tuple[int, ...] = ()

    def rewards_at(self, interactions: float) -> np.ndarray:
        """[users, movies] the rewards after `interactions`."""
        if self.drift == "none":
            return self.rewards
        rank = self.user_features.shape[1]
        turned = rotation(self.drift, rank, interactions, self.period,
                          random_rotation(rank) if self.drift == "switch" else None)
        shift = (self.user_features @ turned - self.user_features) @ self.movie_features.T
        return self.rewards + shift

    @cached_property  # a model is fixed; a large pool's or a drift's regret takes a while
    def random_policy_regret(self) -> float:
        """A uniform pick's expected regret against the best movie at the time, averaged over the
        drift's cycle (its two regimes, or ROTATION_SAMPLES angles of a rotation) and over the
        arrival period's catalogues (exact for each alone; with both, the two averaged as if
        independent, an approximation for the plot's reference line)."""
        if self.drift == "switch":
            times = [0, self.period]
        elif self.drift == "rotate":
            times = np.arange(ROTATION_SAMPLES) * self.period / ROTATION_SAMPLES
        else:
            times = [0]
        sizes = self.arrival_sizes or (len(self.movie_ids),)
        regrets = [np.mean(rewards[:, :size].max(axis=1) - rewards[:, :size].mean(axis=1))
                   for rewards in map(self.rewards_at, times) for size in sizes]
        return float(np.mean(regrets))


class DriftingMovieLensEnvironment(MovieLensEnvironment):
    """`MovieLensEnvironment` whose users' tastes drift (`TimedRewardModel`); each step's
    rewards are those of its time, its regret dynamic regret. The drift is a function of the
    interactions so far, counted from the environment's own steps."""

    logged_round_kind = None
    unlogged_because = UNLOGGED_IN_TIME
    drifts = True

    def __init__(self, model: TimedRewardModel, batch_size: int, seed: int, name: str = "movielens",
                 arrivals: Arrivals = Arrivals()):
        super().__init__(model, batch_size, seed, name, arrivals=arrivals)
        self.extra_metric_names = (*self.extra_metric_names, metrics.BEST_MOVIE_MOVED)
        self._drift, self._period = model.drift, model.period
        rank = model.user_features.shape[1]
        if model.drift == "switch":  # two regimes: both reward tables at hand, a step reads one
            self._regimes = tf.constant(np.stack([model.rewards_at(0), model.rewards_at(model.period)]))
        else:
            self._user_factors = tf.constant(model.user_features, tf.float64)
            self._movie_factors = tf.constant(model.movie_features, tf.float64)
            paired, turn = rotation_parts(rank)
            self._paired, self._turn = tf.constant(paired), tf.constant(turn)
        self._stationary_best = tf.constant(np.argmax(model.rewards, axis=1), tf.int32)
        # The step's users' rewards at its time, computed once as they are drawn: the outcome and
        # the metrics read them (each of a step's ops costs ~1 us, a loop at 20 movies ~250 us).
        self._now = tf.Variable(tf.zeros([batch_size, len(model.movie_ids)], tf.float64), trainable=False, name="now")

    def _at_time(self, interactions: tf.Tensor) -> None:
        super()._at_time(interactions)
        interactions = tf.cast(interactions, tf.float64)
        if self._drift == "switch":
            regime = tf.cast(tf.math.floormod(tf.math.floordiv(interactions, self._period), 2.0), tf.int32)
            rows = tf.stack([tf.fill([self.batch_size], regime), self._users], axis=1)
            self._now.assign(tf.gather_nd(self._regimes, rows))
        else:
            angle = 2 * np.pi * interactions / self._period
            turned = (tf.cos(angle) - 1) * self._paired + tf.sin(angle) * self._turn  # the rotation less I
            tastes = tf.gather(self._user_factors, self._users)
            shift = tf.matmul(tf.matmul(tastes, turned), self._movie_factors, transpose_b=True)
            self._now.assign(tf.gather(self._rewards, self._users) + shift)

    def _rewards_of(self, action: tf.Tensor) -> tf.Tensor:
        return tf.gather(self._now, tf.cast(action, tf.int32), batch_dims=1)

    def outcome(self, action: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        rewards = self._now.read_value()
        return tf.gather(rewards, tf.cast(action, tf.int32), batch_dims=1), self._best(rewards)

    def extra_metrics(self, action: tf.Tensor) -> tf.Tensor:
        """[batch, 1] whether the user's best movie now is not their best without drift (among the
        movies arrived), after the catalogue's size with arrivals."""
        now = self._now.read_value()
        if self._arrivals.active:
            stationary = tf.argmax(tf.gather(self._rewards, self._users)[:, :self._arrived], axis=1, output_type=tf.int32)
            now = now[:, :self._arrived]
        else:
            stationary = tf.gather(self._stationary_best, self._users)
        moved = tf.cast(tf.argmax(now, axis=1, output_type=tf.int32) != stationary, tf.float64)[:, None]
        if self._arrivals.active:
            return tf.concat([super().extra_metrics(action), moved], axis=1)
        return moved


def check_drift(drift: str, period: int | None, batch_size: int) -> None:
    require(drift in DRIFTS, "env.drift", drift, f"one of {', '.join(DRIFTS)}")
    require(drift == "none" or (isinstance(period, int) and period >= batch_size), "env.drift_period",
            period, f"an integer number of interactions, at least training.batch_size={batch_size}")


def build(data, batch_size: int, seed: int, num_movies: int, rank_k: int,
          reward_rank: int | None = None, movie_selection: str = "first", drift: str = "none",
          drift_period: int | None = None, delay: str = "none", delay_loops: int = 0, delay_longest: int | None = None,
          feedback_drop: float = 0.0, arrivals: str = "none", arrivals_start: int | None = None,
          arrivals_every: int | None = None, name: str = "movielens",
          replica_seeds: Sequence[int] = ()) -> MovieLensEnvironment:
    """The environment the `env` config group describes, over parsed MovieLens `data` (replicas
    of these seeds side by side, stationary)."""
    feedback_delay = FeedbackDelay(delay, delay_loops, delay_longest, feedback_drop)
    check_drift(drift, drift_period, batch_size)
    schedule = Arrivals(arrivals, arrivals_start, arrivals_every)
    schedule.check(1, "1 (a catalogue with a movie to recommend)", num_movies, f"env.num_movies={num_movies}")
    model = build_reward_model(data.ratings_matrix(), num_movies, rank_k, reward_rank, movie_selection)
    if drift == "none" and not schedule.active:
        environment = MovieLensEnvironment(model, batch_size, seed, name, replica_seeds)
    else:
        parts = fields_of(model)
        if schedule.active:  # in arrival order: the movies arrived are the first columns
            order = first_rating_order(data.ratings, model.movie_ids)
            parts.update(movie_ids=model.movie_ids[order], movie_factors=model.movie_factors[order],
                         arrival_sizes=schedule.sizes(num_movies))
        timed = TimedRewardModel(**parts, drift=drift, period=drift_period or 1)
        if drift == "none":
            environment = MovieLensEnvironment(timed, batch_size, seed, name, replica_seeds, schedule)
        else:
            environment = DriftingMovieLensEnvironment(timed, batch_size, seed, name, schedule)
    environment.feedback_delay = feedback_delay
    return environment
