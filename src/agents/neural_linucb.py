"""Neural-linear UCB (Riquelme, Tucker, Snoek: "Deep Bayesian Bandits Showdown", ICLR 2018;
Xu et al.: "Neural Contextual Bandits with Deep Representation and Shallow Exploration",
ICLR 2022): a network learns an encoding of the observation, epsilon-greedy on a linear
reward layer for the first `encoding_network_num_train_steps` train steps, then LinUCB
(A = X'X + I) on the encoding of the now frozen network.

`VectorizedNeuralLinUCBAgent` follows TF-Agents' `NeuralLinUCBAgent` step for step but keeps
the LinUCB statistics of all arms in one tensor (`src.agents.linear`): TF-Agents' agent
loops over arms in Python, with a conjugate-gradient solve per arm in every policy call.
With per-arm features, as in TF-Agents, the network encodes each candidate and one reward
unit and one LinUCB model serve them all. TF-Agents' agent stays available as
`agent=neural_linucb_tf_agents`, the reference it is tested against.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
from tf_agents.agents import tf_agent
from tf_agents.bandits.agents import neural_linucb_agent
from tf_agents.bandits.networks import global_and_arm_feature_network
from tf_agents.networks import encoding_network
from tf_agents.policies import tf_policy

from src.agents import features_spec, has_per_arm_features, linear
from src.agents.networks import check_layers
from src.errors import require

# TF-Agents' LinUCB on the encoding adds an identity to X'X; it has no ridge parameter.
TIKHONOV_WEIGHT = 1.0


class VectorizedNeuralLinUCBPolicy(tf_policy.TFPolicy):
    """Epsilon-greedy on the reward layer while `uses_reward_layer`, then LinUCB on the encoding."""

    def __init__(self, time_step_spec, action_spec, encoder, reward_layer, statistics: linear.ArmStatistics,
                 uses_reward_layer: tf.Variable, alpha: float, epsilon: float,
                 observation_and_action_constraint_splitter=None, name=None):
        self._encoder = encoder
        self._reward_layer = reward_layer
        self._statistics = statistics
        self._uses_reward_layer = uses_reward_layer
        self._alpha = alpha
        self._epsilon = epsilon
        super().__init__(time_step_spec, action_spec, info_spec=linear.mean_info_spec(action_spec, time_step_spec),
                         observation_and_action_constraint_splitter=observation_and_action_constraint_splitter,
                         name=name)

    def _variables(self):
        return [self._uses_reward_layer, *self._statistics.policy_variables(), *self._encoder.variables,
                *self._reward_layer.variables]

    def _distribution(self, time_step, policy_state):
        observation, mask = time_step.observation, None
        if self.observation_and_action_constraint_splitter is not None:
            observation, mask = self.observation_and_action_constraint_splitter(observation)
        encoding, _ = self._encoder(observation)

        def epsilon_greedy():
            arms = linear.num_actions(self.action_spec)
            mean = tf.reshape(self._reward_layer(encoding), [-1, arms])  # per-arm: [batch, candidates, 1]
            batch = tf.shape(mean)[0]
            explores = tf.random.uniform([batch]) < self._epsilon
            if mask is None:
                uniform = tf.random.uniform([batch], maxval=arms, dtype=tf.int32)
                greedy = tf.argmax(mean, axis=-1, output_type=tf.int32)
            else:
                allowed = tf.cast(mask, tf.bool)
                uniform = tf.argmax(tf.where(allowed, tf.random.uniform(tf.shape(mean)), -1.0), axis=-1,
                                    output_type=tf.int32)
                greedy = tf.argmax(tf.where(allowed, mean, -np.inf), axis=-1, output_type=tf.int32)
            return tf.where(explores, uniform, greedy), mean

        def linucb():
            arm, mean, *_ = linear.choose(self._statistics, encoding, self._alpha, linear.optimistic, mask)
            return arm, tf.cast(mean, tf.float32)

        arm, mean = tf.cond(self._uses_reward_layer, epsilon_greedy, linucb)
        return linear.deterministic_step(arm, mean, self.action_spec, policy_state, time_step.observation)


class VectorizedNeuralLinUCBAgent(tf_agent.TFAgent):
    """TF-Agents' NeuralLinUCB with batched LinUCB statistics."""

    def __init__(self, time_step_spec, action_spec, encoder, encoding_dim: int,
                 encoding_network_num_train_steps: int, optimizer, alpha: float, epsilon: float,
                 observation_and_action_constraint_splitter=None, name: str | None = None):
        tf.Module.__init__(self, name=name)
        models = 1 if has_per_arm_features(time_step_spec) else linear.num_actions(action_spec)
        encoder.create_variables()
        self.encoder = encoder
        self.reward_layer = tf.keras.layers.Dense(
            models, use_bias=False, kernel_initializer=tf.random_uniform_initializer(-0.03, 0.03),
            name="reward_layer")
        self.reward_layer.build(tf.TensorShape([None, encoding_dim]))
        self._optimizer = optimizer
        self._encoding_dim = encoding_dim
        self._encoding_network_num_train_steps = encoding_network_num_train_steps
        self.statistics = linear.ArmStatistics(models, encoding_dim, TIKHONOV_WEIGHT)
        self.uses_reward_layer = tf.Variable(True, name="uses_reward_layer")
        policy = VectorizedNeuralLinUCBPolicy(time_step_spec, action_spec, encoder, self.reward_layer,
                                              self.statistics, self.uses_reward_layer, alpha, epsilon,
                                              observation_and_action_constraint_splitter)
        # Its own counter: TF-Agents' default, the process-wide global step, would carry the
        # train steps of every earlier agent in the process into the phase switch.
        super().__init__(time_step_spec, action_spec, policy, policy, train_sequence_length=None,
                         train_step_counter=tf.Variable(0, dtype=tf.int64, name="train_step"))

    def _initialize(self):
        pass

    def _train(self, experience, weights=None):
        observation, arm, reward = linear.flat_experience(experience, self._time_step_spec, self._action_spec)
        # Set before training, as TF-Agents does: the policy switches one loop after the last encoder step.
        self.uses_reward_layer.assign(self.train_step_counter < self._encoding_network_num_train_steps)
        loss = tf.cond(self.uses_reward_layer, lambda: self._train_encoder(observation, arm, reward),
                       lambda: self._update_linucb(observation, arm, reward))
        self.train_step_counter.assign_add(1)
        return tf_agent.LossInfo(loss=loss, extra=())

    def _encode(self, observation):
        """[rows, encoding_dim]; with per-arm features each row offers one (the chosen) movie."""
        return tf.reshape(self.encoder(observation, training=True)[0], [-1, self._encoding_dim])

    def _train_encoder(self, observation, arm, reward):
        variables = self.encoder.trainable_weights + self.reward_layer.trainable_weights
        with tf.GradientTape() as tape:
            predicted = tf.gather(self.reward_layer(self._encode(observation)), arm, batch_dims=1)
            loss = tf.reduce_mean(tf.square(predicted - tf.cast(reward, tf.float32)))
        self._optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return loss

    def _update_linucb(self, observation, arm, reward):
        return tf.cast(self.statistics.update(self._encode(observation), arm, reward), tf.float32)


def vectorized(time_step_spec, action_spec, learning_rate: float, alpha: float, epsilon: float,
               layers: list[int], encoding_dim: int, encoding_network_num_train_steps: int,
               observation_and_action_constraint_splitter=None, name: str = "neural_linucb"):
    check_hyperparameters(learning_rate, alpha, epsilon, layers, encoding_dim, encoding_network_num_train_steps)
    return VectorizedNeuralLinUCBAgent(
        time_step_spec, action_spec, _encoder(time_step_spec, layers, encoding_dim), encoding_dim,
        encoding_network_num_train_steps, tf.compat.v1.train.AdamOptimizer(learning_rate=learning_rate),
        alpha, epsilon, observation_and_action_constraint_splitter, name=name)


def tf_agents_reference(time_step_spec, action_spec, learning_rate: float, alpha: float, epsilon: float,
                        layers: list[int], encoding_dim: int, encoding_network_num_train_steps: int,
                        observation_and_action_constraint_splitter=None, name: str = "neural_linucb_tf_agents"):
    """TF-Agents' own `NeuralLinUCBAgent`."""
    check_hyperparameters(learning_rate, alpha, epsilon, layers, encoding_dim, encoding_network_num_train_steps)
    # The agent counts its train steps on the process-wide global step whatever it is given;
    # a fresh one per agent keeps an earlier agent's steps out of its phase switch.
    tf.compat.v1.get_default_graph().clear_collection(tf.compat.v1.GraphKeys.GLOBAL_STEP)
    return neural_linucb_agent.NeuralLinUCBAgent(
        time_step_spec, action_spec, encoding_network=_encoder(time_step_spec, layers, encoding_dim),
        encoding_network_num_train_steps=encoding_network_num_train_steps, encoding_dim=encoding_dim,
        optimizer=tf.compat.v1.train.AdamOptimizer(learning_rate=learning_rate), alpha=alpha,
        epsilon_greedy=epsilon, accepts_per_arm_features=has_per_arm_features(time_step_spec),
        emit_policy_info=("predicted_rewards_mean",),
        observation_and_action_constraint_splitter=observation_and_action_constraint_splitter, name=name)


def check_hyperparameters(learning_rate, alpha, epsilon, layers, encoding_dim, encoding_network_num_train_steps):
    require(learning_rate > 0, "agent.learning_rate", learning_rate, "> 0")
    require(alpha > 0, "agent.alpha", alpha, "> 0")
    require(0 <= epsilon <= 1, "agent.epsilon", epsilon, "in [0, 1]")
    check_layers(layers)
    require(isinstance(encoding_dim, int) and encoding_dim >= 1, "agent.encoding_dim", encoding_dim,
            "an integer >= 1")
    require(isinstance(encoding_network_num_train_steps, int) and encoding_network_num_train_steps >= 0,
            "agent.encoding_network_num_train_steps", encoding_network_num_train_steps,
            "an integer >= 0")


def _encoder(time_step_spec, layers, encoding_dim):
    """A feed-forward encoding of the user features, or, with per-arm features, user, movie
    and common towers encoding each candidate."""
    if has_per_arm_features(time_step_spec):
        return global_and_arm_feature_network.create_feed_forward_common_tower_network(
            time_step_spec.observation, global_layers=tuple(layers), arm_layers=tuple(layers),
            common_layers=tuple(layers), output_dim=encoding_dim)
    return encoding_network.EncodingNetwork(features_spec(time_step_spec), fc_layer_params=(*layers, encoding_dim))
