"""The compiled training loop: collect with the agent's collect policy, train, repeat.

One `tf.function` call runs a chunk of many loops inside a `tf.while_loop` and returns
each loop's metrics, so Python is touched once per chunk, not once per step. This is
TF-Agents' on-policy bandit trainer (driver, replay buffer, `agent.train`, clear) with the
driver and buffer reduced to what an on-policy bandit needs: the `steps_per_loop`
transitions of the loop, stacked along the time axis, are the experience. The
environment is asked for observations (`reset()`), rewards (`outcome()`), the agent's
feedback and any metrics of its own (`src.envs.base.InGraphBandit`).

Where the environment delays its feedback (`feedback_delay`), each loop's transitions wait in a
pending ring of the last `longest + 1` loops with the loop their reward arrives at, and the
agent trains each loop on the transitions arriving then, one step each; the regret is still
charged as the movie is recommended.

With `training.jit_compile`, XLA compiles the loop whole, and the random ops TF-Agents' policies
build draw from a stream of the run's seed (src.xla_draws, src.seeding), so that the run repeats.

An environment and agent built with `replicas` (src.replicas) carry that many independent runs,
each one's rows after the last one's in every batch; the engine sums each replica's metrics
apart and `run_replicas` yields each one's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from src import tf_runtime  # noqa: F401,I001  (before TensorFlow: a quiet start-up)
import tensorflow as tf
from tf_agents.specs import tensor_spec
from tf_agents.trajectories import time_step as ts
from tf_agents.trajectories.policy_step import PolicyStep
from tf_agents.trajectories import trajectory

from src import seeding, xla_draws

log = logging.getLogger(__name__)
# Rewards reconstructed by SVD carry ~1e-14 of rounding: two movies whose ratings tie differ by
# that much, and a pick that close to the best is not a wrong one (src.metrics.DECIMALS).
TIE_TOLERANCE = 1e-9


@dataclass(frozen=True)
class LoopMetrics:
    """Per-loop figures: sums over the loop's interactions (batch_size x steps_per_loop), and the loss."""

    regret: np.ndarray  # float64 [loops]
    reward: np.ndarray  # float64 [loops]
    suboptimal: np.ndarray  # float64 [loops], number of non-optimal picks
    loss: np.ndarray  # float64 [loops], the agent's training loss on the loop's experience (delayed: what arrived)
    # float64 [loops x interactions per loop, columns]: each round as the environment logs it
    # (`logged_round`) and then what the log keeps of the collect policy's step; None unless recorded.
    interactions: np.ndarray | None = None
    # The environment's own metrics (its `extra_metric_names`), float64 [loops] sums like the regret.
    extras: dict[str, np.ndarray] = field(default_factory=dict)


def configure_threads(intra_op: int, inter_op: int) -> None:
    """Thread pools sized for small ops on few cores; only possible before TF's first op."""
    try:
        tf.config.threading.set_intra_op_parallelism_threads(intra_op)
        tf.config.threading.set_inter_op_parallelism_threads(inter_op)
    except RuntimeError:
        log.debug("TensorFlow already initialised; keeping its thread settings")


# Maps the collect policy's `PolicyStep` to what the interaction log keeps of it, [batch, columns]
# float64: the pick's propensity, or a slate policy's score of each candidate (src.agents.logged_policy).
PolicyColumns = Callable[[PolicyStep], tf.Tensor]


class Engine:
    """Runs `agent` on the in-graph bandit `environment`, `chunk` loops per compiled call.

    With `policy_columns`, each chunk also returns every interaction as logged bandit feedback
    for off-policy evaluation: the environment's columns of the round, then these of the policy's.
    """

    def __init__(self, environment, agent, steps_per_loop: int, policy_columns: PolicyColumns | None = None, *,
                 seed: int, jit_compile: bool = False):
        """`seed` is the run's: the delays of its feedback draw from its stream, the same for every
        agent on the environment. With `jit_compile`, XLA compiles the loop (`training.jit_compile`),
        its stateful random ops drawing from another stream of the seed (src.xla_draws)."""
        self.environment = environment
        self.agent = agent
        self.steps_per_loop = steps_per_loop
        self.replicas = getattr(environment, "replicas", 1)
        self.interactions_per_loop = environment.batch_size // self.replicas * steps_per_loop  # each replica's
        self.policy_columns = policy_columns
        self.traces = 0
        self._delay = environment.feedback_delay
        if self._delay.active:
            self._make_pending(environment.feedback_delay, environment.batch_size * steps_per_loop, seed)
        self._draws = seeding.stream(seed, seeding.XLA) if jit_compile else None
        self.run_chunk = tf.function(self._run_chunk, input_signature=[tf.TensorSpec([], tf.int32)], autograph=False,
                                     jit_compile=jit_compile)
        # An engine traces its loop once, but TensorFlow counts traces by the Python code, not the
        # engine, and warns of "retracing" where 5 of its last 10 calls traced: a process training
        # many short runs (a worker's trials, a board's groups, the tests); `traces` counts this
        # engine's own. No public switch: TensorFlow's deserialised functions set the same flag.
        self.run_chunk._omit_frequent_tracing_warning = True

    def _collect_step(self):
        env = self.environment
        time_step = env.reset()
        action_step = self.agent.collect_policy.action(time_step)
        reward, optimal_reward = env.outcome(action_step.action)
        # Not `env.step()`: it would draw the next users only for the trajectory to drop
        # them (a transition keeps the next step's type, reward and discount, not its
        # observation), and the next `reset()` draws again. Skipping it saves ~10-25% of
        # a loop for neural epsilon-greedy on 2 cores.
        next_time_step = ts.termination(time_step.observation, env.feedback(action_step.action, reward))
        transition = trajectory.from_transition(time_step, action_step, next_time_step)
        # By reward, not by index: a movie tied with the best one is no wrong pick.
        suboptimal = tf.cast(reward < optimal_reward - TIE_TOLERANCE, tf.float64)
        metrics = tf.stack([self._per_replica(optimal_reward - reward), self._per_replica(reward),
                            self._per_replica(suboptimal)], axis=1)
        if env.extra_metric_names:
            metrics = tf.concat([metrics, self._per_replica(env.extra_metrics(action_step.action))], axis=1)
        return transition, metrics, self._interactions(action_step)

    def _per_replica(self, values: tf.Tensor) -> tf.Tensor:
        """[replicas, ...] each replica's sum of values [batch, ...]."""
        return tf.reduce_sum(tf.reshape(values, tf.concat([[self.replicas, -1], tf.shape(values)[1:]], axis=0)),
                             axis=1)

    def _make_pending(self, delay, rows_per_loop: int, seed: int) -> None:
        """The ring of the last `delay.longest + 1` loops' transitions, one step each (slot s holds
        rows s x rows_per_loop onwards), and the loop each one's reward arrives at (-1: never);
        the delays draw from the stream of the run's `seed`."""
        rows = (delay.longest + 1) * rows_per_loop
        self._pending = [tf.Variable(tf.zeros([rows, 1, *leaf.shape], leaf.dtype), trainable=False)
                         for leaf in tf.nest.flatten(self._training_spec())]
        self._arrives = tf.Variable(tf.fill([rows], tf.constant(-1, tf.int64)), trainable=False)
        self._rows_per_loop = rows_per_loop
        self._loop = tf.Variable(tf.constant(0, tf.int64), trainable=False)
        self._delays = seeding.stream(seed, seeding.DELAYS)

    def _training_spec(self):
        """The spec of one transition as the agent trains on it: the collect policy's trajectory as
        the environment's `training_experience` turns it (a slate's, into its slotted movies)."""
        one = tensor_spec.zero_spec_nest(self.agent.collect_policy.trajectory_spec, outer_dims=(1, 1))
        return tf.nest.map_structure(lambda leaf: tf.TensorSpec(leaf.shape[2:], leaf.dtype),
                                     self.environment.training_experience(one))

    def _train_on_arrivals(self, experience, delays):
        """File the loop's transitions as pending, their rewards due `delays` [rows] loops from now
        (-1: never), and train on those whose rewards arrive now (no step where none do: an empty
        batch's mean loss is NaN); the loss, 0 without a step (a NaN is what the training's
        divergence check stops a run for)."""
        rows = self._rows_per_loop
        slots = self._arrives.shape[0] // rows
        filed = (tf.math.floormod(self._loop, slots) * rows + tf.range(rows, dtype=tf.int64))[:, None]
        for pending, leaf in zip(self._pending, tf.nest.flatten(experience)):
            pending.scatter_nd_update(filed, tf.reshape(leaf, [rows, 1, *leaf.shape[2:]]))
        self._arrives.scatter_nd_update(filed, tf.where(delays < 0, delays, self._loop + delays))
        due = tf.where(tf.equal(self._arrives, self._loop))[:, 0]
        arrived = tf.nest.pack_sequence_as(experience, [tf.gather(pending, due) for pending in self._pending])
        self._loop.assign_add(1)
        return tf.cond(tf.size(due) > 0, lambda: tf.cast(self.agent.train(arrived).loss, tf.float64),
                       lambda: tf.constant(0.0, tf.float64))

    @property
    def record_interactions(self) -> bool:
        return self.policy_columns is not None

    def _interactions(self, action_step):
        if not self.record_interactions:
            return tf.zeros([0, 0], tf.float64)
        return tf.concat([self.environment.logged_round(action_step.action), self.policy_columns(action_step)],
                         axis=1)

    def _run_loop(self, delays):
        transitions, metrics, interactions = zip(*(self._collect_step() for _ in range(self.steps_per_loop)))
        experience = tf.nest.map_structure(lambda *steps: tf.stack(steps, axis=1), *transitions)
        experience = self.environment.training_experience(experience)
        if self._delay.active:
            loss = self._train_on_arrivals(experience, delays)[None]
        else:
            loss = tf.cast(self.agent.train(experience).loss, tf.float64)
            loss = tf.reduce_mean(loss)[None] if self.replicas == 1 else loss  # a replicated agent's: [replicas]
        summed = tf.add_n(metrics)
        return tf.concat([summed[:, :3], loss[:, None], summed[:, 3:]], axis=1), tf.concat(interactions, axis=0)

    def _run_chunk(self, num_loops):
        self.traces += 1
        if self._draws is None:
            return self._chunk(num_loops)
        with xla_draws.drawn_from(self._draws):
            outputs = self._chunk(num_loops)
        xla_draws.check_repeatable(tf.compat.v1.get_default_graph())
        return outputs

    def _chunk(self, num_loops):
        recorded = self.interactions_per_loop if self.record_interactions else 0

        # A chunk's delays drawn at once: a draw's dozen ops once a chunk, not once a loop.
        delays = (self._delay.sample(self._delays, [num_loops, self._rows_per_loop]) if self._delay.active
                  else tf.zeros([num_loops, 0], tf.int64))

        def body(i, history, interactions):
            loop_metrics, loop_interactions = self._run_loop(delays[i])
            return i + 1, history.write(i, loop_metrics), interactions.write(i, loop_interactions)

        history = tf.TensorArray(tf.float64, size=num_loops,
                                 element_shape=[self.replicas, 4 + len(self.environment.extra_metric_names)])
        interactions = tf.TensorArray(tf.float64, size=num_loops, element_shape=[recorded, None])
        _, history, interactions = tf.while_loop(
            lambda i, *_: i < num_loops, body, (0, history, interactions))
        return history.stack(), interactions.concat()

    def run(self, loops: int, chunk: int):
        """Yield `LoopMetrics` for each chunk of up to `chunk` loops until `loops` have run."""
        for (chunk_metrics,) in self.run_replicas(loops, chunk):
            yield chunk_metrics

    def run_replicas(self, loops: int, chunk: int):
        """Yield each replica's `LoopMetrics` for each chunk of up to `chunk` loops until `loops` have run."""
        done = 0
        while done < loops:
            size = min(chunk, loops - done)
            history, interactions = self.run_chunk(tf.constant(size, tf.int32))
            done += size
            history = history.numpy()
            yield [LoopMetrics(*columns[:4], interactions=interactions.numpy() if self.record_interactions else None,
                               extras=dict(zip(self.environment.extra_metric_names, columns[4:])))
                   for columns in np.transpose(history, (1, 2, 0))]
