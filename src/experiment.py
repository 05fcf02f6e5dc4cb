"""One experiment's moving parts, put together the same way by every entry point and test:
seed, then environment, then agent, then the engine that runs them."""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np

from src import tf_runtime  # noqa: F401,I001  (before TensorFlow: a quiet start-up)
import tensorflow as tf
from omegaconf import DictConfig

from src import config
from src.agents import build_agent, logged_policy
from src.engine import Engine
from src.envs import build_environment
from src.errors import UserError


def seed_everything(seed: int) -> None:
    """One seed for Python, NumPy and TensorFlow; the environment gets it explicitly."""
    random.seed(seed)
    np.random.seed(seed)
    tf.random.set_seed(seed)


def assemble(cfg: DictConfig, data, members: Sequence[DictConfig] = ()) -> Engine:
    """The engine for `cfg` over parsed MovieLens `data`, seeded with `cfg.training.seed`;
    `engine.environment` and `engine.agent` are the built pieces. With `members`, runs alike
    but for what config.sharing_key leaves out, one engine training them side by side (so does a
    `cfg` whose replicas share ops: config.members)."""
    if not members and config.shares_ops(cfg):
        members = config.members(cfg)
    seed_everything(cfg.training.seed)
    seeds = [member.training.seed for member in members] if len(members) > 1 else []
    environment = build_environment(cfg, data, seeds)
    delay = environment.feedback_delay
    if delay.loops >= cfg.training.loops:
        raise UserError(f"env.delay_loops={delay.loops} is not shorter than the run's training.loops="
                        f"{cfg.training.loops}: no reward would reach the agent")
    available = environment.interactions_available
    asked = cfg.training.loops * cfg.training.batch_size * cfg.training.steps_per_loop
    if available is not None and asked > available:
        raise UserError(f"training.loops={cfg.training.loops} asks for {asked:,} interactions; env={cfg.env.name} "
                        f"replays {available:,}: at most {available // (asked // cfg.training.loops):,} loops")
    agent = build_agent(cfg.agent, environment.time_step_spec(), environment.action_spec(), cfg.training.seed,
                        seeds, seeds and replica_values(members))
    randomness = {"seed": cfg.training.seed, "jit_compile": cfg.training.get("jit_compile", False)}
    if not cfg.tracking.log_interactions:
        return Engine(environment, agent, cfg.training.steps_per_loop, **randomness)
    if environment.logged_round_kind is None:
        raise UserError(f"tracking.log_interactions=true needs an environment whose rounds the log can keep: "
                        f"a user and a movie (env=movielens) or a slate (env=movielens_ranking); on "
                        f"env={cfg.env.name} {environment.unlogged_because}")
    return Engine(environment, agent, cfg.training.steps_per_loop,
                  policy_columns=logged_policy(cfg.agent, environment.action_spec()), **randomness)


def replica_values(members: Sequence[DictConfig]) -> dict[str, list]:
    """Each member's value of the config.PER_REPLICA_HYPERPARAMETERS that differ between them."""
    values = {key: [member.agent[key] for member in members] for key in config.PER_REPLICA_HYPERPARAMETERS}
    return {key: each for key, each in values.items() if len(set(each)) > 1}
