"""Bandit environments. The contract they keep is `src.envs.base`: an `InGraphBandit` with a
`reward_model` and its capabilities declared.

To add one: a module here whose environment subclasses `InGraphBandit` (or an environment of
`src.envs.movielens*`), with a builder taking the parsed data, `batch_size`, `seed` and the
YAML's keys; a YAML in `conf/env/` naming that builder in `_target_` and the choice in `name`;
and a test. tests/envs/test_contract.py checks every YAML's environment against the contract
and shows a tiny environment written from scratch and trained.
"""

import logging
from collections.abc import Sequence

from src import tf_runtime  # noqa: F401,I001  (before TensorFlow: a quiet start-up)
from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf

from src import config

log = logging.getLogger(__name__)


def build_environment(cfg: DictConfig, data, replica_seeds: Sequence[int] = ()):
    """The environment `cfg.env` describes over parsed MovieLens `data`, sampling
    `cfg.training.batch_size` users a step from its own generator seeded with the run's seed
    (with `replica_seeds`, a replica's with each: config.shares_ops)."""
    params = OmegaConf.to_container(cfg.env, resolve=True)
    builder = get_object(params.pop("_target_"))
    # Factorising the ratings takes seconds, minutes for the per-arm pools on a busy machine.
    log.info("Building env=%s over %s data", cfg.env.name, cfg.data.name)
    if replica_seeds:
        params["replica_seeds"] = list(replica_seeds)
    with config.errors_name_source("env", cfg.env.name):
        return builder(data, batch_size=cfg.training.batch_size, seed=cfg.training.seed, **params)
