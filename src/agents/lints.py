"""Linear Thompson sampling (Agrawal, Goyal: "Thompson Sampling for Contextual Bandits
with Linear Payoffs", ICML 2013): sample theta_a ~ N(A_a^-1 b_a, alpha^2 A_a^-1) per arm
and pick the best sampled reward.

`VectorizedLinTSAgent` keeps every arm's statistics in one tensor (`src.agents.linear`);
TF-Agents' `LinearThompsonSamplingAgent` stays available as `agent=lints_tf_agents`, the
reference it is tested against.
"""

from __future__ import annotations

from collections.abc import Sequence

from tf_agents.bandits.agents import linear_thompson_sampling_agent

from src.agents import linear, monte_carlo
from src.agents.monte_carlo import action_probabilities, exposes_propensities  # noqa: F401  (src.agents' hooks)


class VectorizedLinTSAgent(linear.VectorizedLinearAgent):
    """LinTS on batched statistics: greedy in a reward sampled from each arm's posterior."""

    def __init__(self, time_step_spec, action_spec, alpha: linear.PerReplica = 1.0,
                 tikhonov_weight: linear.PerReplica = 1.0, propensity_draws: int = 0,
                 forgetting: linear.Forgetting = linear.Forgetting(), seeds: Sequence[int] = (0,),
                 observation_and_action_constraint_splitter=None, name: str | None = None):
        """`seeds`: the run's, or each replica's of a group trained side by side."""
        super().__init__(time_step_spec, action_spec, alpha, tikhonov_weight, linear.Sampled(list(seeds)),
                         propensity_draws=propensity_draws, forgetting=forgetting, replicas=len(seeds),
                         observation_and_action_constraint_splitter=observation_and_action_constraint_splitter,
                         name=name)


def vectorized(time_step_spec, action_spec, alpha: linear.PerReplica, tikhonov_weight: linear.PerReplica, seed: int,
               propensity_draws: int = 0, discount: float = 1.0, window: int | None = None,
               replica_seeds: Sequence[int] = (), observation_and_action_constraint_splitter=None,
               name: str = "lints"):
    """`replica_seeds`: the runs trained side by side (src.replicas), one per seed; alpha and the
    ridge may then be a value per replica."""
    monte_carlo.check_draws(propensity_draws, action_spec)
    return VectorizedLinTSAgent(time_step_spec, action_spec, alpha, tikhonov_weight, propensity_draws,
                                linear.Forgetting(discount, window), replica_seeds or [seed],
                                observation_and_action_constraint_splitter, name)


def tf_agents_reference(time_step_spec, action_spec, alpha: float, tikhonov_weight: float,
                        use_eigendecomp: bool = True, observation_and_action_constraint_splitter=None,
                        name: str = "lints_tf_agents"):
    """TF-Agents' own `LinearThompsonSamplingAgent`."""
    return linear.tf_agents_linear(linear_thompson_sampling_agent.LinearThompsonSamplingAgent,
                                   time_step_spec, action_spec, alpha, tikhonov_weight, use_eigendecomp, name,
                                   observation_and_action_constraint_splitter)
