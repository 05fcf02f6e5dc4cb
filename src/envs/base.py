"""The environment contract: what the engine and the rest of the project ask of an environment.

An environment is an `InGraphBandit`, a TF-Agents `BanditTFEnvironment` whose sampling and
rewards are TensorFlow ops, so that a whole training loop compiles into one graph. Its specs
say what it offers, as TF-Agents' agents read them: observations with per-arm features (a dict
holding `PER_ARM_FEATURE_KEY`, `src.agents.has_per_arm_features`), observations with an action
mask (a (features, mask) tuple, `src.agents.has_action_mask`: movies arriving, the first columns
first) and slates (an action of rank 1, `src.agents.is_slate`). What the specs do not say it declares as class attributes
(`logged_round_kind`). Its ground truth is its `reward_model`, a `RewardModel` in NumPy that
everything outside the engine reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import tensorflow as tf
from tf_agents.bandits.environments import bandit_tf_environment

from src.errors import require

DELAYS = ("none", "fixed", "geometric", "heavy")
# A heavy-tailed delay: this share of rewards waits HEAVY_SCALE times longer on average.
HEAVY_SHARE, HEAVY_SCALE = 0.1, 10
# A geometric delay waits over this many times its mean with chance about e^-LONGEST_MEANS.
LONGEST_MEANS = 10
ARRIVAL_ORDERS = ("none", "first_rating")
# Catalogue sizes over the arrival period at which a uniform pick's regret is averaged.
ARRIVAL_SAMPLES = 16


@runtime_checkable
class RewardModel(Protocol):
    """An environment's ground truth (NumPy, float64), as the run's tags and log lines
    (src.training), the served catalogue (src.serving.catalogue) and the interaction log
    (src.evaluation.interactions) read it."""

    user_ids: np.ndarray  # [users] MovieLens user ids behind each row
    # [movies] MovieLens item ids behind each column: the actions, or the pool candidates come from
    movie_ids: np.ndarray
    user_features: np.ndarray  # [users, rank_k] what the agent observes of each user
    movie_features: np.ndarray  # [movies, rank_k] the movies' side of the embedding
    rewards: np.ndarray  # [users, movies] each movie's reward to each user, NaN where there is none
    # Users with ratings that the environment leaves out for having too few of them, for the run's
    # tag; None where it has no such rule.
    skipped_users: int | None

    @property
    def random_policy_regret(self) -> float:
        """Expected per-interaction regret of picking uniformly at random."""


@runtime_checkable
class CompleteRewardModel(RewardModel, Protocol):
    """A reward for every user and movie, so that a policy choosing one movie per user has an
    exact value: what offline learning (src.evaluation.offline) and src.evaluate score against."""

    @property
    def optimal_reward(self) -> np.ndarray:
        """[users] each user's best reward."""

    def value_of(self, choices: np.ndarray) -> float:
        """Mean reward of picking movie `choices[u]` for user row u, users drawn uniformly."""


@dataclass(frozen=True)
class FeedbackDelay:
    """How many training loops after its own an interaction's reward reaches the agent: `fixed`
    `loops`; `geometric` with mean `loops` (0 with chance 1 / (loops + 1), each further loop with
    the rest); `heavy` that, but a HEAVY_SHARE of rewards with mean HEAVY_SCALE x loops. A
    reward that would wait longer than `longest` loops, and a `drop` share of them, never
    arrives (None: `loops` if fixed, else LONGEST_MEANS of the longest mean). The regret is
    charged when the movie is recommended, whenever its reward arrives."""

    kind: str = "none"
    loops: int = 0
    longest: int | None = None
    drop: float = 0.0

    def __post_init__(self):
        require(self.kind in DELAYS, "env.delay", self.kind, f"one of {', '.join(DELAYS)}")
        require(isinstance(self.loops, int) and self.loops >= (self.kind != "none"), "env.delay_loops", self.loops,
                "a whole number of training loops, >= 1 with a delay")
        if self.longest is None:
            mean = self.loops * (HEAVY_SCALE if self.kind == "heavy" else 1)
            object.__setattr__(self, "longest", self.loops if self.kind in ("none", "fixed") else LONGEST_MEANS * mean)
        require(isinstance(self.longest, int) and self.longest >= self.loops, "env.delay_longest", self.longest,
                f"a whole number of loops, at least env.delay_loops={self.loops}")
        require(0 <= self.drop < 1, "env.feedback_drop", self.drop, "in [0, 1)")

    @property
    def active(self) -> bool:
        return self.kind != "none" or self.drop > 0

    def sample(self, generator: tf.random.Generator, shape) -> tf.Tensor:
        """int64 delays in loops of `shape`, -1 where the reward never arrives."""
        if self.kind in ("none", "fixed"):
            delays = tf.fill(shape, tf.constant(self.loops, tf.int64))
        else:
            # Geometric on {0, 1, ...} with mean m: floor(log U / log(m / (m + 1))).
            uniform = generator.uniform(shape, minval=1e-300, maxval=1.0, dtype=tf.float64)
            scale = 1 / np.log(self.loops / (self.loops + 1))
            if self.kind == "heavy":
                longer = 1 / np.log(HEAVY_SCALE * self.loops / (HEAVY_SCALE * self.loops + 1))
                scale = tf.where(generator.uniform(shape, dtype=tf.float64) < HEAVY_SHARE, longer, scale)
            delays = tf.cast(tf.math.log(uniform) * scale, tf.int64)  # a cast truncates: the floor of >= 0
        lost = delays > self.longest
        if self.drop:
            lost = tf.logical_or(lost, generator.uniform(shape, dtype=tf.float64) < self.drop)
        return tf.where(lost, tf.constant(-1, tf.int64), delays)


@dataclass(frozen=True)
class Arrivals:
    """Movies joining the catalogue over time: with `order=first_rating` the movies arrive in the
    order of their first rating in the data, `start` of them at first, then one every `every`
    interactions. An environment keeps its movies in arrival order, so that the movies arrived
    are its first columns."""

    order: str = "none"
    start: int | None = None
    every: int | None = None

    def check(self, fewest: int, fewest_meaning: str, movies: int, movies_meaning: str) -> None:
        require(self.order in ARRIVAL_ORDERS, "env.arrivals", self.order, f"one of {', '.join(ARRIVAL_ORDERS)}")
        if not self.active:
            return
        require(isinstance(self.start, int) and fewest <= self.start <= movies, "env.arrivals_start", self.start,
                f"an integer between {fewest_meaning} and {movies_meaning}")
        require(isinstance(self.every, int) and self.every >= 1, "env.arrivals_every", self.every,
                "an integer >= 1 (interactions between two arrivals)")

    @property
    def active(self) -> bool:
        return self.order != "none"

    def arrived(self, interactions: tf.Tensor, movies: int) -> tf.Tensor:
        """int32, the movies arrived after `interactions` (int64)."""
        return tf.cast(tf.minimum(self.start + interactions // self.every, movies), tf.int32)

    def sizes(self, movies: int) -> tuple[int, ...]:
        """ARRIVAL_SAMPLES catalogue sizes equally spaced in time from the first catalogue to all `movies`."""
        return tuple(np.unique(np.linspace(self.start, movies, ARRIVAL_SAMPLES).round().astype(int)).tolist())


def first_rating_order(ratings, movie_ids: np.ndarray) -> np.ndarray:
    """The positions of `movie_ids` (ascending) in the order of their first rating in `ratings`
    (user_id, item_id, rating, timestamp), ties by id."""
    require(ratings.timestamp.nunique() >= 2, "env.arrivals", "first_rating",
            "none on data without timestamps (all ratings have one time): movies arrive by their first rating")
    first_rated = ratings.groupby("item_id").timestamp.min().reindex(movie_ids).to_numpy()
    return np.argsort(first_rated, kind="stable")


class InGraphBandit(bandit_tf_environment.BanditTFEnvironment):
    """What the engine (src.engine) calls, each step: `reset()`, which draws the step's users and
    returns their observations; `outcome(action)`, the reward earned and the best there was;
    `feedback(action, reward)`, what the agent learns from; `extra_metrics(action)` if there are
    `extra_metric_names`; and `users` when it records interactions. All of these describe the
    users of the last `reset()`; `step()` is never called. Each loop, `training_experience`
    turns the loop's transitions into what the agent trains on. The defaults suit an environment
    that rewards one pick with one number."""

    reward_model: RewardModel
    # What the interaction log (src.evaluation.interactions) keeps of a round, from `logged_round`:
    #   "movie"  its user and the movie: off-policy evaluation replays it against the reward
    #            model, which must then be a `CompleteRewardModel`;
    #   "slate"  its user, the candidates offered, the slate shown and each slot's reward;
    #   None     nothing: a round the log cannot describe (a candidate set with one pick).
    logged_round_kind: str | None = None
    # Where `logged_round_kind` is None, what a round holds that the log does not keep.
    unlogged_because: str = "a round offers a candidate set for one pick, which it does not keep"
    # Names of the per-interaction metrics `extra_metrics` returns, e.g. a slate's NDCG.
    extra_metric_names: tuple[str, ...] = ()
    # When rewards reach the agent (the engine keeps the rest pending).
    feedback_delay: FeedbackDelay = FeedbackDelay()
    # How many interactions the environment can give (a replay of the data's), None: unbounded.
    interactions_available: int | None = None

    @property
    def movies_arrived(self) -> int | None:
        """With movies arriving (`Arrivals`), how many have by now (the first columns of the reward
        model); None where the catalogue is whole throughout."""
        return None

    @property
    def users(self) -> tf.Tensor:
        """[batch] int32, the `reward_model` rows of the users drawn at the last `reset()`; needed
        where `logged_round_kind` is set."""
        raise NotImplementedError

    def logged_round(self, action: tf.Tensor) -> tf.Tensor:
        """[batch, columns] float64, the log's columns of each round (`logged_round_kind`); these
        are a "movie" round's: the user's row and the movie."""
        return tf.stack([tf.cast(self.users, tf.float64), tf.cast(action, tf.float64)], axis=1)

    def outcome(self, action: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """(reward, optimal reward) of each interaction, [batch] float64."""
        raise NotImplementedError

    def feedback(self, action: tf.Tensor, reward: tf.Tensor):
        """What the agent learns from, in the environment's reward spec."""
        return tf.cast(reward, self.reward_spec().dtype)

    def extra_metrics(self, action: tf.Tensor) -> tf.Tensor:
        """[batch, len(extra_metric_names)] float64, summed per loop like the regret."""
        raise NotImplementedError

    def training_experience(self, experience):
        """The agent's view of a loop's experience (a slate agent learns from the slotted movies)."""
        return experience
