"""Replica groups: `training.replicas=R` trains R runs of one config, seeds seed .. seed + R - 1,
side by side in one compiled loop, and records each as an ordinary MLflow run.

A run's cost at MovieLens' default size is mostly the dispatch of a loop's ~190 small ops, not
their arithmetic; replicas share each op (the linear agents' statistics and the environment
carry a replica axis, src.agents.linear, src.envs.movielens), so R runs cost far less than R
loops. Each replica draws from the generators its run alone would (environment and agent
seeded from its own seed), so its metrics equal that run's (tests/test_replicas.py); its MLflow
run holds what a run of its own holds, with the config that reproduces it alone
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
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from src import agents, config, data, experiment, metrics, serving, tracking, training
from src.cli import interrupts_handled
from src.engine import configure_threads

log = logging.getLogger(__name__)

GROUP_TAG = "bandits.replica_group"  # the same for every run trained in one group
REPLICA_TAG = "bandits.replica"  # "r/R": the run's place in its group


def member_config(cfg: DictConfig, replica: int) -> DictConfig:
    """The config of a group's replica `replica` as a run of its own: its seed, no replicas."""
    member = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    member.training.seed = cfg.training.seed + replica
    member.training.replicas = 1
    return member


def replica_policy(cfg: DictConfig, engine, replica: int):
    """Replica `replica`'s greedy policy as a single run's agent holds it, to save and serve."""
    environment = engine.environment
    alone = agents.build_agent(cfg.agent, environment.time_step_spec(), environment.action_spec(), cfg.training.seed)
    alone.take_replica(engine.agent, replica)
    return alone.policy


def train_group(cfg: DictConfig, tags: dict[str, str] | None = None) -> list[tuple[dict[str, float], str]]:
    """Train the `cfg.training.replicas` runs of `cfg` together, each tracked as its own MLflow
    run; return each one's final metrics and run id."""
    config.check_run(cfg)
    configure_threads(cfg.training.threads.intra_op, cfg.training.threads.inter_op)
    experiment_id = tracking.connect(cfg.tracking.uri, cfg.tracking.experiment)
    dataset = data.load(cfg.data)
    engine = experiment.assemble(cfg, dataset)
    reward_model = engine.environment.reward_model
    members = [member_config(cfg, replica) for replica in range(engine.replicas)]
    group = uuid.uuid4().hex
    member_tags = [{**(tags or {}), training.LONG_NAME_TAG: training.long_name(member, {}), GROUP_TAG: group,
                    REPLICA_TAG: f"{replica}/{engine.replicas}",
                    metrics.RANDOM_REGRET_TAG: str(metrics.rounded(reward_model.random_policy_regret))}
                   for replica, member in enumerate(members)]
    names = [training.run_name(member, {}) for member in members]
    histories = [metrics.RegretHistory(engine.interactions_per_loop) for _ in members]
    with interrupts_handled() as interrupts, tracking.group_runs(members, names, experiment_id, member_tags) as ids:
        log.info("Training %d replicas of %s on %s (%s data), seeds %d-%d: %d users, %d movies, rank %d; "
                 "%d loops x %d interactions each", engine.replicas, cfg.agent.name, cfg.env.name, cfg.data.name,
                 members[0].training.seed, members[-1].training.seed, len(reward_model.user_ids),
                 len(reward_model.movie_ids), reward_model.user_features.shape[1], cfg.training.loops,
                 engine.interactions_per_loop)
        try:
            seconds = run_loops(cfg, engine, histories, ids, interrupts)
        except BaseException:
            for run_id, member, history in zip(ids, members, histories):
                if history.loops_done:  # a stopped or diverged group keeps each run's table and plot so far
                    with tempfile.TemporaryDirectory() as scratch:
                        training.write_tables(member, history, reward_model.random_policy_regret, Path(scratch))
                        mlflow.MlflowClient().log_artifacts(run_id, scratch)
            raise
        rate = cfg.training.loops * engine.interactions_per_loop / seconds
        for replica, (run_id, name, member, history) in enumerate(zip(ids, names, members, histories)):
            with tracking.finishing(run_id, name, experiment_id):
                training.log_ratings(member, dataset)
                # A replica's own rate: the group's interactions per second over its replicas.
                mlflow.log_metrics({metrics.INTERACTIONS_PER_S: metrics.rounded(rate),
                                    metrics.SECONDS: metrics.rounded(seconds)})
                training.log_tables(member, history, reward_model.random_policy_regret)
                if cfg.tracking.artifacts == "full" and cfg.tracking.save_policy:
                    catalogue = serving.Catalogue.of(reward_model, dataset.movies, member.env)
                    serving.log_policy(replica_policy(member, engine, replica), catalogue)
    log.info("Done in %.1f s (%.0f interactions/s in all): cumulative regret %s", seconds, rate * engine.replicas,
             ", ".join(f"{history.final()[metrics.CUMULATIVE_REGRET]:.1f}" for history in histories))
    return [(history.final(), run_id) for history, run_id in zip(histories, ids)]


def run_loops(cfg: DictConfig, engine, histories: list[metrics.RegretHistory], run_ids: list[str],
              interrupts) -> float:
    """Train the group, logging each replica's metrics to its run as they come, stopping between
    chunks when interrupted or when a replica diverges; the seconds it took."""
    loops = cfg.training.loops
    downsamplers = [metrics.Downsampler(training.loops_per_point(cfg)) for _ in histories]
    started = time.perf_counter()
    tenths_logged = 0
    # A bar on a terminal only; in a log file, a line per tenth of the run.
    with (contextlib.ExitStack() as stack,
          tqdm(total=loops, unit="loop", desc=f"training {len(histories)} replicas", dynamic_ncols=True,
               disable=None) as bar):
        loggers = [stack.enter_context(tracking.HistoryLogger(run_id)) for run_id in run_ids]
        for chunks in engine.run_replicas(loops, cfg.training.chunk_loops):
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
