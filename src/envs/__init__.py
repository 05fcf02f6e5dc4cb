"""Bandit environments. Each `conf/env/*.yaml` names its builder in `_target_`."""

from src import tf_runtime  # noqa: F401,I001  (before TensorFlow: a quiet start-up)
from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf

from src import config


def build_environment(cfg: DictConfig, data):
    """The environment `cfg.env` describes over parsed MovieLens `data`, sampling
    `cfg.training.batch_size` users a step from its own generator seeded with the run's seed."""
    params = OmegaConf.to_container(cfg.env, resolve=True)
    builder = get_object(params.pop("_target_"))
    with config.errors_name_source("env", cfg.env.name):
        return builder(data, batch_size=cfg.training.batch_size, seed=cfg.training.seed, **params)
