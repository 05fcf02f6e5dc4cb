"""One experiment's moving parts, put together the same way by every entry point and test:
seed, then environment, then agent, then the engine that runs them."""

from __future__ import annotations

import random

import numpy as np

from src import tf_runtime  # noqa: F401,I001  (before TensorFlow: a quiet start-up)
import tensorflow as tf
from omegaconf import DictConfig

from src.agents import build_agent
from src.engine import Engine
from src.envs import build_environment


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
    agent = build_agent(cfg.agent, environment.time_step_spec(), environment.action_spec())
    return Engine(environment, agent, cfg.training.steps_per_loop)
