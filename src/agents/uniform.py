"""The uniform-random baseline: a TF-Agents agent whose policy picks uniformly (a slate: an
ordered set of distinct movies) and whose training does nothing; its regret is the
environment's `random_policy_regret`."""

from __future__ import annotations

import tensorflow as tf
from tf_agents.agents import tf_agent
from tf_agents.policies import random_tf_policy
from tf_agents.trajectories import policy_step

from src import seeding
from src.agents import is_slate, slates
from src.evaluation import slates as slate_estimators


class SeededUniformPolicy(random_tf_policy.RandomTFPolicy):
    """TF-Agents' random policy, drawing from its own seeded generator. The stock one draws
    with TensorFlow's op-level seeds, and in a process that had run other jobs its picks
    came out different for the same seed."""

    def __init__(self, time_step_spec, action_spec, generator: tf.random.Generator,
                 observation_and_action_constraint_splitter=None):
        super().__init__(time_step_spec, action_spec,
                         observation_and_action_constraint_splitter=observation_and_action_constraint_splitter)
        self._generator = generator

    def _action(self, time_step, policy_state, seed):
        spec = self.action_spec
        batch_size = tf.shape(time_step.step_type)[0]
        if is_slate(spec):  # distinct movies, unlike TF-Agents' draw per slot
            action = slates.uniform_slate(self._generator, batch_size, int(spec.maximum) + 1, slates.slate_size(spec))
        elif self.observation_and_action_constraint_splitter is not None:  # the top of uniform keys on the allowed
            _, mask = self.observation_and_action_constraint_splitter(time_step.observation)
            keys = tf.where(tf.cast(mask, tf.bool), self._generator.uniform(tf.shape(mask)), -1.0)
            action = tf.argmax(keys, axis=-1, output_type=spec.dtype) + int(spec.minimum)
        else:
            action = self._generator.uniform([batch_size], minval=int(spec.minimum), maxval=int(spec.maximum) + 1,
                                             dtype=spec.dtype)
        return policy_step.PolicyStep(action, policy_state, ())


class UniformRandomAgent(tf_agent.TFAgent):
    def __init__(self, time_step_spec, action_spec, seed: int, observation_and_action_constraint_splitter=None,
                 name: str | None = None):
        tf.Module.__init__(self, name=name)
        policy = SeededUniformPolicy(time_step_spec, action_spec, seeding.stream(seed, seeding.POLICY),
                                     observation_and_action_constraint_splitter)
        super().__init__(time_step_spec, action_spec, policy, policy, train_sequence_length=None)

    def _initialize(self):
        pass

    def _train(self, experience, weights=None):
        self.train_step_counter.assign_add(1)
        return tf_agent.LossInfo(loss=tf.constant(0.0), extra=())


def action_probabilities(action_step, num_actions: int, **_) -> tf.Tensor:
    return tf.fill([tf.shape(action_step.action)[0], num_actions], tf.constant(1 / num_actions, tf.float64))


def slate_probabilities(num_candidates: int, slate_size: int, **_):
    return lambda scores, shown: slate_estimators.uniform(num_candidates, shown)


def build(time_step_spec, action_spec, seed: int, observation_and_action_constraint_splitter=None,
          name: str = "random") -> UniformRandomAgent:
    return UniformRandomAgent(time_step_spec, action_spec, seed, observation_and_action_constraint_splitter, name)
