"""Per-arm MovieLens, with TF-Agents' `MovieLensPerArmPyEnvironment` semantics, in-graph.

Each round every user in the batch (drawn uniformly, with replacement, as TF-Agents does)
is offered `num_actions` distinct movies drawn uniformly from a pool of `num_movies`; the
agent observes the user's features (global) and each candidate's features (per arm) and
picks a position in the candidate list. Rewards come from the same SVD reward model as
`src.envs.movielens` (user and movie factors each carry sqrt of the singular values, so
the reward is their dot product; TF-Agents puts all of S on the user side). The sampler
is this instance's own seeded generator.

With `replica_seeds`, it is that many stationary environments side by side (src.replicas), as
`src.envs.movielens` is: replica r draws its users and their candidates from the generator of
the run of seed replica_seeds[r], and a step's batch holds each replica's rows after the last one's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import tensorflow as tf
from scipy.stats import hypergeom
from tf_agents.bandits.specs import utils as bandit_spec_utils
from tf_agents.specs import tensor_spec
from tf_agents.trajectories import time_step as ts

from src import metrics, seeding
from src.envs.base import Arrivals, FeedbackDelay, InGraphBandit, first_rating_order
from src.envs.movielens import (MOST_CELLS, RewardModel, build_reward_model, check_drift, fields_of, random_rotation,
                               rotation_parts)
from src.errors import require

# What a candidate shows the agent: its embedding, or also its elementwise product with the
# user's (the "hybrid" features of Li et al. 2010), with which a model linear in its inputs
# can represent the reward u . m itself, not only what is additive in u and m.
ARM_FEATURES = ("embedding", "interaction")
# Users a large pool's uniform-random regret is estimated from (`sorted_reward_rows`).
REGRET_USERS = 1_000
def expected_top_weights(pool: int, size: int, top: int) -> np.ndarray:
    """P(the m-th smallest of `pool` sorted values is among the `top` largest of a uniform
    `size`-subset), for m = 1..pool: it is drawn (size / pool), and fewer than `top` of the
    other size - 1 drawn come from the pool - m values above it (hypergeometric). With
    top = 1, the chance that it is the subset's best."""
    above = pool - np.arange(1, pool + 1)
    return size / pool * hypergeom.cdf(top - 1, pool - 1, above, size - 1)


@dataclass(frozen=True)
class CandidateSetRewardModel(RewardModel):
    """The reward model over the whole pool, offered `num_actions` movies at a time."""

    num_actions: int
    # Pool sizes over time when movies arrive (the first n columns available), equally spaced in
    # time from the first catalogue to the whole pool; empty: the whole pool throughout.
    arrival_sizes: tuple[int, ...] = ()

    @cached_property  # a model is fixed; a large pool's or a drift's regret takes a while
    def random_policy_regret(self) -> float:
        """Exact expected per-interaction regret of a uniform pick from a random candidate set:
        E[max over the set] (order statistics, see `expected_top_weights`) minus the pool mean;
        while movies arrive, averaged over the arrival period."""
        regrets = []
        for pool in self.arrival_sizes or (len(self.movie_ids),):
            rewards = sorted_reward_rows(self, pool)
            best = rewards @ expected_top_weights(pool, self.num_actions, 1)
            regrets.append(np.mean(best - rewards.mean(axis=1)))
        return float(np.mean(regrets))


def sorted_reward_rows(model: RewardModel, pool: int | None = None) -> np.ndarray:
    """Users' rewards over the first `pool` movies (all by default), each row sorted: every
    user's while the table fits in MOST_CELLS, else those of REGRET_USERS users drawn with a fixed
    seed (the mean over users is then an estimate)."""
    pool = len(model.movie_ids) if pool is None else pool
    if len(model.user_ids) * len(model.movie_ids) <= MOST_CELLS:
        return np.sort(model.rewards[:, :pool], axis=1)
    sample = np.random.default_rng(0).choice(len(model.user_ids), min(REGRET_USERS, len(model.user_ids)),
                                             replace=False)
    return np.sort(model.user_factors[sample] @ model.movie_factors[:pool].T, axis=1)


class MovieLensPerArmEnvironment(InGraphBandit):
    """Global user features plus the features of `num_actions` sampled candidate movies."""

    def __init__(self, model: CandidateSetRewardModel, batch_size: int, seed: int,
                 arm_features: str = "embedding", name: str = "movielens_per_arm", arrivals: Arrivals = Arrivals(),
                 drift: str = "none", drift_period: int | None = None, replica_seeds: Sequence[int] = ()):
        require(batch_size >= 1, "training.batch_size", batch_size, ">= 1")
        seeds = list(replica_seeds) or [seed]
        self.replicas = replicas = len(seeds)
        # config.can_share_ops keeps replicas to the stationary environment: time is each run's own.
        require(replicas == 1 or not (arrivals.active or drift != "none"), "training.replicas", replicas,
                "1 with env.arrivals or env.drift")
        self._arrivals, self._drift, self._drift_period = arrivals, drift, drift_period
        # Extra metrics only where these are on: the ranking subclass has its own.
        extras = (metrics.CATALOGUE_SIZE,) * arrivals.active + (metrics.BEST_MOVIE_MOVED,) * (drift != "none")
        if extras:
            self.extra_metric_names = extras
        self._steps = tf.Variable(tf.constant(0, tf.int64), trainable=False, name="steps")
        self._arrived = tf.Variable(tf.constant(0, tf.int32), trainable=False, name="arrived")
        if drift != "none":  # the step's rotation of the users' observed tastes, less the identity
            rank_k = model.rank_k
            self._turned = tf.Variable(tf.zeros([rank_k, rank_k], tf.float64), trainable=False, name="turned")
            paired, turn = rotation_parts(rank_k)
            self._paired, self._turn = tf.constant(paired), tf.constant(turn)
            self._switched = tf.constant(random_rotation(rank_k) - np.eye(rank_k))
        require(arm_features in ARM_FEATURES, "env.arm_features", arm_features, f"one of {', '.join(ARM_FEATURES)}")
        self._interaction = arm_features == "interaction"
        self.reward_model = model
        self._num_users, rank_k = model.user_features.shape
        self._num_movies = len(model.movie_ids)
        num_actions = model.num_actions
        observation_spec = {
            bandit_spec_utils.GLOBAL_FEATURE_KEY: tf.TensorSpec([rank_k], tf.float32),
            bandit_spec_utils.PER_ARM_FEATURE_KEY: tf.TensorSpec(
                [num_actions, 2 * rank_k if self._interaction else rank_k], tf.float32),
        }
        self._user_features = tf.constant(model.user_features, tf.float32)
        self._movie_features = tf.constant(model.movie_features, tf.float32)
        self._keep_rewards(model)
        self._generators = [seeding.stream(each, seeding.USERS) for each in seeds]
        self._users_drawn = batch_size  # each replica's
        self._users = tf.Variable(tf.zeros([replicas * batch_size], tf.int32), trainable=False, name="users")
        self._candidates = tf.Variable(
            tf.zeros([replicas * batch_size, num_actions], tf.int32), trainable=False, name="candidates")
        super().__init__(ts.time_step_spec(observation_spec, self._reward_spec()), self._action_spec(num_actions),
                         replicas * batch_size, name)

    @property
    def movies_arrived(self) -> int | None:
        return int(self._arrived.numpy()) if self._arrivals.active else None

    def _action_spec(self, num_actions: int):
        """A position in the candidate list."""
        return tensor_spec.BoundedTensorSpec((), tf.int32, minimum=0, maximum=num_actions - 1, name="action")

    def _reward_spec(self):
        return tf.TensorSpec([], tf.float32)

    def _observe(self):
        users, candidates = (tf.concat(parts, axis=0) for parts in zip(*map(self._draw, self._generators)))
        if self._drift != "none":
            self._turned.assign(self._rotation_less_identity(tf.cast(self._steps * self._users_drawn, tf.float64)))
        if self._arrivals.active or self._drift != "none":
            self._steps.assign_add(1)
        self._users.assign(users)
        self._candidates.assign(candidates)
        return self._features_of(users, candidates)

    def _features_of(self, users: tf.Tensor, candidates: tf.Tensor) -> dict:
        user_features = tf.gather(self._user_features, users)
        movie_features = tf.gather(self._movie_features, candidates)
        if self._interaction:
            movie_features = tf.concat([movie_features, movie_features * user_features[:, tf.newaxis]], axis=-1)
        return {
            bandit_spec_utils.GLOBAL_FEATURE_KEY: user_features,
            bandit_spec_utils.PER_ARM_FEATURE_KEY: movie_features,
        }

    def _draw(self, generator: tf.random.Generator) -> tuple[tf.Tensor, tf.Tensor]:
        """A run's users [batch] and their candidates [batch, num_actions], from its `generator`."""
        users = generator.uniform([self._users_drawn], maxval=self._num_users, dtype=tf.int32)
        return users, self._draw_candidates(generator, users)

    def _draw_candidates(self, generator: tf.random.Generator, users: tf.Tensor) -> tf.Tensor:
        """[batch, num_actions] distinct movie columns offered to each of `users`: a uniform
        k-subset of the movies arrived, in random order, like `random.sample`."""
        size = self.reward_model.num_actions
        if not self._arrivals.active:
            return self._uniform_subsets(generator, size, self._num_movies)
        interactions = self._steps * self._users_drawn  # before this step
        arrived = self._arrivals.arrived(interactions, self._num_movies)
        self._arrived.assign(arrived)
        return tf.cond(size * size > arrived, lambda: self._top_keys(generator, size, arrived),
                       lambda: self._drawn_without_repeats(generator, size, arrived))

    def _uniform_subsets(self, generator: tf.random.Generator, size: int, pool: int) -> tf.Tensor:
        if size * size > pool:  # repeats would be common: the top k of uniform keys
            return self._top_keys(generator, size, pool)
        return self._drawn_without_repeats(generator, size, pool)

    def _top_keys(self, generator: tf.random.Generator, size: int, pool) -> tf.Tensor:
        """The top k of uniform keys on the first `pool` movies (-1 on the rest)."""
        keys = generator.uniform([self._users_drawn, self._num_movies])
        if not isinstance(pool, int) or pool < self._num_movies:
            keys = tf.where(tf.range(self._num_movies)[tf.newaxis] < pool, keys, -1.0)
        return tf.math.top_k(keys, k=size).indices

    def _drawn_without_repeats(self, generator: tf.random.Generator, size: int, pool) -> tf.Tensor:
        """Few repeats (below 40% a row): draw k with replacement among the first `pool` movies
        and draw again the rows that repeat. Given no repeat, every ordered k-subset is equally
        likely. Keys for all the movies and their top k cost 5x more a round at 1,682 movies."""
        def draw():
            return generator.uniform([self._users_drawn, size], maxval=pool, dtype=tf.int32)

        def repeats(candidates):
            ordered = tf.sort(candidates, axis=1)
            return tf.reduce_any(ordered[:, 1:] == ordered[:, :-1], axis=1)

        def redraw(candidates):
            return tf.where(repeats(candidates)[:, tf.newaxis], draw(), candidates)

        return tf.while_loop(lambda candidates: tf.reduce_any(repeats(candidates)), redraw, [draw()])[0]

    def extra_metrics(self, action: tf.Tensor) -> tf.Tensor:
        """With arrivals, the catalogue's size at each interaction (movies arrived); with drift,
        whether the best candidate now is not the best without drift."""
        columns = []
        if self._arrivals.active:
            columns.append(tf.fill([self.batch_size], tf.cast(self._arrived, tf.float64)))
        if self._drift != "none":
            users = tf.gather(self._user_factors, self._users)
            movies = tf.gather(self._movie_factors, self._candidates)
            stationary = tf.einsum("br,bcr->bc", users, movies)
            moved = tf.argmax(stationary + self._drift_shift(users, movies), axis=1) != tf.argmax(stationary, axis=1)
            columns.append(tf.cast(moved, tf.float64))
        return tf.stack(columns, axis=1)

    def _rotation_less_identity(self, interactions: tf.Tensor) -> tf.Tensor:
        """R_t - I after `interactions` (`src.envs.movielens.rotation`, in-graph)."""
        if self._drift == "switch":
            regime = tf.math.floormod(tf.math.floordiv(interactions, self._drift_period), 2.0)
            return regime * self._switched
        angle = 2 * np.pi * interactions / self._drift_period
        return (tf.cos(angle) - 1) * self._paired + tf.sin(angle) * self._turn

    def _keep_rewards(self, model: CandidateSetRewardModel) -> None:
        self._user_factors = tf.constant(model.user_factors, tf.float64)
        self._movie_factors = tf.constant(model.movie_factors, tf.float64)

    def _candidate_rewards(self) -> tf.Tensor:
        """[batch, num_actions] float64 rewards of the current users' candidates, from the factors:
        no [users, pool] table, whose size would bound the pool."""
        users = tf.gather(self._user_factors, self._users)
        movies = tf.gather(self._movie_factors, self._candidates)
        rewards = tf.einsum("br,bcr->bc", users, movies)
        if self._drift == "none":
            return rewards
        return rewards + self._drift_shift(users, movies)

    def _drift_shift(self, users: tf.Tensor, movies: tf.Tensor) -> tf.Tensor:
        """x_u (R_t - I) m_k: what drift adds to each candidate's reward (`TimedRewardModel`)."""
        rank_k = self.reward_model.rank_k
        return tf.einsum("bk,kl,bcl->bc", users[:, :rank_k], self._turned, movies[:, :, :rank_k])

    def _apply_action(self, action: tf.Tensor) -> tf.Tensor:
        return tf.cast(self.outcome(action)[0], tf.float32)

    def outcome(self, action: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """(reward, optimal reward) among the current candidates, float64.

        Read between `reset()` and `step()`, like `MovieLensEnvironment.outcome`.
        """
        rewards = self._candidate_rewards()
        chosen = tf.gather(rewards, tf.cast(action, tf.int32), batch_dims=1)
        return chosen, tf.reduce_max(rewards, axis=1)


def build(data, batch_size: int, seed: int, num_actions: int, rank_k: int,
          num_movies: int | None = None, reward_rank: int | None = None,
          movie_selection: str = "first", arm_features: str = "embedding", delay: str = "none",
          delay_loops: int = 0, delay_longest: int | None = None, feedback_drop: float = 0.0,
          arrivals: str = "none", arrivals_start: int | None = None, arrivals_every: int | None = None,
          drift: str = "none", drift_period: int | None = None,
          name: str = "movielens_per_arm", replica_seeds: Sequence[int] = ()) -> MovieLensPerArmEnvironment:
    """The environment `conf/env/movielens_per_arm.yaml` describes, over MovieLens `data` (with
    `replica_seeds`, a replica's with each)."""
    feedback_delay = FeedbackDelay(delay, delay_loops, delay_longest, feedback_drop)
    check_drift(drift, drift_period, batch_size)
    ratings = data.ratings_matrix()
    pool = ratings.shape[1] if num_movies is None else num_movies
    require(isinstance(num_actions, int) and 2 <= num_actions <= pool, "env.num_actions", num_actions,
            f"an integer between 2 and env.num_movies={pool}")
    schedule = Arrivals(arrivals, arrivals_start, arrivals_every)
    schedule.check(num_actions, f"env.num_actions={num_actions} (a full candidate set)", pool, f"the pool's {pool} movies")
    model = build_reward_model(ratings, pool, rank_k, reward_rank, movie_selection)
    parts = fields_of(model)
    if schedule.active:  # the pool in arrival order: the first n columns are the movies arrived
        order = first_rating_order(data.ratings, model.movie_ids)
        parts.update(movie_ids=model.movie_ids[order], movie_factors=model.movie_factors[order],
                     arrival_sizes=schedule.sizes(pool))
    model = CandidateSetRewardModel(**parts, num_actions=num_actions)
    environment = MovieLensPerArmEnvironment(model, batch_size, seed, arm_features, name, schedule, drift, drift_period,
                                             replica_seeds)
    environment.feedback_delay = feedback_delay
    return environment
