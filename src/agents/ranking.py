"""Slate agents on a neural scorer, built on TF-Agents' `RankingAgent` (env=movielens_ranking).

A user tower dotted with a movie tower scores every candidate (TF-Agents' per-arm network);
training regresses the scores of the slate's movies on their feedback, a score vector or a
cascade, read as in `src.agents.slates` (0 above the click, 1 at it, nothing below). Not
TF-Agents' default of -1 above the click: the towers end in ReLUs, so their dot product
cannot go below 0, and regressing on -1 kills them (the loss stays at 1.0). The policies:
  agent=ranking          TF-Agents' ranking policies: `no_penalty` samples a slate from the
                         Plackett-Luce distribution of the scores / temperature (softmax
                         exploration without replacement), `descending_scores` is greedy,
                         `cosine_distance` samples while penalising movies like those chosen;
  agent=epsilon_greedy   the top-scoring slate, a uniform one with probability epsilon.
"""

from __future__ import annotations

import tensorflow as tf
import tensorflow_probability as tfp
from tf_agents.bandits.agents import ranking_agent
from tf_agents.bandits.networks import global_and_arm_feature_network
from tf_agents.policies import tf_policy
from tf_agents.policies import utils as policy_utilities
from tf_agents.trajectories import policy_step

from src import seeding
from src.agents import is_slate, slates
from src.agents.networks import check_layers
from src.errors import UserError, require
from src.evaluation import slates as slate_estimators

POLICIES = {"no_penalty": ranking_agent.RankingPolicyType.NO_PENALTY,
            "descending_scores": ranking_agent.RankingPolicyType.DESCENDING_SCORES,
            "cosine_distance": ranking_agent.RankingPolicyType.COSINE_DISTANCE}


class SlateAgent(ranking_agent.RankingAgent):
    """TF-Agents' `RankingAgent` collecting with `policy_type`'s policy, explored further by
    epsilon if given (drawing from a generator seeded from `seed`); its `policy`, the one saved
    and served, ranks greedily by the scores."""

    def __init__(self, time_step_spec, action_spec, learning_rate: float, layers, policy_type, temperature: float,
                 epsilon: float | None, seed: int | None, name: str):
        if not is_slate(action_spec):
            raise UserError(f"agent={name} recommends slates: use it with env=movielens_ranking")
        require(learning_rate > 0, "agent.learning_rate", learning_rate, "> 0")
        check_layers(layers)
        cascade = isinstance(time_step_spec.reward, dict)
        network = global_and_arm_feature_network.create_feed_forward_dot_product_network(
            time_step_spec.observation, global_layers=tuple(layers), arm_layers=tuple(layers))
        feedback = ranking_agent.FeedbackModel.CASCADING if cascade else ranking_agent.FeedbackModel.SCORE_VECTOR
        super().__init__(
            time_step_spec, action_spec, scoring_network=network,
            optimizer=tf.compat.v1.train.AdamOptimizer(learning_rate=learning_rate), policy_type=policy_type,
            feedback_model=feedback, non_click_score=slates.NON_CLICK_SCORE if cascade else None,
            logits_temperature=temperature, summarize_grads_and_vars=False, enable_summaries=False, name=name)
        self._greedy = GreedySlatePolicy(time_step_spec, action_spec, network)
        if epsilon is not None:
            self._collect_policy = EpsilonGreedySlatePolicy(self._greedy, epsilon, seeding.stream(seed, seeding.POLICY))

    @property
    def policy(self):
        return self._greedy


class GreedySlatePolicy(tf_policy.TFPolicy):
    """The top-scoring slate, best first, with every candidate's score: TF-Agents'
    `DescendingScoreRankingPolicy`, which `PolicySaver` cannot save."""

    def __init__(self, time_step_spec, action_spec, network):
        self._network = network
        info_spec = policy_utilities.PolicyInfo(
            predicted_rewards_mean=tf.TensorSpec([int(action_spec.maximum) + 1], tf.float32))
        super().__init__(time_step_spec, action_spec, info_spec=info_spec)

    def _variables(self):
        return self._network.variables

    def _distribution(self, time_step, policy_state):
        scores, _ = self._network(time_step.observation, time_step.step_type)
        slate = slates.top_slate(scores, slates.slate_size(self.action_spec))
        return policy_step.PolicyStep(tfp.distributions.Deterministic(slate), policy_state,
                                      policy_utilities.PolicyInfo(predicted_rewards_mean=scores))


def build(time_step_spec, action_spec, learning_rate: float, layers: list[int], policy: str, temperature: float,
          name: str = "ranking") -> SlateAgent:
    require(policy in POLICIES, "agent.policy", policy, f"one of {', '.join(POLICIES)}")
    require(temperature > 0, "agent.temperature", temperature, "> 0")
    return SlateAgent(time_step_spec, action_spec, learning_rate, layers, POLICIES[policy], temperature, None, None,
                      name)


def slate_probabilities(num_candidates: int, slate_size: int, policy: str, temperature: float, **_):
    """Plackett-Luce on scores / temperature (`no_penalty`, as TF-Agents samples it; its position
    marginals sum over subsets, refused where there are too many), or the top-scoring slate
    (`descending_scores`); `cosine_distance` has none in closed form."""
    if policy == "cosine_distance":
        return None
    if policy == "descending_scores":
        return lambda scores, shown: slate_estimators.top_k(scores, shown)
    subsets = slate_estimators.plackett_luce_subsets(num_candidates, slate_size)
    require(subsets <= slate_estimators.MOST_PLACKETT_LUCE_SUBSETS, "env.num_actions", num_candidates,
            f"small enough for the logged propensities of agent=ranking's Plackett-Luce slates: with slates of "
            f"{slate_size} it makes {subsets:,} sets of candidates to sum over, at most "
            f"{slate_estimators.MOST_PLACKETT_LUCE_SUBSETS:,} (fewer candidates or a shorter slate)")
    return lambda scores, shown: slate_estimators.plackett_luce(scores / temperature, shown)


class EpsilonGreedySlatePolicy(tf_policy.TFPolicy):
    """The greedy policy's slate, or with probability epsilon a uniform one, per user."""

    def __init__(self, greedy: tf_policy.TFPolicy, epsilon: float, generator: tf.random.Generator):
        self._greedy = greedy
        self._epsilon = epsilon
        self._generator = generator
        super().__init__(greedy.time_step_spec, greedy.action_spec, info_spec=greedy.info_spec, emit_log_probability=False)

    def _variables(self):
        return self._greedy.variables()

    def _action(self, time_step, policy_state, seed):
        greedy = self._greedy.action(time_step, policy_state)
        batch_size = tf.shape(greedy.action)[0]
        spec = self.action_spec
        uniform = slates.uniform_slate(self._generator, batch_size, int(spec.maximum) + 1, slates.slate_size(spec))
        explores = self._generator.uniform([batch_size]) < self._epsilon
        action = tf.where(explores[:, None], uniform, greedy.action)
        return policy_step.PolicyStep(action, policy_state, greedy.info)

    def _distribution(self, time_step, policy_state):
        raise NotImplementedError("an epsilon-greedy slate is sampled by action(), it has no distribution")


def epsilon_greedy(time_step_spec, action_spec, learning_rate: float, epsilon: float, layers, seed: int,
                   name: str) -> SlateAgent:
    """Neural epsilon-greedy over slates: the greedy ranking agent, exploring uniformly."""
    return SlateAgent(time_step_spec, action_spec, learning_rate, layers,
                      ranking_agent.RankingPolicyType.DESCENDING_SCORES, 1.0, epsilon, seed, name)
