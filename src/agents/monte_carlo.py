"""Monte-Carlo propensities for agents that pick by sampling without a closed-form probability
(LinTS, dropout Thompson sampling), for the interaction log and off-policy evaluation: with
`agent.propensity_draws=n` the collect policy draws its sampling n more times and reports the
share the pick won, the draw that chose it counted among them, as `info.log_probability`, so
that a propensity is never 0 (at least 1 / (n + 1)); its standard error is sqrt(p (1 - p) / n).
The agent modules re-export `exposes_propensities` and `action_probabilities` as the hooks
`src.agents.action_probabilities` reads.
"""

from __future__ import annotations

import tensorflow as tf
from tf_agents.policies import tf_policy

from src.agents import is_slate
from src.errors import require

# Each draw costs a normal per user and movie for LinTS, a forward pass for dropout TS: 1,000 draws
# of 20 movies for a batch of 8 is 160,000 normals a step, already far more than the rest of a step.
MAX_PROPENSITY_DRAWS = 1000


def check_draws(propensity_draws, action_spec, masked: bool = False) -> None:
    require(isinstance(propensity_draws, int) and 0 <= propensity_draws <= MAX_PROPENSITY_DRAWS,
            "agent.propensity_draws", propensity_draws, f"an integer in [0, {MAX_PROPENSITY_DRAWS}]")
    require(not (propensity_draws and is_slate(action_spec)), "agent.propensity_draws", propensity_draws,
            "0 with slates (it estimates single movies' propensities)")
    require(not (propensity_draws and masked), "agent.propensity_draws", propensity_draws,
            "0 with an action mask (env.arrivals): logged propensities would need the catalogue of their time")


def exposes_propensities(propensity_draws: int = 0, **_) -> bool:
    """Only with Monte-Carlo draws: Thompson sampling's pick has no closed-form probability."""
    return propensity_draws > 0


def action_probabilities(action_step, num_actions: int, **_) -> tf.Tensor:
    """The pick's Monte-Carlo propensity (the collect policy's `log_probability`) at its movie;
    the other movies' are not estimated (0 here), as only the logged movie's is ever read. A step
    of a policy that draws no more (the saved one, as served) has none: NaN, unknown."""
    picked = tf.one_hot(tf.cast(action_step.action, tf.int32), num_actions, dtype=tf.float64)
    log_probability = getattr(action_step.info, "log_probability", ())
    if isinstance(log_probability, tuple) or log_probability is None:
        return tf.fill(tf.shape(picked), tf.constant(float("nan"), tf.float64))
    return picked * tf.exp(tf.cast(log_probability, tf.float64))[:, None]


def log_share_won(wins: tf.Tensor, draws: int) -> tf.Tensor:
    """log of (1 + wins) / (draws + 1): the pick's draw counted among the draws."""
    return tf.math.log((1.0 + wins) / (draws + 1.0))


class RedrawnPropensityPolicy(tf_policy.TFPolicy):
    """A sampling policy whose every `action()` is a fresh draw (dropout TS: a fresh dropout
    mask), acting as it does, with its pick's propensity estimated by `draws` more actions."""

    def __init__(self, sampling: tf_policy.TFPolicy, draws: int):
        self._sampling = sampling
        self._draws = draws
        info_spec = sampling.info_spec._replace(log_probability=tf.TensorSpec([], tf.float32))
        super().__init__(sampling.time_step_spec, sampling.action_spec, policy_state_spec=sampling.policy_state_spec,
                         info_spec=info_spec, emit_log_probability=False)

    def _variables(self):
        return self._sampling.variables()

    def _action(self, time_step, policy_state, seed):
        step = self._sampling.action(time_step, policy_state)

        def redraw(i, wins):
            again = self._sampling.action(time_step, policy_state).action
            return i + 1, wins + tf.cast(tf.equal(again, step.action), tf.float32)

        _, wins = tf.while_loop(lambda i, _: i < self._draws, redraw,
                                (0, tf.zeros(tf.shape(step.action), tf.float32)))
        return step._replace(info=step.info._replace(log_probability=log_share_won(wins, self._draws)))

    def _distribution(self, time_step, policy_state):
        raise NotImplementedError("a redrawn policy is sampled by action(), it has no distribution")
