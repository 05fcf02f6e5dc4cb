"""LinUCB (Li, Chu, Langford, Schapire: "A contextual-bandit approach to personalized news
article recommendation", WWW 2010), disjoint linear models, one per movie.

`VectorizedLinUCBAgent` keeps every arm's statistics in one tensor (`src.agents.linear`).
TF-Agents' `LinearUCBAgent` stays available as `agent=linucb_tf_agents`, the reference it
is tested against: both estimate theta_a = (X_a'X_a + lambda I)^-1 X_a'r_a and pick
argmax_a x.theta_a + alpha sqrt(x'A_a^-1 x).
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf
from tf_agents.bandits.agents import lin_ucb_agent

from src.agents import is_slate, linear
from src.errors import require


class VectorizedLinUCBAgent(linear.VectorizedLinearAgent):
    """LinUCB on batched statistics: greedy in the upper confidence bound."""

    def __init__(self, time_step_spec, action_spec, alpha: linear.PerReplica = 1.0,
                 tikhonov_weight: linear.PerReplica = 1.0, log_epsilon: float = 0.0,
                 forgetting: linear.Forgetting = linear.Forgetting(), replicas: int = 1,
                 observation_and_action_constraint_splitter=None, name: str | None = None):
        super().__init__(time_step_spec, action_spec, alpha, tikhonov_weight, linear.optimistic, log_epsilon,
                         forgetting=forgetting, replicas=replicas,
                         observation_and_action_constraint_splitter=observation_and_action_constraint_splitter,
                         name=name)


def vectorized(time_step_spec, action_spec, alpha: linear.PerReplica, tikhonov_weight: linear.PerReplica,
               log_epsilon: float = 0.0, discount: float = 1.0, window: int | None = None,
               replica_seeds: Sequence[int] = (), observation_and_action_constraint_splitter=None,
               name: str = "linucb"):
    """`replica_seeds`: the runs trained side by side (src.replicas), one per seed; alpha and the
    ridge may then be a value per replica."""
    require(0 <= log_epsilon <= 1, "agent.log_epsilon", log_epsilon, "in [0, 1]")
    require(not (log_epsilon and is_slate(action_spec)), "agent.log_epsilon", log_epsilon,
            "0 with slates (it explores single movies)")
    return VectorizedLinUCBAgent(time_step_spec, action_spec, alpha, tikhonov_weight, log_epsilon,
                                 linear.Forgetting(discount, window), max(1, len(replica_seeds)),
                                 observation_and_action_constraint_splitter, name)


def exposes_propensities(log_epsilon: float = 0.0, **_) -> bool:
    """Only an epsilon-wrapped LinUCB: the plain one is deterministic given its state, and a
    deterministic logger shows the target nothing it would not have picked itself."""
    return log_epsilon > 0


def action_probabilities(action_step, num_actions: int, log_epsilon: float, **_) -> tf.Tensor:
    """Each movie's probability under the epsilon-wrapped collect policy: log_epsilon spread
    uniformly, the rest on the movie with the best upper confidence bound."""
    greedy = tf.argmax(action_step.info.predicted_rewards_optimistic, axis=-1)
    return log_epsilon / num_actions + (1 - log_epsilon) * tf.one_hot(greedy, num_actions, dtype=tf.float64)


def tf_agents_reference(time_step_spec, action_spec, alpha: float, tikhonov_weight: float,
                        use_eigendecomp: bool = True, observation_and_action_constraint_splitter=None,
                        name: str = "linucb_tf_agents"):
    """TF-Agents' own `LinearUCBAgent`."""
    return linear.tf_agents_linear(lin_ucb_agent.LinearUCBAgent, time_step_spec, action_spec, alpha,
                                   tikhonov_weight, use_eigendecomp, name, observation_and_action_constraint_splitter)
