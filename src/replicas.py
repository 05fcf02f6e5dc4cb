"""Replica groups: `training.replicas=R` trains R runs of one config, seeds seed .. seed + R - 1,
in one process, and records each as an ordinary MLflow run.

A run's cost at MovieLens' default size is mostly the dispatch of a loop's ~190 small ops, not
their arithmetic. Where replicas can share the ops (`config.shares_ops`: the linear agents'
statistics and the environment carry a replica axis, src.agents.linear, src.envs.movielens),
they train side by side in one compiled loop (`SharedOps`), all but a few per-replica ones (the
generators' draws, the scoring products) serving every replica; any other agent or environment
trains its replicas' engines a chunk each in turn (`InTurn`), sharing the process's start-up,
data and tracking but not the ops. Either way each replica draws from the generators its run
alone would (seeded from its own seed), so its metrics equal that run's (tests/test_replicas.py);
its MLflow run holds what a run of its own holds, with the config that reproduces it alone
(`training.replicas=1`), tagged with its group.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
import uuid
from pathlib import Path

import mlflow
import numpy as np
import tensorflow as tf
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from src import agents, config, data, experiment, metrics, serving, tracking, training
from src.cli import interrupts_handled
from src.engine import configure_threads
from src.errors import UserError, one_line

log = logging.getLogger(__name__)

GROUP_TAG = "bandits.replica_group"  # the same for every run trained in one group
REPLICA_TAG = "bandits.replica"  # "r/R": the run's place in its group


def member_config(cfg: DictConfig, replica: int) -> DictConfig:
    """The config of a group's replica `replica` as a run of its own: its seed, no replicas."""
    member = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    member.training.seed = cfg.training.seed + replica
    member.training.replicas = 1
    return member


class SharedOps:
    """Replicas in one compiled loop: an engine whose environment and agent carry them."""

    def __init__(self, cfg: DictConfig, dataset):
        self.engine = experiment.assemble(cfg, dataset)
        self.replicas, self.interactions_per_loop = self.engine.replicas, self.engine.interactions_per_loop

    def run_replicas(self, loops: int, chunk: int):
        return self.engine.run_replicas(loops, chunk)

    def reward_model(self, replica: int):
        return self.engine.environment.reward_model

    def policy(self, member: DictConfig, replica: int):
        """The replica's greedy policy as a single run's agent holds it, to save and serve."""
        environment = self.engine.environment
        alone = agents.build_agent(member.agent, environment.time_step_spec(), environment.action_spec(),
                                   member.training.seed)
        alone.take_replica(self.engine.agent, replica)
        return alone.policy


class InTurn:
    """Replicas of any agent and environment: each member's engine, assembled and traced under its
    own seed as its run alone is, trains a chunk in turn."""

    def __init__(self, members: list[DictConfig], dataset):
        self.engines = []
        for member in members:
            engine = experiment.assemble(member, dataset)
            # Traced now, while TensorFlow's global seed is the member's: the op seeds of its
            # random ops are then those of its run alone.
            engine.run_chunk.get_concrete_function(tf.TensorSpec([], tf.int32))
            self.engines.append(engine)
        self.replicas, self.interactions_per_loop = len(members), self.engines[0].interactions_per_loop

    def run_replicas(self, loops: int, chunk: int):
        return map(list, zip(*(engine.run(loops, chunk) for engine in self.engines)))

    def reward_model(self, replica: int):
        return self.engines[replica].environment.reward_model

    def policy(self, member: DictConfig, replica: int):
        return self.engines[replica].agent.policy


def replica_group(cfg: DictConfig, members: list[DictConfig], dataset) -> SharedOps | InTurn:
    return SharedOps(cfg, dataset) if config.shares_ops(cfg) else InTurn(members, dataset)


def train_group(cfg: DictConfig, tags: dict[str, str] | None = None) -> list[tuple[dict[str, float], str]]:
    """Train the `cfg.training.replicas` runs of `cfg` together, each tracked as its own MLflow
    run; return each one's final metrics and run id."""
    config.check_run(cfg)
    configure_threads(cfg.training.threads.intra_op, cfg.training.threads.inter_op)
    experiment_id = tracking.connect(cfg.tracking.uri, cfg.tracking.experiment)
    dataset = data.load(cfg.data)
    members = [member_config(cfg, replica) for replica in range(cfg.training.replicas)]
    group = replica_group(cfg, members, dataset)
    random_regrets = [group.reward_model(replica).random_policy_regret for replica in range(group.replicas)]
    group_id = uuid.uuid4().hex
    member_tags = [{**(tags or {}), training.LONG_NAME_TAG: training.long_name(member, {}), GROUP_TAG: group_id,
                    REPLICA_TAG: f"{replica}/{group.replicas}",
                    metrics.RANDOM_REGRET_TAG: str(metrics.rounded(random_regrets[replica]))}
                   for replica, member in enumerate(members)]
    names = [training.run_name(member, {}) for member in members]
    histories = [metrics.RegretHistory(group.interactions_per_loop) for _ in members]
    reward_model = group.reward_model(0)
    with interrupts_handled() as interrupts, tracking.group_runs(members, names, experiment_id, member_tags) as ids:
        log.info("Training %d replicas of %s on %s (%s data), seeds %d-%d, %s: %d users, %d movies, rank %d; "
                 "%d loops x %d interactions each", group.replicas, cfg.agent.name, cfg.env.name, cfg.data.name,
                 members[0].training.seed, members[-1].training.seed,
                 "in one compiled loop" if isinstance(group, SharedOps) else "a chunk each in turn",
                 len(reward_model.user_ids), len(reward_model.movie_ids), reward_model.user_features.shape[1],
                 cfg.training.loops, group.interactions_per_loop)
        try:
            seconds = run_loops(cfg, group, histories, ids, interrupts)
        except BaseException:
            for run_id, member, history, random_regret in zip(ids, members, histories, random_regrets):
                # A stopped or diverged group keeps each run's table and plot so far; a store that
                # refuses them too is not what stopped it.
                if history.loops_done:
                    with tempfile.TemporaryDirectory() as scratch, contextlib.suppress(OSError, MlflowException):
                        training.write_tables(member, history, random_regret, Path(scratch))
                        mlflow.MlflowClient().log_artifacts(run_id, scratch)
            raise
        rate = cfg.training.loops * group.interactions_per_loop / seconds
        unlogged = []
        for replica, (run_id, name, member, history) in enumerate(zip(ids, names, members, histories)):
            try:
                with tracking.finishing(run_id, name, experiment_id):
                    training.log_ratings(member, dataset)
                    # A replica's own rate is its share of the group's.
                    mlflow.log_metrics({metrics.INTERACTIONS_PER_S: metrics.rounded(rate),
                                        metrics.GROUP_INTERACTIONS_PER_S: metrics.rounded(rate * group.replicas),
                                        metrics.SECONDS: metrics.rounded(seconds)})
                    log_artifacts(member, group, replica, history, random_regrets[replica], dataset)
            except (OSError, MlflowException) as error:  # the run is FAILED; the others are logged still
                kept = keep_unlogged(member, group, replica, history, random_regrets[replica], run_id)
                unlogged.append(f"run {run_id}: {one_line(error)}; kept in {kept}")
        if unlogged:
            raise UserError(f"{len(unlogged)} of the group's runs could not write their artifacts to the artifact "
                            f"store ({'; '.join(unlogged)})")
    log.info("Done in %.1f s (%.0f interactions/s in all): cumulative regret %s", seconds, rate * group.replicas,
             ", ".join(f"{history.final()[metrics.CUMULATIVE_REGRET]:.1f}" for history in histories))
    return [(history.final(), run_id) for history, run_id in zip(histories, ids)]


def log_artifacts(member: DictConfig, group: SharedOps | InTurn, replica: int, history: metrics.RegretHistory,
                  random_regret: float, dataset) -> None:
    """The replica's tables, plot and, with full artifacts, its policy, into its active run."""
    training.log_tables(member, history, random_regret)
    if member.tracking.artifacts == "full" and member.tracking.save_policy:
        catalogue = serving.Catalogue.of(group.reward_model(replica), dataset.movies, member.env)
        serving.log_policy(group.policy(member, replica), catalogue)


def keep_unlogged(member: DictConfig, group: SharedOps | InTurn, replica: int, history: metrics.RegretHistory,
                  random_regret: float, run_id: str) -> Path:
    """What the artifact store refused of a replica, on disk as a run alone keeps it (training.UNLOGGED)."""
    kept = training.UNLOGGED / run_id
    kept.mkdir(parents=True, exist_ok=True)
    training.write_tables(member, history, random_regret, kept)
    if member.tracking.artifacts == "full" and member.tracking.save_policy:
        serving.save_policy(group.policy(member, replica), kept / "policy")
    return kept


def run_loops(cfg: DictConfig, group: SharedOps | InTurn, histories: list[metrics.RegretHistory], run_ids: list[str],
              interrupts) -> float:
    """Train the group, logging each replica's metrics to its run as they come, stopping between
    chunks when interrupted or when a replica diverges; the seconds it took."""
    loops = cfg.training.loops
    downsamplers = [metrics.Downsampler(training.loops_per_point(cfg)) for _ in histories]
    writer = tracking.history_writer()  # one write at a time for the whole group
    started = time.perf_counter()
    tenths_logged = 0
    # A bar on a terminal only; in a log file, a line per tenth of the run.
    with (contextlib.ExitStack() as stack,
          tqdm(total=loops, unit="loop", desc=f"training {len(histories)} replicas", dynamic_ncols=True,
               disable=None) as bar):
        stack.callback(writer.shutdown)
        loggers = [stack.enter_context(tracking.HistoryLogger(run_id, writer=writer)) for run_id in run_ids]
        for chunks in group.run_replicas(loops, cfg.training.chunk_loops):
            bar.update(len(chunks[0].regret))
            interrupts.check(urgent_only=True)
            for chunk, history, downsampler, logger in zip(chunks, histories, downsamplers, loggers):
                rows = history.add(chunk)
                loss = rows[metrics.LOSS].to_numpy()
                ending = history.loops_done == loops or not np.isfinite(loss).all()
                window_rows = downsampler.push(rows, last=ending)
                if len(window_rows):
                    logger.log(window_rows)
                training.check_finite(rows, loss)
            if bar.disable and (tenths := 10 * histories[0].loops_done // loops) > tenths_logged:
                tenths_logged = tenths
                log.info("Loop %d of %d: cumulative regret %s", histories[0].loops_done, loops,
                         ", ".join(f"{history.final()[metrics.CUMULATIVE_REGRET]:.1f}" for history in histories))
            interrupts.check()
    return time.perf_counter() - started
