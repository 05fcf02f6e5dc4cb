"""Reward networks shared by the neural agents, shaped by the observation spec."""

from __future__ import annotations

from tf_agents.bandits.networks import global_and_arm_feature_network
from tf_agents.networks import q_network

from src.agents import features_spec, has_per_arm_features
from src.errors import require


def check_layers(layers) -> None:
    require(len(layers) >= 1 and all(isinstance(w, int) and w >= 1 for w in layers),
            "agent.layers", list(layers), "a non-empty list of positive integer widths")


def reward_network(time_step_spec, action_spec, layers):
    """One output per movie from the user features, or, with per-arm features, the dot
    product of a user tower and a movie tower (TF-Agents' per-arm MovieLens example); never of
    an action mask."""
    observation_spec = features_spec(time_step_spec)
    if has_per_arm_features(time_step_spec):
        return global_and_arm_feature_network.create_feed_forward_dot_product_network(
            observation_spec, global_layers=tuple(layers), arm_layers=tuple(layers))
    return q_network.QNetwork(input_tensor_spec=observation_spec, action_spec=action_spec,
                              fc_layer_params=tuple(layers))
