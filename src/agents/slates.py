"""What the slate variants of the agents share (env=movielens_ranking): the action is an
ordered list of `slate_size` distinct candidates, and training sees the slate's movies in
slate order with their feedback (`MovieLensRankingEnvironment.training_experience`).

Feedback is a score per slot, or TF-Agents' cascading feedback (the position clicked). A
cascade is read as the cascading bandits of Kveton et al. (ICML 2015) and Zong et al.
(UAI 2016) read it: the movies above the click were looked at and not clicked, the clicked
one was, and those below it say nothing.
"""

from __future__ import annotations

import tensorflow as tf
from tf_agents.bandits.agents import ranking_agent
from tf_agents.bandits.specs import utils as bandit_spec_utils
from tf_agents.utils import nest_utils


def slate_size(action_spec) -> int:
    return int(action_spec.shape[0])


def top_slate(scores: tf.Tensor, size: int) -> tf.Tensor:
    """[batch, size] positions of the best `scores` [batch, candidates], best first."""
    return tf.math.top_k(scores, k=size).indices


def uniform_slate(generator: tf.random.Generator, batch_size, candidates: int, size: int) -> tf.Tensor:
    """[batch, size] distinct positions, every ordered slate equally likely."""
    return top_slate(generator.uniform([batch_size, candidates]), size)


# What a movie looked at and not clicked scores: a click is 1.
NON_CLICK_SCORE = 0.0


def scores_and_weights(reward, size: int) -> tuple[tf.Tensor, tf.Tensor]:
    """([n, size] the score each slot earned, [n, size] 1 where it says something) from [n]-batched
    feedback: a score vector, or a cascade (0 above the click, 1 at it, nothing below it)."""
    if isinstance(reward, dict):
        position = reward[ranking_agent.CHOSEN_INDEX]
        scores = ranking_agent.compute_score_tensor_for_cascading(
            position, reward[ranking_agent.CHOSEN_VALUE], size, non_click_score=NON_CLICK_SCORE)
        return scores, tf.sequence_mask(position + 1, size, dtype=tf.float32)
    return reward, tf.ones_like(reward)


def flat_slates(experience, time_step_spec, size: int):
    """(observation, reward) of every slate in a loop's slotted experience, batch and time merged."""
    observation, _ = nest_utils.flatten_multi_batched_nested_tensors(
        experience.observation, _slotted(time_step_spec.observation, size))
    reward, _ = nest_utils.flatten_multi_batched_nested_tensors(experience.reward, time_step_spec.reward)
    return observation, reward


def _slotted(observation_spec, size: int):
    per_arm = observation_spec[bandit_spec_utils.PER_ARM_FEATURE_KEY]
    return {**observation_spec,
            bandit_spec_utils.PER_ARM_FEATURE_KEY: tf.TensorSpec([size, per_arm.shape[-1]], per_arm.dtype)}
