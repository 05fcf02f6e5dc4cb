"""Neural epsilon-greedy: a reward network regresses each movie's rating from the user
features; the policy acts greedily on it, uniformly at random with probability epsilon
(the baseline of Riquelme, Tucker, Snoek: "Deep Bayesian Bandits Showdown", ICLR 2018).
Over slates it is `src.agents.ranking.epsilon_greedy`."""

from __future__ import annotations

import tensorflow as tf
from tf_agents.bandits.agents import neural_epsilon_greedy_agent

from src.agents import has_per_arm_features, is_slate, ranking
from src.agents.networks import check_layers, reward_network
from src.errors import require
from src.evaluation import slates as slate_estimators


def build(time_step_spec, action_spec, learning_rate: float, epsilon: float,
          layers: list[int], seed: int, observation_and_action_constraint_splitter=None,
          name: str = "epsilon_greedy"):
    """TF-Agents' agent, or over slates ours; `seed` seeds only the slate agent's exploration
    (TF-Agents' draws with TensorFlow's global seed)."""
    require(learning_rate > 0, "agent.learning_rate", learning_rate, "> 0")
    require(0 <= epsilon <= 1, "agent.epsilon", epsilon, "in [0, 1]")
    if is_slate(action_spec):
        return ranking.epsilon_greedy(time_step_spec, action_spec, learning_rate, epsilon, layers, seed, name)
    check_layers(layers)
    return neural_epsilon_greedy_agent.NeuralEpsilonGreedyAgent(
        time_step_spec, action_spec, reward_network=reward_network(time_step_spec, action_spec, layers),
        optimizer=tf.compat.v1.train.AdamOptimizer(learning_rate=learning_rate),
        epsilon=epsilon, emit_policy_info=("predicted_rewards_mean",),
        info_fields_to_inherit_from_greedy=["predicted_rewards_mean"],
        accepts_per_arm_features=has_per_arm_features(time_step_spec),
        observation_and_action_constraint_splitter=observation_and_action_constraint_splitter, name=name)


def action_probabilities(action_step, num_actions: int, epsilon: float, **_) -> tf.Tensor:
    """Each movie's probability of being picked: epsilon spread uniformly, the rest on the
    greedy movie. (TF-Agents' own log-probability is that of the branch taken, which
    undercounts the greedy movie by epsilon / num_actions.)"""
    greedy = tf.argmax(action_step.info.predicted_rewards_mean, axis=-1)
    return epsilon / num_actions + (1 - epsilon) * tf.one_hot(greedy, num_actions, dtype=tf.float64)



def slate_probabilities(num_candidates: int, slate_size: int, epsilon: float, **_):
    """A uniform slate with probability epsilon, else the top-scoring one (ties to the lower
    candidate, as `tf.math.top_k`)."""
    return lambda scores, shown: slate_estimators.mixture(
        slate_estimators.uniform(num_candidates, shown), slate_estimators.top_k(scores, shown), epsilon)
