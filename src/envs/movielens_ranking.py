"""Slates on MovieLens: each visit a user is offered `num_actions` candidate movies, as in
`src.envs.movielens_per_arm`, and the agent recommends an ordered slate of `slate_size` of them.

The agent learns from one of two kinds of feedback (TF-Agents' ranking feedback models):
  scores   the reconstructed rating of every movie in the slate;
  cascade  a click: the user scans the slate top-down, looks at position i (0-based) with
           probability (i + 1)^-position_bias, and clicks the first movie they look at whose
           rating is at least `click_threshold`; the feedback is its position (slate_size for
           no click) and 1 for a click (`chosen_index`, `chosen_value`).
Whatever the feedback, a slate is worth the sum of its movies' ratings, and its regret is
measured against the best slate there was, the top `slate_size` candidates. Per visit the
environment also reports NDCG@k (gains: ratings, clipped at 0; 0 when every candidate's gain is
0, as scikit-learn's `ndcg_score`), precision@k (the share of the slate rated at least
`click_threshold`) and the click-through rate of the cascade above, drawn in either mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import tensorflow as tf
from tf_agents.bandits.agents import ranking_agent
from tf_agents.bandits.specs import utils as bandit_spec_utils
from tf_agents.specs import tensor_spec
from tf_agents.trajectories import trajectory

from src import metrics
from src.envs.base import FeedbackDelay
from src.envs.movielens import UNLOGGED_IN_TIME, build_reward_model, check_drift, fields_of
from src.envs.movielens_per_arm import (CandidateSetRewardModel, MovieLensPerArmEnvironment, expected_top_weights,
                                        sorted_reward_rows)
from src.errors import require

FEEDBACKS = ("scores", "cascade")


@dataclass(frozen=True, kw_only=True)  # its field follows the candidate set's defaults
class SlateRewardModel(CandidateSetRewardModel):
    """The reward model over the whole pool, offered `num_actions` movies and recommending `slate_size`."""

    slate_size: int

    @cached_property  # a model is fixed; a large pool's or a drift's regret takes a while
    def random_policy_regret(self) -> float:
        """Exact expected regret of a uniform slate from a random candidate set: the expected sum
        of the top `slate_size` candidates (order statistics) minus slate_size x the pool mean."""
        rewards = sorted_reward_rows(self)
        best = rewards @ expected_top_weights(rewards.shape[1], self.num_actions, self.slate_size)
        return float(np.mean(best - self.slate_size * rewards.mean(axis=1)))


def discounted_gains(gains: tf.Tensor) -> tf.Tensor:
    """DCG of [batch, k] gains in slate order."""
    positions = tf.range(tf.shape(gains)[-1], dtype=gains.dtype)
    return tf.reduce_sum(gains / (tf.math.log(positions + 2.0) / tf.math.log(tf.constant(2.0, gains.dtype))), axis=-1)


class MovieLensRankingEnvironment(MovieLensPerArmEnvironment):
    """Per-arm candidates; the action is a slate, [slate_size] distinct positions in the list."""

    extra_metric_names = (metrics.NDCG, metrics.PRECISION, metrics.CLICK_THROUGH_RATE)
    logged_round_kind = "slate"

    def __init__(self, model: SlateRewardModel, batch_size: int, seed: int, arm_features: str = "embedding",
                 feedback: str = "cascade", click_threshold: float = 3.0, position_bias: float = 1.0,
                 name: str = "movielens_ranking", drift: str = "none", drift_period: int | None = None):
        require(feedback in FEEDBACKS, "env.feedback", feedback, f"one of {', '.join(FEEDBACKS)}")
        require(position_bias >= 0, "env.position_bias", position_bias, ">= 0 (0: every position is looked at)")
        self._slate_size = model.slate_size
        self._cascade = feedback == "cascade"
        self._click_threshold = float(click_threshold)
        super().__init__(model, batch_size, seed, arm_features, name, drift=drift, drift_period=drift_period)
        # The slate's own metrics, and with drift whether the best candidate moved (dynamic regret).
        self.extra_metric_names = (metrics.NDCG, metrics.PRECISION, metrics.CLICK_THROUGH_RATE,
                                   *(metrics.BEST_MOVIE_MOVED,) * (drift != "none"))
        if drift != "none":
            self.logged_round_kind, self.unlogged_because = None, UNLOGGED_IN_TIME
        self._looks = tf.constant((np.arange(model.slate_size) + 1.0) ** -position_bias)
        # Drawn with the visit, so that the feedback and the click-through rate see the same clicks.
        self._looked_at = tf.Variable(tf.zeros([batch_size, model.slate_size], tf.bool), trainable=False,
                                      name="looked_at")

    def _action_spec(self, num_actions: int):
        return tensor_spec.BoundedTensorSpec((self._slate_size,), tf.int32, minimum=0, maximum=num_actions - 1,
                                             name="slate")

    def _reward_spec(self):
        if self._cascade:  # TF-Agents' cascading feedback: chosen_index == slate_size is no click
            return {ranking_agent.CHOSEN_INDEX: tensor_spec.BoundedTensorSpec([], tf.int32, 0, self._slate_size),
                    ranking_agent.CHOSEN_VALUE: tf.TensorSpec([], tf.float32)}
        return tf.TensorSpec([self._slate_size], tf.float32)

    def _observe(self):
        observation = super()._observe()
        looks = self._generators[0].uniform([self.batch_size, self._slate_size], dtype=tf.float64)
        self._looked_at.assign(looks < self._looks)
        return observation

    def _slate_rewards(self, slate: tf.Tensor) -> tf.Tensor:
        """[batch, slate_size] float64 ratings of the slate's movies, in slate order."""
        return tf.gather(self._candidate_rewards(), tf.cast(slate, tf.int32), batch_dims=1)

    def _clicked_position(self, slate: tf.Tensor) -> tf.Tensor:
        """[batch] the position clicked, slate_size where none was."""
        clicks = tf.logical_and(self._looked_at, self._slate_rewards(slate) >= self._click_threshold)
        return tf.where(tf.reduce_any(clicks, axis=1), tf.argmax(tf.cast(clicks, tf.int32), axis=1, output_type=tf.int32),
                        self._slate_size)

    def _apply_action(self, action: tf.Tensor):
        return self.feedback(action, None)

    def outcome(self, action: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """(the slate's worth, the best slate's worth): sums of ratings, float64."""
        best = tf.math.top_k(self._candidate_rewards(), k=self._slate_size).values
        return tf.reduce_sum(self._slate_rewards(action), axis=1), tf.reduce_sum(best, axis=1)

    def feedback(self, action: tf.Tensor, reward: tf.Tensor | None):
        if self._cascade:
            position = self._clicked_position(action)
            return {ranking_agent.CHOSEN_INDEX: position,
                    ranking_agent.CHOSEN_VALUE: tf.cast(position < self._slate_size, tf.float32)}
        return tf.cast(self._slate_rewards(action), tf.float32)

    @property
    def users(self) -> tf.Variable:
        return self._users

    def logged_round(self, action: tf.Tensor) -> tf.Tensor:
        """[batch, 1 + num_actions + 2 slate_size]: the user's row, the candidates' pool columns, the
        slate (positions in the candidate list) and each slot's reward: its movie's rating under
        `scores` feedback, under `cascade` 1 at the click and 0 elsewhere."""
        slate = tf.cast(action, tf.int32)
        if self._cascade:
            slot_rewards = tf.one_hot(self._clicked_position(slate), self._slate_size, dtype=tf.float64)
        else:
            slot_rewards = self._slate_rewards(slate)
        return tf.concat([tf.cast(self._users, tf.float64)[:, None], tf.cast(self._candidates, tf.float64),
                          tf.cast(slate, tf.float64), slot_rewards], axis=1)

    def extra_metrics(self, action: tf.Tensor) -> tf.Tensor:
        """[batch, 3] NDCG@k, precision@k and whether the user clicked (against the ratings of the
        time, with drift; then also whether the best candidate is not the best without drift)."""
        ratings = self._slate_rewards(action)
        ideal = discounted_gains(tf.maximum(tf.math.top_k(self._candidate_rewards(), k=self._slate_size).values, 0.0))
        ndcg = tf.math.divide_no_nan(discounted_gains(tf.maximum(ratings, 0.0)), ideal)
        precision = tf.reduce_mean(tf.cast(ratings >= self._click_threshold, tf.float64), axis=1)
        clicked = tf.cast(self._clicked_position(action) < self._slate_size, tf.float64)
        slate_metrics = tf.stack([ndcg, precision, clicked], axis=1)
        if self._drift == "none":
            return slate_metrics
        return tf.concat([slate_metrics, super().extra_metrics(action)], axis=1)

    def training_experience(self, experience):
        """As TF-Agents' ranking example trains: the observation holds the slate's movies, in
        slate order, instead of every candidate; the action and policy info are dropped."""
        observation = experience.observation
        slotted = tf.gather(observation[bandit_spec_utils.PER_ARM_FEATURE_KEY], experience.action, batch_dims=2)
        return trajectory.Trajectory(
            step_type=experience.step_type,
            observation={**observation, bandit_spec_utils.PER_ARM_FEATURE_KEY: slotted},
            action=(), policy_info=(), next_step_type=experience.next_step_type,
            reward=experience.reward, discount=experience.discount)


def build(data, batch_size: int, seed: int, num_actions: int, slate_size: int, rank_k: int,
          num_movies: int | None = None, reward_rank: int | None = None, movie_selection: str = "first",
          arm_features: str = "embedding", feedback: str = "cascade", click_threshold: float = 3.0,
          position_bias: float = 1.0, drift: str = "none", drift_period: int | None = None, delay: str = "none",
          delay_loops: int = 0, delay_longest: int | None = None, feedback_drop: float = 0.0,
          name: str = "movielens_ranking") -> MovieLensRankingEnvironment:
    """The environment `conf/env/movielens_ranking.yaml` describes, over MovieLens `data`."""
    feedback_delay = FeedbackDelay(delay, delay_loops, delay_longest, feedback_drop)
    check_drift(drift, drift_period, batch_size)
    ratings = data.ratings_matrix()
    pool = ratings.shape[1] if num_movies is None else num_movies
    model = build_reward_model(ratings, pool, rank_k, reward_rank, movie_selection)
    require(isinstance(num_actions, int) and 2 <= num_actions <= pool, "env.num_actions", num_actions,
            f"an integer between 2 and env.num_movies={pool}")
    require(isinstance(slate_size, int) and 1 <= slate_size <= num_actions, "env.slate_size", slate_size,
            f"an integer between 1 and the {num_actions} candidates offered (env.num_actions)")
    model = SlateRewardModel(**fields_of(model), num_actions=num_actions, slate_size=slate_size)
    environment = MovieLensRankingEnvironment(model, batch_size, seed, arm_features, feedback, click_threshold,
                                              position_bias, name, drift, drift_period)
    environment.feedback_delay = feedback_delay
    return environment
