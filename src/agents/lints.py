"""Linear Thompson sampling (Agrawal, Goyal: "Thompson Sampling for Contextual Bandits
with Linear Payoffs", ICML 2013): sample theta_a ~ N(A_a^-1 b_a, alpha^2 A_a^-1) per arm
and pick the best sampled reward.

`VectorizedLinTSAgent` keeps every arm's statistics in one tensor (`src.agents.linear`);
TF-Agents' `LinearThompsonSamplingAgent` stays available as `agent=lints_tf_agents`, the
reference it is tested against.
"""

from __future__ import annotations

import tensorflow as tf
from tf_agents.bandits.agents import linear_thompson_sampling_agent

from src.agents import is_slate, linear
from src.errors import require


class VectorizedLinTSAgent(linear.VectorizedLinearAgent):
    """LinTS on batched statistics: greedy in a reward sampled from each arm's posterior."""

    def __init__(self, time_step_spec, action_spec, alpha: float = 1.0, tikhonov_weight: float = 1.0,
                 propensity_draws: int = 0, name: str | None = None):
        super().__init__(time_step_spec, action_spec, alpha, tikhonov_weight, linear.sampled,
                         propensity_draws=propensity_draws, name=name)


# Each draw costs a normal per user and movie: 1,000 draws of 20 movies for a batch of 8 is
# 160,000 a step, already far more than the rest of a step.
MAX_PROPENSITY_DRAWS = 1000


def vectorized(time_step_spec, action_spec, alpha: float, tikhonov_weight: float, propensity_draws: int = 0,
               name: str = "lints"):
    require(isinstance(propensity_draws, int) and 0 <= propensity_draws <= MAX_PROPENSITY_DRAWS,
            "agent.propensity_draws", propensity_draws, f"an integer in [0, {MAX_PROPENSITY_DRAWS}]")
    require(not (propensity_draws and is_slate(action_spec)), "agent.propensity_draws", propensity_draws,
            "0 with slates (it estimates single movies' propensities)")
    return VectorizedLinTSAgent(time_step_spec, action_spec, alpha, tikhonov_weight, propensity_draws, name)


def exposes_propensities(propensity_draws: int = 0, **_) -> bool:
    """Only with Monte-Carlo draws: Thompson sampling's pick has no closed-form probability."""
    return propensity_draws > 0


def action_probabilities(action_step, num_actions: int, **_) -> tf.Tensor:
    """The pick's Monte-Carlo propensity (the collect policy's `log_probability`) at its movie;
    the other movies' are not estimated (0 here), as only the logged movie's is ever read."""
    picked = tf.one_hot(tf.cast(action_step.action, tf.int32), num_actions, dtype=tf.float64)
    return picked * tf.exp(tf.cast(action_step.info.log_probability, tf.float64))[:, None]


def tf_agents_reference(time_step_spec, action_spec, alpha: float, tikhonov_weight: float,
                        use_eigendecomp: bool = True, name: str = "lints_tf_agents"):
    """TF-Agents' own `LinearThompsonSamplingAgent`."""
    return linear.tf_agents_linear(linear_thompson_sampling_agent.LinearThompsonSamplingAgent,
                                   time_step_spec, action_spec, alpha, tikhonov_weight, use_eigendecomp, name)
