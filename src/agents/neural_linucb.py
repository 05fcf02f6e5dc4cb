"""Neural-linear UCB (Riquelme, Tucker, Snoek: "Deep Bayesian Bandits Showdown", ICLR 2018;
Xu et al.: "Neural Contextual Bandits with Deep Representation and Shallow Exploration",
ICLR 2022): a network learns an encoding of the observation, epsilon-greedy on a linear
reward layer for the first `encoding_network_num_train_steps` train steps, then LinUCB
on the encoding. TF-Agents' `NeuralLinUCBAgent`."""

from __future__ import annotations

import tensorflow as tf
from tf_agents.bandits.agents import neural_linucb_agent
from tf_agents.bandits.networks import global_and_arm_feature_network
from tf_agents.networks import encoding_network

from src.agents import has_per_arm_features
from src.agents.networks import check_layers
from src.errors import require



def build(time_step_spec, action_spec, learning_rate: float, alpha: float, epsilon: float,
          layers: list[int], encoding_dim: int, encoding_network_num_train_steps: int,
          name: str = "neural_linucb"):
    require(learning_rate > 0, "agent.learning_rate", learning_rate, "> 0")
    require(alpha > 0, "agent.alpha", alpha, "> 0")
    require(0 <= epsilon <= 1, "agent.epsilon", epsilon, "in [0, 1]")
    check_layers(layers)
    require(isinstance(encoding_dim, int) and encoding_dim >= 1, "agent.encoding_dim", encoding_dim,
            "an integer >= 1")
    require(isinstance(encoding_network_num_train_steps, int) and encoding_network_num_train_steps >= 0,
            "agent.encoding_network_num_train_steps", encoding_network_num_train_steps,
            "an integer >= 0")
    per_arm = has_per_arm_features(time_step_spec)
    if per_arm:
        network = global_and_arm_feature_network.create_feed_forward_common_tower_network(
            time_step_spec.observation, global_layers=tuple(layers), arm_layers=tuple(layers),
            common_layers=tuple(layers), output_dim=encoding_dim)
    else:
        network = encoding_network.EncodingNetwork(
            time_step_spec.observation, fc_layer_params=(*layers, encoding_dim))
    return neural_linucb_agent.NeuralLinUCBAgent(
        time_step_spec, action_spec, encoding_network=network,
        encoding_network_num_train_steps=encoding_network_num_train_steps, encoding_dim=encoding_dim,
        optimizer=tf.compat.v1.train.AdamOptimizer(learning_rate=learning_rate), alpha=alpha,
        epsilon_greedy=epsilon, accepts_per_arm_features=per_arm,
        emit_policy_info=("predicted_rewards_mean",), name=name)
