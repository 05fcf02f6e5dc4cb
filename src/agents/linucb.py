"""LinUCB (Li, Chu, Langford, Schapire: "A contextual-bandit approach to personalized news
article recommendation", WWW 2010), disjoint linear models, one per movie.

`VectorizedLinUCBAgent` keeps every arm's statistics in one tensor (`src.agents.linear`).
TF-Agents' `LinearUCBAgent` stays available as `agent=linucb_tf_agents`, the reference it
is tested against: both estimate theta_a = (X_a'X_a + lambda I)^-1 X_a'r_a and pick
argmax_a x.theta_a + alpha sqrt(x'A_a^-1 x).
"""

from __future__ import annotations

from tf_agents.bandits.agents import lin_ucb_agent

from src.agents import linear


class VectorizedLinUCBAgent(linear.VectorizedLinearAgent):
    """LinUCB on batched statistics: greedy in the upper confidence bound."""

    def __init__(self, time_step_spec, action_spec, alpha: float = 1.0, tikhonov_weight: float = 1.0,
                 name: str | None = None):
        super().__init__(time_step_spec, action_spec, alpha, tikhonov_weight, linear.optimistic, name)


def vectorized(time_step_spec, action_spec, alpha: float, tikhonov_weight: float, name: str = "linucb"):
    return VectorizedLinUCBAgent(time_step_spec, action_spec, alpha, tikhonov_weight, name)


def tf_agents_reference(time_step_spec, action_spec, alpha: float, tikhonov_weight: float,
                        use_eigendecomp: bool = True, name: str = "linucb_tf_agents"):
    """TF-Agents' own `LinearUCBAgent`."""
    return linear.tf_agents_linear(lin_ucb_agent.LinearUCBAgent, time_step_spec, action_spec, alpha,
                                   tikhonov_weight, use_eigendecomp, name)
