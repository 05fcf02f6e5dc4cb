"""Datasets. Each `conf/data/*.yaml` names its loader in `_target_`."""

from __future__ import annotations

from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf

from src import config
from src.data.movielens import MovieLens

# Configs logged before the `data` group existed hold MovieLens settings without a loader.
DEFAULT_LOADER = "src.data.movielens.load"


def load(cfg: DictConfig) -> MovieLens:
    """The dataset the `data` config node describes, parsed."""
    params = OmegaConf.to_container(cfg, resolve=True)
    loader = get_object(params.pop("_target_", DEFAULT_LOADER))
    name = params.pop("name", "movielens")
    with config.errors_name_source("data", name):
        return loader(**params)
