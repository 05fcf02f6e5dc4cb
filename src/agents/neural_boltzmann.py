"""Neural Boltzmann exploration: pick movie a with probability proportional to
exp(r_hat(x, a) / temperature) under a learned reward network (softmax exploration,
Sutton, Barto: "Reinforcement Learning: An Introduction", 1998; compared on bandits in
Cesa-Bianchi et al.: "Boltzmann Exploration Done Right", NeurIPS 2017)."""

from __future__ import annotations

import tensorflow as tf
from tf_agents.bandits.agents import neural_boltzmann_agent

from src.agents import has_per_arm_features
from src.agents.networks import check_layers, reward_network
from src.errors import require


def build(time_step_spec, action_spec, learning_rate: float, temperature: float,
          layers: list[int], observation_and_action_constraint_splitter=None, name: str = "neural_boltzmann"):
    require(learning_rate > 0, "agent.learning_rate", learning_rate, "> 0")
    require(temperature > 0, "agent.temperature", temperature, "> 0")
    check_layers(layers)
    return neural_boltzmann_agent.NeuralBoltzmannAgent(
        time_step_spec, action_spec, reward_network=reward_network(time_step_spec, action_spec, layers),
        optimizer=tf.compat.v1.train.AdamOptimizer(learning_rate=learning_rate),
        temperature=temperature, emit_policy_info=("predicted_rewards_mean",),
        accepts_per_arm_features=has_per_arm_features(time_step_spec),
        observation_and_action_constraint_splitter=observation_and_action_constraint_splitter, name=name)


def action_probabilities(action_step, num_actions: int, temperature: float, **_) -> tf.Tensor:
    """The softmax the policy samples from, on the predicted ratings it reports."""
    logits = tf.cast(action_step.info.predicted_rewards_mean, tf.float64) / temperature
    return tf.nn.softmax(logits)
