"""Disjoint linear reward models, one per movie, with every arm's statistics in one batched
tensor: the part LinUCB, LinTS and NeuralLinUCB's LinUCB head share.

Choosing and training cost a handful of batched ops instead of TF-Agents' per-arm Python
loops over per-arm variables (about 40 ops per loop instead of 1,000: the difference
between ~8k and ~70k interactions/s for LinUCB on 2 cores). Each arm a estimates
theta_a = A_a^-1 b_a with A_a = X_a'X_a + lambda I and b_a = X_a'r_a; an agent differs only
in how it turns the estimate x.theta_a and its width sqrt(x'A_a^-1 x) into a choice.

For a world that drifts they can forget (`Forgetting`): with a discount gamma every training
loop weighs what came before by gamma (A = lambda I + sum_s gamma^(t-s) X_s'X_s, b likewise:
D-LinUCB, Russac, Vernade and Cappe, NeurIPS 2019), or with a window of W only the last W
rows count (SW-LinUCB, Cheung, Simchi-Levi and Zhu, AISTATS 2019).

With per-arm features there are no fixed arms: as in TF-Agents' per-arm agents, one model
is shared by all candidates, over each candidate's features beside its user's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp
from tf_agents.agents import tf_agent
from tf_agents.bandits.specs import utils as bandit_spec_utils
from tf_agents.policies import tf_policy
from tf_agents.policies import utils as policy_utilities
from tf_agents.trajectories import policy_step
from tf_agents.utils import nest_utils

from src import seeding
from src.agents import features_spec, has_action_mask, has_per_arm_features, is_slate, monte_carlo, slates
from src.errors import require

# What a model per arm is scored in; the statistics themselves stay float64 (see ArmStatistics).
SCORING_DTYPE = tf.float32

# (mean, width) -> the score each arm is ranked by, width already scaled by alpha: [batch, arms]
# (or [batch, candidates] for one shared model).
Exploration = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]
# A hyperparameter's value, or with replicas (src.replicas) one value per replica.
PerReplica = float | Sequence[float]


@dataclass(frozen=True)
class Forgetting:
    """How the statistics forget: `discount` per training loop in (0, 1] (1: never), or a
    `window` of the last rows (None: every row)."""

    discount: float = 1.0
    window: int | None = None

    def __post_init__(self):
        require(0 < self.discount <= 1, "agent.discount", self.discount, "in (0, 1] (1: no discount)")
        require(self.window is None or (isinstance(self.window, int) and self.window >= 1), "agent.window",
                self.window, "a positive number of interactions, or null for every one")
        require(self.discount == 1 or self.window is None, "agent.window", self.window,
                "null with agent.discount < 1 (forget by one or the other)")


def check_hyperparameters(alpha: PerReplica, tikhonov_weight: PerReplica) -> None:
    for value in each_value(alpha):
        require(value > 0, "agent.alpha", value, "> 0")
    # A zero ridge leaves A singular before an arm is tried: LinUCB then always picks
    # action 0 (tensorflow/agents#698).
    for value in each_value(tikhonov_weight):
        require(value > 0, "agent.tikhonov_weight", value, "> 0")


def each_value(values: PerReplica) -> Sequence[float]:
    return values if isinstance(values, Sequence) else [values]


def per_replica(values: PerReplica, repeats, dtype) -> tf.Tensor | float:
    """A hyperparameter as a column of rows, each replica's value on its `repeats` rows, where
    replicas differ; else the one value."""
    if isinstance(values, int | float):
        return values
    return tf.repeat(tf.constant(values, dtype), repeats)[:, None]


def num_actions(action_spec) -> int:
    return int(action_spec.maximum - action_spec.minimum + 1)


class ArmStatistics(tf.Module):
    """A_a, b_a, A_a^-1 and theta_a for every arm, as [arms, dim, dim] and [arms, dim] tensors.

    Kept in float64: with a small ridge (TF-Agents' example uses 0.001) the float32 inverse
    of a nearly singular A loses the confidence widths that drive exploration. With a model
    per arm, arms are scored from float32 copies of theta and of A^-1's upper triangles,
    stored arms last and written at each update: scoring every arm is the one large product
    of a step, and in float32 it takes half the time (at 1,682 movies, most of a LinUCB
    step). One shared model (per-arm features) scores its few candidates in float64.

    `replicas` independent runs (src.replicas) keep theirs side by side: replica r's arm a is
    arm r x num_arms + a of the statistics, and each replica's scoring copies are a block of
    their own, which scores that replica's users against its own arms. Each may have a ridge of
    its own (`tikhonov_weight`, one per replica).
    """

    def __init__(self, num_arms: int, dim: int, tikhonov_weight: PerReplica, forgetting: Forgetting = Forgetting(),
                 replicas: int = 1, name: str | None = None):
        super().__init__(name=name)
        self._forgetting = forgetting
        self.replicas = replicas
        tikhonov_weight = per_replica(tikhonov_weight, num_arms, tf.float64)
        if not isinstance(tikhonov_weight, float | int):
            tikhonov_weight = tikhonov_weight[:, :, None]  # [arms, 1, 1], over each arm's matrix
        self._ridge = tikhonov_weight * tf.eye(dim, dtype=tf.float64)
        identity = tf.eye(dim, batch_shape=[replicas * num_arms], dtype=tf.float64)
        self.covariance = tf.Variable(tikhonov_weight * identity, name="covariance")
        self.data_vector = tf.Variable(tf.zeros([replicas * num_arms, dim], tf.float64), name="data_vector")
        self.covariance_inverse = tf.Variable(identity / tikhonov_weight, name="covariance_inverse")
        self.theta = tf.Variable(tf.zeros([replicas * num_arms, dim], tf.float64), name="theta")
        # A^-1 is symmetric: x'A^-1 x = sum over i <= j of w_ij x_i x_j A^-1_ij, with w_ij = 2 off
        # the diagonal. Its upper triangle, kept row by row beside A^-1, makes the widths of all
        # arms one matrix product of half the size.
        rows, columns = np.triu_indices(dim)
        self._upper = tf.constant(rows * dim + columns)
        self._upper_weights = tf.constant(np.where(rows == columns, 1.0, 2.0), SCORING_DTYPE)
        # Stored arms last and flat, a replica's block after another's (see every_arm, write_columns).
        self._num_arms = num_arms
        self.scoring_theta = tf.Variable(tf.zeros([replicas * dim * num_arms], SCORING_DTYPE), name="scoring_theta")
        packed = tf.reshape(self._pack(identity / tikhonov_weight), [replicas, num_arms, -1])
        self.packed_inverse = tf.Variable(tf.reshape(tf.transpose(packed, [0, 2, 1]), [-1]), name="packed_inverse")
        if forgetting.window:  # the last `window` rows, a ring; `rows_seen` says which slots hold one
            self.window_rows = tf.Variable(tf.zeros([forgetting.window, dim], tf.float64), name="window_rows")
            self.window_arms = tf.Variable(tf.zeros([forgetting.window], tf.int32), name="window_arms")
            self.window_rewards = tf.Variable(tf.zeros([forgetting.window], tf.float64), name="window_rewards")
            self.rows_seen = tf.Variable(tf.constant(0, tf.int64), name="rows_seen")

    def policy_variables(self) -> list[tf.Variable]:
        """What a policy scoring with these statistics reads, for its `_variables()` (TF-Agents'
        `policy.variables()` itself lists what tf.Module tracking finds)."""
        return [self.theta, self.covariance_inverse, self.scoring_theta, self.packed_inverse]

    def _pack(self, matrices: tf.Tensor) -> tf.Tensor:
        """The upper triangles of [n, dim, dim] symmetric matrices as [n, dim (dim + 1) / 2] rows."""
        flat = tf.reshape(tf.cast(matrices, SCORING_DTYPE), [tf.shape(matrices)[0], -1])
        return tf.gather(flat, self._upper, axis=1)

    def shared_model(self, x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """x.theta and x'A^-1 x of the one model shared by all candidates, for each candidate of
        x [batch, candidates, dim] (per-arm features): [batch, candidates] float64. Replicas'
        rows are scored by their own models, a product each, as `every_arm`'s are."""
        x = tf.cast(x, tf.float64)
        # tensordot: one [batch * candidates, dim] product; batched matmuls over the batch
        # took ~3x longer, a fifth of a slate loop.
        means, variances = zip(*((tf.tensordot(users, theta, axes=1),
                                  tf.reduce_sum(tf.tensordot(users, inverse, axes=1) * users, axis=-1))
                                 for users, theta, inverse in zip(tf.split(x, self.replicas), tf.unstack(self.theta),
                                                                  tf.unstack(self.covariance_inverse))))
        return tf.concat(means, axis=0), tf.maximum(tf.concat(variances, axis=0), 0.0)

    def _arms_last(self, flat: tf.Variable) -> tf.Tensor:
        """[rows, arms], or [replicas, rows, arms]."""
        shape = [-1, self._num_arms] if self.replicas == 1 else [self.replicas, -1, self._num_arms]
        return tf.reshape(flat.read_value_no_copy(), shape)

    def by_replica(self, rows: tf.Tensor) -> tf.Tensor:
        """[batch, ...] rows, replica after replica, as [replicas, batch / replicas, ...]."""
        return tf.reshape(rows, tf.concat([[self.replicas, -1], tf.shape(rows)[1:]], axis=0))

    def global_arms(self, arm: tf.Tensor) -> tf.Tensor:
        """The statistics' arms of zero-based `arm` [n], rows replica after replica."""
        if self.replicas == 1:
            return arm
        rows = tf.shape(arm)[0]
        return arm + self._num_arms * (tf.range(rows) // (rows // self.replicas))

    def take_replica(self, group: ArmStatistics, replica: int) -> None:
        """These (a single run's) statistics become `group`'s replica `replica`'s."""
        arms = slice(replica * self._num_arms, (replica + 1) * self._num_arms)
        for mine, theirs in ((self.covariance, group.covariance), (self.data_vector, group.data_vector),
                             (self.covariance_inverse, group.covariance_inverse), (self.theta, group.theta)):
            mine.assign(theirs[arms])
        for mine, theirs in ((self.scoring_theta, group.scoring_theta), (self.packed_inverse, group.packed_inverse)):
            block = mine.shape[0]
            mine.assign(theirs[replica * block:(replica + 1) * block])

    def every_arm(self, x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """x.theta_a and x'A_a^-1 x for each row of x [batch, dim] and each arm a: [batch, arms],
        in `SCORING_DTYPE`.

        The scoring copies are stored arms last, so both products are [batch, k] x [k, arms]
        with nothing transposed: at 1,682 arms Eigen ran the widths' product 2.5x faster this
        way than as [arms, 210] x [210, batch] from copies stored arms first. Reads without a
        copy: a variable that is also updated sparsely (scatter, gather) is otherwise copied
        whole at every dense read, 1.4 MB a step at 1,682 arms."""
        x = tf.cast(x, SCORING_DTYPE)
        dim = x.shape[-1]
        # x'A^-1 x as one matrix product of packed upper triangles: TensorFlow's einsum over
        # [batch, arms, dim, dim] took ~5x longer unpacked, ~10x packed, at 1,682 arms.
        outer = tf.reshape(x[..., :, None] * x[..., None, :], [-1, dim * dim])
        packed_outer = tf.gather(outer, self._upper, axis=1) * self._upper_weights
        if self.replicas == 1:
            variance = tf.matmul(packed_outer, self._arms_last(self.packed_inverse))
            mean = tf.matmul(x, self._arms_last(self.scoring_theta))
        else:
            # Each replica's users against its own arms, a product per replica: a batched product
            # rounds otherwise than the run alone's (Eigen, at rank < 10), and a tie between arms
            # never tried, broken by that rounding, sends a replica another way than its run.
            variance = tf.concat([tf.matmul(users, arms) for users, arms in
                                  zip(tf.split(packed_outer, self.replicas), tf.unstack(self._arms_last(self.packed_inverse)))], 0)
            mean = tf.concat([tf.matmul(users, arms) for users, arms in
                              zip(tf.split(x, self.replicas), tf.unstack(self._arms_last(self.scoring_theta)))], 0)
        return mean, tf.maximum(variance, 0.0)

    def update(self, x: tf.Tensor, arm: tf.Tensor, reward: tf.Tensor) -> tf.Tensor:
        """Add rows x [n, dim] with their arms (`global_arms`) and rewards [n] (forgetting as
        `Forgetting` says); returns the mean squared error of the estimates before the update,
        each replica's [replicas].

        Only the arms chosen in these rows change, so only theirs are gathered, inverted and
        written back: a batch of 16 rows touches at most 16 arms. With the whole catalogue
        (1,682 movies) LinUCB went from 418 to 763 interactions/s, and from 19,500 to 23,800
        with 20 (one measurement each, 2 cores). A discount changes every arm, each loop."""
        x, reward = tf.cast(x, tf.float64), tf.cast(reward, tf.float64)
        error = tf.reduce_sum(x * tf.gather(self.theta, arm), axis=-1) - reward
        if self._forgetting.discount < 1:
            self._discounted_update(x, arm, reward)
        else:
            weight = tf.ones_like(reward)
            if self._forgetting.window:
                x, arm, reward, weight = self._through_window(x, arm, reward)
            self._sparse_update(x, arm, reward, weight)
        if self.replicas == 1:
            return tf.reduce_mean(tf.square(error))
        return tf.reduce_mean(self.by_replica(tf.square(error)), axis=1)

    def _added(self, x, arm, reward, weight, arms: tf.Tensor, count) -> tuple[tf.Tensor, tf.Tensor]:
        """sum of weight x x' and of weight r x per arm, over `count` arms indexed by `arms` [n]
        (one shared model: each replica's, the rows a block per replica, replica after replica)."""
        if self._num_arms == 1:
            # One shared model (per-arm features, slates), each replica's on its rows: X'X as one
            # product each. The outer products and their segment sum took a fifth of a slate loop
            # (80 rows of 40).
            parts = zip(tf.split(x, self.replicas), tf.split(weight, self.replicas), tf.split(reward, self.replicas))
            added_covariance, added_data = zip(*((tf.matmul(rows * weights[:, None], rows, transpose_a=True),
                                                  tf.matmul((weights * rewards)[None], rows)[0])
                                                 for rows, weights, rewards in parts))
            return tf.stack(added_covariance), tf.stack(added_data)
        added_covariance = tf.math.unsorted_segment_sum(tf.einsum("ni,nj->nij", x * weight[:, None], x), arms, count)
        return added_covariance, tf.math.unsorted_segment_sum((weight * reward)[:, None] * x, arms, count)

    def _sparse_update(self, x, arm, reward, weight) -> None:
        touched, row_of = tf.unique(arm)
        added_covariance, added_data = self._added(x, arm, reward, weight, row_of, tf.size(touched))
        self._write(touched, tf.gather(self.covariance, touched) + added_covariance,
                    tf.gather(self.data_vector, touched) + added_data)

    def _discounted_update(self, x, arm, reward) -> None:
        """Every arm's statistics decay by the discount, the ridge kept whole, then these rows add."""
        gamma = self._forgetting.discount
        everyone = tf.range(self.replicas * self._num_arms)
        added_covariance, added_data = self._added(x, arm, reward, tf.ones_like(reward), arm,
                                                   self.replicas * self._num_arms)
        self._write(everyone, self._ridge + gamma * (self.covariance - self._ridge) + added_covariance,
                    gamma * self.data_vector + added_data)

    def _through_window(self, x, arm, reward):
        """These rows into the window's ring, and the rows they push out of it, with weight -1:
        the rows to add to the statistics."""
        window = self._forgetting.window
        slots = tf.math.floormod(self.rows_seen + tf.range(tf.shape(x, out_type=tf.int64)[0]), window)
        leaving = tf.cast(self.rows_seen + tf.range(tf.shape(x, out_type=tf.int64)[0]) >= window, tf.float64)
        old_x, old_arm = tf.gather(self.window_rows, slots), tf.gather(self.window_arms, slots)
        old_reward = tf.gather(self.window_rewards, slots)
        self.window_rows.scatter_nd_update(slots[:, None], x)
        self.window_arms.scatter_nd_update(slots[:, None], arm)
        self.window_rewards.scatter_nd_update(slots[:, None], reward)
        self.rows_seen.assign_add(tf.shape(x, out_type=tf.int64)[0])
        return (tf.concat([x, old_x], 0), tf.concat([arm, old_arm], 0), tf.concat([reward, old_reward], 0),
                tf.concat([tf.ones_like(reward), -leaving], 0))

    def _write(self, arms: tf.Tensor, covariance: tf.Tensor, data_vector: tf.Tensor) -> None:
        """The statistics of `arms` [n], their inverses, estimates and scoring copies."""
        covariance_inverse = tf.linalg.inv(covariance)
        rows = arms[:, None]
        self.covariance.scatter_nd_update(rows, covariance)
        self.data_vector.scatter_nd_update(rows, data_vector)
        self.covariance_inverse.scatter_nd_update(rows, covariance_inverse)
        write_columns(self.packed_inverse, self._num_arms, arms, self._pack(covariance_inverse))
        theta = tf.einsum("aij,aj->ai", covariance_inverse, data_vector)
        self.theta.scatter_nd_update(rows, theta)
        write_columns(self.scoring_theta, self._num_arms, arms, tf.cast(theta, SCORING_DTYPE))


def write_columns(flat: tf.Variable, num_columns: int, columns: tf.Tensor, values: tf.Tensor) -> None:
    """Writes values [n, rows] into the `columns` [n] of a [rows, num_columns] matrix kept flat
    in `flat`, or of block `column // num_columns` of [blocks, rows, num_columns] (replicas).
    TensorFlow scatters slices only along a variable's first axis; into a flat one, single
    elements took ~15 us a loop at 1,682 arms, scatter_nd's [row, column] pairs into a matrix
    ~130 us."""
    rows = tf.shape(values, out_type=columns.dtype)[1]
    block, column = columns // num_columns, columns % num_columns
    positions = (tf.range(rows)[:, None] + (block * rows)[None, :]) * num_columns + column[None, :]
    flat.scatter_update(tf.IndexedSlices(tf.reshape(tf.transpose(values), [-1]), tf.reshape(positions, [-1])))


def optimistic(mean: tf.Tensor, width: tf.Tensor) -> tf.Tensor:
    """LinUCB: the upper confidence bound."""
    return mean + width


class Sampled(tf.Module):
    """Linear Thompson sampling: x.theta_a for theta_a ~ N(A_a^-1 b_a, alpha^2 A_a^-1), drawn
    for each user and arm. That is N(x.theta_a, alpha^2 x'A_a^-1 x), so one normal per
    pair replaces a Cholesky factor per arm; TF-Agents' agent draws the same way.

    Drawn from a generator of each run's own (seeded from its seed), so that a replica of a
    group (src.replicas) draws what the run alone would."""

    def __init__(self, seeds: list[int]):
        super().__init__(name="sampled")
        self.generators = [seeding.stream(seed, seeding.POLICY) for seed in seeds]

    def __call__(self, mean: tf.Tensor, width: tf.Tensor) -> tf.Tensor:
        if len(self.generators) == 1:
            return mean + width * self.generators[0].normal(tf.shape(mean), dtype=mean.dtype)
        # [replicas x users, arms]: each replica's users draw from its generator
        shape = tf.concat([[tf.shape(mean)[0] // len(self.generators)], tf.shape(mean)[1:]], axis=0)
        noise = tf.concat([generator.normal(shape, dtype=mean.dtype) for generator in self.generators], axis=0)
        return mean + width * noise


class VectorizedLinearPolicy(tf_policy.TFPolicy):
    """Picks the arm with the best `exploration` score; reads the statistics, owns none."""

    def __init__(self, time_step_spec, action_spec, statistics: ArmStatistics, alpha: PerReplica,
                 exploration: Exploration, epsilon: float = 0.0, propensity_draws: int = 0,
                 observation_and_action_constraint_splitter=None, name=None):
        self._statistics = statistics
        self._alpha = alpha
        self._exploration = exploration
        self._epsilon = epsilon
        self._propensity_draws = propensity_draws
        super().__init__(time_step_spec, action_spec,
                         info_spec=mean_info_spec(action_spec, time_step_spec, optimistic=epsilon > 0,
                                                  log_probability=propensity_draws > 0),
                         observation_and_action_constraint_splitter=observation_and_action_constraint_splitter,
                         name=name)

    def _variables(self):
        return self._statistics.policy_variables()

    def _distribution(self, time_step, policy_state):
        observation, mask = time_step.observation, None
        if self.observation_and_action_constraint_splitter is not None:
            observation, mask = self.observation_and_action_constraint_splitter(observation)
        features = candidate_features(observation) if has_per_arm_features(self.time_step_spec) else observation
        if is_slate(self.action_spec):  # the best-scoring candidates, best first
            mean, variance = self._statistics.shared_model(features)
            slate = slates.top_slate(self._exploration(mean, self._alpha * tf.sqrt(variance)),
                                     slates.slate_size(self.action_spec))
            info = policy_utilities.PolicyInfo(predicted_rewards_mean=tf.cast(mean, tf.float32))
            return policy_step.PolicyStep(tfp.distributions.Deterministic(slate), policy_state, info)
        rows_per_replica = tf.shape(features)[0] // self._statistics.replicas
        # A model per arm scores in SCORING_DTYPE, one shared model (per-arm features) in float64.
        alpha = per_replica(self._alpha, rows_per_replica, tf.float64 if len(features.shape) == 3 else SCORING_DTYPE)
        arm, mean, scores, width = choose(self._statistics, features, alpha, self._exploration, mask)
        if self._propensity_draws:
            return deterministic_step(arm, mean, self.action_spec, policy_state, observation,
                                      log_probability=self._drawn_log_probability(arm, mean, width))
        if not self._epsilon:
            return deterministic_step(arm, mean, self.action_spec, policy_state, observation)
        # A uniformly drawn arm with probability epsilon, so that the logs carry propensities; the
        # scores go in the info, which is where the greedy arm, and so each propensity, is read back.
        explored = tf.random.uniform(tf.shape(arm)) < self._epsilon
        drawn = tf.random.uniform(tf.shape(arm), maxval=tf.shape(scores)[-1], dtype=arm.dtype)
        return deterministic_step(tf.where(explored, drawn, arm), mean, self.action_spec, policy_state, observation,
                                  optimistic=scores)


    def _drawn_log_probability(self, arm, mean, width):
        """log P(arm wins), by Monte Carlo: the share of `propensity_draws` fresh draws of the
        sampled scores that `arm` wins, the draw that chose it counted among them, so that a
        propensity is never 0 (it is at least 1 / (draws + 1))."""
        draws = self._propensity_draws
        shape = tf.concat([[draws], tf.shape(mean)], axis=0)
        winners = tf.argmax(self._exploration(tf.broadcast_to(mean, shape), tf.broadcast_to(width, shape)), axis=-1,
                            output_type=tf.int32)
        wins = tf.reduce_sum(tf.cast(tf.equal(winners, arm[None]), tf.float32), axis=0)
        return monte_carlo.log_share_won(wins, draws)


def choose(statistics: ArmStatistics, x: tf.Tensor, alpha: float, exploration: Exploration,
           mask: tf.Tensor | None = None):
    """The best-scoring zero-based arm [batch] (among those `mask` [batch, arms] allows); every
    arm's mean estimate, score and width (alpha x its standard deviation) [batch, arms], for
    x [batch, dim] and a model per arm, or x [batch, candidates, dim] and one shared model."""
    mean, variance = statistics.shared_model(x) if len(x.shape) == 3 else statistics.every_arm(x)
    width = alpha * tf.sqrt(variance)
    scores = exploration(mean, width)
    allowed = scores if mask is None else tf.where(tf.cast(mask, tf.bool), scores, -np.inf)
    return tf.argmax(allowed, axis=-1, output_type=tf.int32), mean, scores, width


def candidate_features(observation) -> tf.Tensor:
    """[batch, candidates, user + movie dims]: each candidate's features beside its user's, the
    context TF-Agents' per-arm linear agents score."""
    users, movies = observation[bandit_spec_utils.GLOBAL_FEATURE_KEY], observation[bandit_spec_utils.PER_ARM_FEATURE_KEY]
    return tf.concat([tf.repeat(users[:, None, :], tf.shape(movies)[1], axis=1), movies], axis=-1)


def mean_info_spec(action_spec, time_step_spec, optimistic: bool = False, log_probability: bool = False):
    """The mean estimates (with `optimistic`, each arm's score; with `log_probability`, the
    chosen arm's); with per-arm features, also the chosen candidate's features, which training
    reads back from the trajectory as TF-Agents' per-arm agents do (a slate's training reads them
    from the slotted experience)."""
    mean = tf.TensorSpec([num_actions(action_spec)], tf.float32)
    extra = {"predicted_rewards_optimistic": mean} if optimistic else {}
    if log_probability:
        extra["log_probability"] = tf.TensorSpec([], tf.float32)
    if has_per_arm_features(time_step_spec) and not is_slate(action_spec):
        return policy_utilities.PerArmPolicyInfo(
            predicted_rewards_mean=mean, **extra,
            chosen_arm_features=policy_utilities.create_chosen_arm_features_info_spec(time_step_spec.observation))
    return policy_utilities.PolicyInfo(predicted_rewards_mean=mean, **extra)


def deterministic_step(arm, mean, action_spec, policy_state, observation, optimistic=None,
                       log_probability=None) -> policy_step.PolicyStep:
    """A `PolicyStep` picking zero-based `arm`, with the policy info of `mean_info_spec` (the
    scores `optimistic` and the chosen arm's `log_probability` too, when given)."""
    actions = tf.cast(arm, action_spec.dtype) + tf.cast(action_spec.minimum, action_spec.dtype)
    mean = tf.cast(mean, tf.float32)
    extra = {} if optimistic is None else {"predicted_rewards_optimistic": tf.cast(optimistic, tf.float32)}
    if log_probability is not None:
        extra["log_probability"] = log_probability
    if isinstance(observation, dict) and bandit_spec_utils.PER_ARM_FEATURE_KEY in observation:
        chosen = tf.gather(observation[bandit_spec_utils.PER_ARM_FEATURE_KEY], arm, batch_dims=1)
        info = policy_utilities.PerArmPolicyInfo(predicted_rewards_mean=mean, chosen_arm_features=chosen, **extra)
    else:
        info = policy_utilities.PolicyInfo(predicted_rewards_mean=mean, **extra)
    return policy_step.PolicyStep(tfp.distributions.Deterministic(actions), policy_state, info)


def flat_experience(experience, time_step_spec, action_spec):
    """(observation, zero-based action, reward) of every transition, batch and time merged.
    With per-arm features, as TF-Agents' per-arm agents train: the observation offers the chosen
    movie alone, from the policy info, and the action is 0."""

    def flat(tensors, spec):
        return nest_utils.flatten_multi_batched_nested_tensors(tensors, spec)[0]

    observation = flat(experience.observation, time_step_spec.observation)
    if has_action_mask(time_step_spec):  # the mask said what could be picked; the model learns from the rest
        observation = observation[0]
    reward = flat(experience.reward, time_step_spec.reward)
    if has_per_arm_features(time_step_spec):
        chosen_spec = policy_utilities.create_chosen_arm_features_info_spec(time_step_spec.observation)
        chosen = flat(experience.policy_info.chosen_arm_features, chosen_spec)
        observation = {**observation, bandit_spec_utils.PER_ARM_FEATURE_KEY: chosen[:, None, :]}
        return observation, tf.zeros(tf.shape(reward)[:1], tf.int32), reward
    return observation, flat(experience.action, action_spec) - action_spec.minimum, reward


def context_dim(observation_spec) -> int:
    """Features per row a model is fitted on: the user's, plus a movie's with per-arm features."""
    if isinstance(observation_spec, dict):
        return sum(observation_spec[key].shape[-1] for key in
                   (bandit_spec_utils.GLOBAL_FEATURE_KEY, bandit_spec_utils.PER_ARM_FEATURE_KEY))
    return observation_spec.shape[-1]


class VectorizedLinearAgent(tf_agent.TFAgent):
    """One linear model per arm over the observation (one shared model with per-arm features),
    exploring by `exploration`."""

    def __init__(self, time_step_spec, action_spec, alpha: PerReplica, tikhonov_weight: PerReplica,
                 exploration: Exploration, collect_epsilon: float = 0.0, propensity_draws: int = 0,
                 forgetting: Forgetting = Forgetting(), replicas: int = 1,
                 observation_and_action_constraint_splitter=None, name: str | None = None):
        """`collect_epsilon`: the collect policy's share of uniformly drawn arms (the saved,
        greedy policy has none); `propensity_draws`: Monte-Carlo draws by which the collect policy
        of a sampling agent estimates each pick's propensity; `forgetting`: how the statistics
        forget (never, by default); `replicas`: independent runs trained side by side, their
        users' rows one replica's after another's in every batch (src.replicas), alpha and
        tikhonov_weight then a value each or one for all; `observation_and_action_constraint_splitter`:
        (features, action mask) of an observation, where the environment masks actions (a movie
        never allowed keeps its prior: the ridge, a mean of 0 and the widest bound)."""
        check_hyperparameters(alpha, tikhonov_weight)
        require(not (observation_and_action_constraint_splitter and (collect_epsilon or propensity_draws)),
                "agent.log_epsilon" if collect_epsilon else "agent.propensity_draws", collect_epsilon or propensity_draws,
                "0 with an action mask (env.arrivals): logged propensities would need the catalogue of their time")
        tf.Module.__init__(self, name=name)
        models = 1 if has_per_arm_features(time_step_spec) else num_actions(action_spec)
        self.statistics = ArmStatistics(models, context_dim(features_spec(time_step_spec)), tikhonov_weight,
                                        forgetting, replicas)
        self.exploration = exploration
        policy = VectorizedLinearPolicy(time_step_spec, action_spec, self.statistics, alpha, exploration,
                                        observation_and_action_constraint_splitter=
                                        observation_and_action_constraint_splitter)
        collect_policy = VectorizedLinearPolicy(time_step_spec, action_spec, self.statistics, alpha, exploration,
                                                collect_epsilon, propensity_draws) \
            if collect_epsilon or propensity_draws else policy
        super().__init__(time_step_spec, action_spec, policy, collect_policy, train_sequence_length=None)

    def _initialize(self):
        pass

    def take_replica(self, group: VectorizedLinearAgent, replica: int) -> None:
        """This agent, of a single run, becomes `group`'s replica `replica`: its statistics and,
        for a sampling agent, its generator's state, as the run alone would have left them."""
        self.statistics.take_replica(group.statistics, replica)
        for mine, theirs in zip(getattr(self.exploration, "generators", []),
                                getattr(group.exploration, "generators", [])[replica:]):
            mine.reset(theirs.state)

    def _train(self, experience, weights=None):
        if is_slate(self._action_spec):
            observation, arm, reward = self._slotted_rows(experience)
        else:
            observation, arm, reward = flat_experience(experience, self._time_step_spec, self._action_spec)
            if has_per_arm_features(self._time_step_spec):
                observation = candidate_features(observation)[:, 0, :]
        loss = self.statistics.update(observation, self.statistics.global_arms(arm), reward)
        self.train_step_counter.assign_add(1)
        return tf_agent.LossInfo(loss=tf.cast(loss, tf.float32), extra=())

    def _slotted_rows(self, experience):
        """Every slot of every slate that says something, as one row of the shared model: the
        slate's movie beside its user, and the score it earned (a click: 1, a movie above it: 0)."""
        size = slates.slate_size(self._action_spec)
        observation, reward = slates.flat_slates(experience, self._time_step_spec, size)
        scores, weights = slates.scores_and_weights(reward, size)
        said = tf.reshape(weights > 0, [-1])
        rows = tf.boolean_mask(tf.reshape(candidate_features(observation), [-1, self.statistics.theta.shape[-1]]), said)
        return rows, tf.zeros(tf.shape(rows)[:1], tf.int32), tf.boolean_mask(tf.reshape(scores, [-1]), said)


def tf_agents_linear(agent_class, time_step_spec, action_spec, alpha: float, tikhonov_weight: float,
                     use_eigendecomp: bool, name: str, observation_and_action_constraint_splitter=None):
    """TF-Agents' `LinearUCBAgent` or `LinearThompsonSamplingAgent` (same arguments). The
    eigendecomposition replaces a conjugate-gradient solve per arm and step with one batched
    decomposition: the same estimates, ~7x faster for LinUCB and ~27x for LinTS."""
    check_hyperparameters(alpha, tikhonov_weight)
    return agent_class(
        time_step_spec, action_spec, alpha=alpha, tikhonov_weight=tikhonov_weight,
        use_eigendecomp=use_eigendecomp, emit_policy_info=("predicted_rewards_mean",),
        accepts_per_arm_features=has_per_arm_features(time_step_spec), dtype=tf.float32,
        observation_and_action_constraint_splitter=observation_and_action_constraint_splitter, name=name)


