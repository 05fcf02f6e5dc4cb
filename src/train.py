"""Train one bandit agent on MovieLens and track it in MLflow.

    uv run python -m src.train agent=linucb training=quick

Hydra composes `conf/`; `train(cfg)` builds environment and agent, runs the compiled
engine, and logs params, metric histories, a regret plot, the config and the policy.
The Hydra entry point returns the configured objective for the Optuna sweeper.
"""

from __future__ import annotations

import logging
import random
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import hydra
import mlflow
import numpy as np
import tensorflow as tf
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

import src  # noqa: F401  (prepares TensorFlow before anything else imports it)
from src import metrics, plots, serving, sweep, tracking
from src.agents import build_agent
from src.cli import (CONFIG_DIR, check_group_choices, exit_on_user_error, interrupt_between_chunks,
                     interrupt_on_sigterm)
from src.data import movielens
from src.engine import Engine, configure_threads
from src.errors import UserError, require, require_types_of
from src.paths import PROJECT_ROOT

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """One seed for Python, NumPy and TensorFlow; the environment gets it explicitly."""
    random.seed(seed)
    np.random.seed(seed)
    tf.random.set_seed(seed)


def check_types(cfg: DictConfig) -> None:
    """Values of the wrong type are refused here, by name, before any builder trips on them."""
    for group, option in (("env", cfg.env.name), ("agent", cfg.agent.name), ("training", "default")):
        path = CONFIG_DIR / group / f"{option}.yaml"
        if path.is_file():
            defaults = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
            values = OmegaConf.to_container(cfg[group], resolve=True)
            require_types_of(values, defaults, group, str(path.relative_to(PROJECT_ROOT)))


def check_training(cfg: DictConfig) -> None:
    check_types(cfg)
    where = "conf/training"
    for key in ("batch_size", "steps_per_loop", "loops", "chunk_loops"):
        value = cfg.training[key]
        require(isinstance(value, int) and value >= 1, f"training.{key}", value, "an integer >= 1", where)
    seed = cfg.training.seed
    require(isinstance(seed, int) and seed >= 0, "training.seed", seed, "an integer >= 0", where)
    log_every = cfg.tracking.log_every
    require(isinstance(log_every, int) and log_every >= 1, "tracking.log_every", log_every, "an integer >= 1")
    require(cfg.objective in metrics.FINAL_METRICS, "objective", cfg.objective,
            f"one of {', '.join(metrics.FINAL_METRICS)}")


def check_finite(loops) -> None:
    """Stop a diverged run (a sweep's trial then fails alone) rather than train on NaNs."""
    diverged = loops[~np.isfinite(loops[metrics.LOSS])]
    if len(diverged):
        first = diverged.iloc[0]
        raise UserError(f"training diverged: the agent's loss is {first[metrics.LOSS]} after "
                        f"{int(first['step'])} interactions; try a smaller agent.learning_rate")


def build_environment(cfg: DictConfig, data):
    params = OmegaConf.to_container(cfg.env, resolve=True)
    builder = get_object(params.pop("_target_"))
    return builder(data, batch_size=cfg.training.batch_size, seed=cfg.training.seed, **params)


def run_name(cfg: DictConfig) -> str:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{cfg.env.name}__{cfg.agent.name}__seed{cfg.training.seed}__{stamp}"


def train(cfg: DictConfig) -> dict[str, float]:
    """Run the experiment `cfg` describes; return the final metrics."""
    check_training(cfg)
    training = cfg.training
    configure_threads(training.threads.intra_op, training.threads.inter_op)
    experiment_id = tracking.connect(cfg.tracking.uri, cfg.tracking.experiment)
    seed_everything(training.seed)
    data = movielens.load(cfg.data)

    tags = sweep.trial_tags()
    name = run_name(cfg) + (f"__trial{tags['sweep.trial']}" if "sweep.trial" in tags else "")
    with tracking.run(cfg, name, experiment_id, tags) as active:
        run_id = active.info.run_id
        sweep.record_run(run_id)
        environment = build_environment(cfg, data)
        agent = build_agent(cfg.agent, environment.time_step_spec(), environment.action_spec())
        engine = Engine(environment, agent, training.steps_per_loop)
        history = metrics.RegretHistory(engine.interactions_per_loop)
        random_regret = environment.model.random_policy_regret
        mlflow.log_metric("env/random_policy_regret", random_regret)
        log.info(
            "Training %s on %s: %d users, %d movies, rank %d; %d loops x %d interactions",
            cfg.agent.name, cfg.env.name, *environment.model.rewards.shape,
            environment.model.user_features.shape[1], training.loops, engine.interactions_per_loop)
        started = time.perf_counter()
        downsampler = metrics.Downsampler(cfg.tracking.log_every)
        with interrupt_between_chunks() as check_interrupt, \
                tqdm(total=training.loops, unit="loop", desc="training", dynamic_ncols=True) as bar:
            for chunk in engine.run(training.loops, training.chunk_loops):
                bar.update(len(chunk.regret))
                loops = history.add(chunk)
                rows = downsampler.push(loops, last=history.loops == training.loops)
                if len(rows):
                    tracking.log_history(run_id, rows)
                check_finite(loops)
                check_interrupt()
                bar.set_postfix(regret=f"{chunk.regret.mean() / engine.interactions_per_loop:.3f}")
        seconds = time.perf_counter() - started
        final = history.final()
        rate = training.loops * engine.interactions_per_loop / seconds
        mlflow.log_metrics({"perf/interactions_per_s": rate, "perf/train_seconds": seconds})
        log.info("Done in %.1f s (%.0f interactions/s): cumulative regret %.1f, last-loop regret %.4f "
                 "(uniform random: %.4f)", seconds, rate, final[metrics.CUMULATIVE_REGRET],
                 final[metrics.REGRET], random_regret)
        log_artifacts(cfg, history, agent, random_regret, serving.Catalogue.of(environment.model, data.movies))
    return final


def log_artifacts(cfg: DictConfig, history: metrics.RegretHistory, agent, random_regret: float,
                  catalogue: serving.Catalogue) -> None:
    frame = history.frame()
    with tempfile.TemporaryDirectory() as scratch:
        table = Path(scratch) / "metrics.csv"
        frame.to_csv(table, index=False)
        mlflow.log_artifact(str(table))
    title = f"{cfg.agent.name} on {cfg.env.name} (seed {cfg.training.seed})"
    mlflow.log_figure(plots.regret_figure(frame, title, random_regret), "regret.png")
    if cfg.tracking.save_policy:
        tracking.log_policy(agent.policy, catalogue)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        # A failed trial must fail alone; the sweeper records it and goes on.
        return train(cfg)[cfg.objective]
    with exit_on_user_error():
        return train(cfg)[cfg.objective]


if __name__ == "__main__":
    check_group_choices(sys.argv[1:])
    interrupt_on_sigterm()
    main()
