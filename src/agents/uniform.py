"""The uniform-random baseline: a TF-Agents agent whose policy picks uniformly and whose
training does nothing; its regret is the environment's `random_policy_regret`."""

from __future__ import annotations

import tensorflow as tf
from tf_agents.agents import tf_agent
from tf_agents.policies import random_tf_policy


class UniformRandomAgent(tf_agent.TFAgent):
    def __init__(self, time_step_spec, action_spec, name: str | None = None):
        tf.Module.__init__(self, name=name)
        policy = random_tf_policy.RandomTFPolicy(time_step_spec, action_spec)
        super().__init__(time_step_spec, action_spec, policy, policy, train_sequence_length=None)

    def _initialize(self):
        pass

    def _train(self, experience, weights=None):
        self.train_step_counter.assign_add(1)
        return tf_agent.LossInfo(loss=tf.constant(0.0), extra=())


def build(time_step_spec, action_spec, name: str = "random") -> UniformRandomAgent:
    return UniformRandomAgent(time_step_spec, action_spec, name)
