"""TF-Agents' stock bandit training pattern: the baseline our compiled engine is benchmarked
against (`benchmarks/throughput.py`) and checked against (`tests/test_engine.py`).

This is `tf_agents/bandits/agents/examples/v2/trainer.py` as `train_eval_movielens.py` runs
it, all eager: `MovieLensPyEnvironment` in a `TFPyEnvironment`, a `DynamicStepDriver` with
the trainer's observers, a `BanditReplayBuffer`, `agent.train` on the replay buffer's
single deterministic pass, then `clear()`. The trainer's own replay-buffer and
training-loop functions are called, so the pattern is the trainer's, not a re-creation.
Left out: the per-loop checkpoint, policy export and summary writing, which are disk
I/O our engine does not do per loop either; this makes the baseline faster, so the
speedups reported against it are conservative.

Regret comes from TF-Agents' `RegretMetric`, which is correct here because eager mode
runs the `py_function` baseline right after the environment step it belongs to.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from src import tf_runtime  # noqa: F401,I001  (before TensorFlow: a quiet start-up)
from tf_agents.bandits.agents.examples.v2 import trainer
from tf_agents.bandits.environments import environment_utilities, movielens_py_environment
from tf_agents.bandits.metrics import tf_metrics as bandit_metrics
from tf_agents.drivers import dynamic_step_driver
from tf_agents.environments import tf_py_environment
from tf_agents.metrics import tf_metrics

from src.agents import build_agent
from src.experiment import seed_everything

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TimedRun:
    """A training pattern's regret and speed, whichever pattern ran."""

    regret: np.ndarray  # float64 [loops], summed over each loop's interactions, warm-up included
    seconds: float  # wall time of the timed loops only
    timed_loops: int
    interactions_per_loop: int

    @property
    def interactions_per_s(self) -> float:
        return self.timed_loops * self.interactions_per_loop / self.seconds


def run_stock(agent_cfg: DictConfig, data_file: str | Path, *, num_movies: int, rank_k: int,
              batch_size: int, steps_per_loop: int, loops: int, seed: int,
              warmup_loops: int = 0) -> TimedRun:
    """Train the agent `agent_cfg` describes for `loops` loops the way TF-Agents' trainer does.

    `agent_cfg` is the composed `agent` config node, built with `src.agents.build_agent`,
    so the stock pattern and our engine train the same class with the same
    hyperparameters. The first `warmup_loops` loops count towards regret, not time.
    """
    if not 0 <= warmup_loops < loops:
        raise ValueError(f"warmup_loops must be in [0, loops={loops}), got {warmup_loops}")
    # MovieLensPyEnvironment samples users with the global `random`; the agent's
    # initialisation and exploration draw from TensorFlow's global seed.
    seed_everything(seed)
    environment = tf_py_environment.TFPyEnvironment(movielens_py_environment.MovieLensPyEnvironment(
        str(data_file), rank_k, batch_size, num_movies=num_movies, csv_delimiter="\t"))
    agent = build_agent(agent_cfg, environment.time_step_spec(), environment.action_spec(), seed)

    regret_metric = bandit_metrics.RegretMetric(functools.partial(
        environment_utilities.compute_optimal_reward_with_movielens_environment,
        environment=environment))
    suboptimal_metric = bandit_metrics.SuboptimalArmsMetric(functools.partial(
        environment_utilities.compute_optimal_action_with_movielens_environment,
        environment=environment))
    step_regret: list[float] = []

    def record_regret(trajectory):
        # RegretMetric keeps only the latest step's batch mean; read it after every step.
        step_regret.append(float(regret_metric.result()))
        return trajectory

    replay_buffer = trainer._get_replay_buffer(  # noqa: SLF001  (the trainer's own buffer)
        agent.policy.trajectory_spec, environment.batch_size, steps_per_loop, 1)
    metrics = [
        tf_metrics.NumberOfEpisodes(),
        tf_metrics.AverageEpisodeLengthMetric(batch_size=environment.batch_size),
        regret_metric,
        suboptimal_metric,
        tf_metrics.AverageReturnMetric(batch_size=environment.batch_size),
    ]
    driver = dynamic_step_driver.DynamicStepDriver(
        env=environment, policy=agent.collect_policy,
        num_steps=steps_per_loop * environment.batch_size,
        observers=[replay_buffer.add_batch, tf_metrics.EnvironmentSteps(), *metrics, record_regret])
    training_loop = trainer._get_training_loop(  # noqa: SLF001
        driver, replay_buffer, agent, steps_per_loop, 1)

    for i in range(loops):
        if i == warmup_loops:
            started = time.perf_counter()
        training_loop(train_step=i, metrics=metrics)
        if (i + 1) % 25 == 0:
            log.info("stock %s: loop %d/%d", agent_cfg.name, i + 1, loops)
    seconds = time.perf_counter() - started
    per_step = np.asarray(step_regret, np.float64).reshape(loops, steps_per_loop)
    return TimedRun(regret=per_step.sum(axis=1) * batch_size, seconds=seconds,
                    timed_loops=loops - warmup_loops,
                    interactions_per_loop=batch_size * steps_per_loop)
