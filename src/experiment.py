"""One experiment's moving parts, put together the same way by every entry point and test:
seed, then environment, then agent, then the engine that runs them."""

from __future__ import annotations

import random

import numpy as np

from src import tf_runtime  # noqa: F401,I001  (before TensorFlow: a quiet start-up)
import tensorflow as tf
from omegaconf import DictConfig

from src.agents import action_probabilities, build_agent
from src.engine import Engine
from src.envs import build_environment
from src.errors import UserError


def seed_everything(seed: int) -> None:
    """One seed for Python, NumPy and TensorFlow; the environment gets it explicitly."""
    random.seed(seed)
    np.random.seed(seed)
    tf.random.set_seed(seed)


def assemble(cfg: DictConfig, data) -> Engine:
    """The engine for `cfg` over parsed MovieLens `data`, seeded with `cfg.training.seed`;
    `engine.environment` and `engine.agent` are the built pieces."""
    seed_everything(cfg.training.seed)
    environment = build_environment(cfg, data)
    agent = build_agent(cfg.agent, environment.time_step_spec(), environment.action_spec(), cfg.training.seed)
    if not cfg.tracking.log_interactions:
        return Engine(environment, agent, cfg.training.steps_per_loop)
    if not environment.logs_interactions:
        raise UserError(f"tracking.log_interactions=true needs an environment whose rounds are a user and a movie, "
                        f"as env=movielens's: a round of env={cfg.env.name} holds more than the log keeps")
    num_actions = len(environment.reward_model.movie_ids)
    return Engine(environment, agent, cfg.training.steps_per_loop, record_interactions=True,
                  action_probabilities=action_probabilities(cfg.agent, num_actions))
