"""Dropout Thompson sampling: a reward network whose top layer keeps dropout on when
acting, so each forward pass is a sample from an approximate posterior (Gal, Ghahramani:
"Dropout as a Bayesian Approximation", ICML 2016; as a bandit baseline in Riquelme,
Tucker, Snoek: "Deep Bayesian Bandits Showdown", ICLR 2018). TF-Agents'
`DropoutThompsonSamplingAgent` with its MovieLens example's schedule
rate = max(1 / (offset + train_step), min_rate): explore hard first, then less. Its dropout
stays on when acting (`permanent`), in the saved policy too. With `agent.propensity_draws=n`
its collect policy estimates each pick's propensity by n more forward passes
(`src.agents.monte_carlo`).
"""

from __future__ import annotations

import tensorflow as tf
from tf_agents.bandits.agents import dropout_thompson_sampling_agent

from src.agents import monte_carlo
from src.agents.monte_carlo import action_probabilities, exposes_propensities  # noqa: F401  (src.agents' hooks)
from src.agents.networks import check_layers
from src.errors import require


def build(time_step_spec, action_spec, learning_rate: float, layers: list[int],
          dropout_offset: float, min_dropout_rate: float, propensity_draws: int = 0,
          observation_and_action_constraint_splitter=None, name: str = "dropout_ts"):
    require(learning_rate > 0, "agent.learning_rate", learning_rate, "> 0")
    # 1 / offset is the first loop's rate, which Keras needs below 1.
    require(dropout_offset > 1, "agent.dropout_offset", dropout_offset, "> 1")
    require(0 < min_dropout_rate < 1, "agent.min_dropout_rate", min_dropout_rate, "in (0, 1)")
    check_layers(layers)
    monte_carlo.check_draws(propensity_draws, action_spec, masked=observation_and_action_constraint_splitter is not None)
    train_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="train_step")

    def dropout_rate():
        return tf.maximum(tf.math.reciprocal(dropout_offset + tf.cast(train_step, tf.float32)),
                          min_dropout_rate)

    agent = dropout_thompson_sampling_agent.DropoutThompsonSamplingAgent(
        time_step_spec, action_spec, optimizer=tf.compat.v1.train.AdamOptimizer(learning_rate=learning_rate),
        dropout_rate=dropout_rate, network_layers=tuple(layers),
        emit_policy_info=("predicted_rewards_mean",), train_step_counter=train_step,
        observation_and_action_constraint_splitter=observation_and_action_constraint_splitter, name=name)
    # The policy's dropout reads the counter; PolicySaver only saves variables the policy
    # tracks (TF-Agents' Boltzmann example does the same for its temperature schedule).
    agent.policy.dropout_train_step = train_step
    if propensity_draws:
        agent._collect_policy = monte_carlo.RedrawnPropensityPolicy(agent.collect_policy, propensity_draws)
    return agent
