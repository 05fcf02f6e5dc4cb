"""The study a sweep config names: its direction, its sweeper settings and its search space
checked before any trial, and a study of the same name with the other direction refused."""

from __future__ import annotations

import re

import optuna
import pytest
from omegaconf import DictConfig, OmegaConf

from src import config
from src.campaigns.study import check_sweeper, compose_sweep, prepare, search_space
from src.errors import UserError
from src.paths import PROJECT_ROOT
from tests.campaigns.conftest import compose


def test_a_study_with_the_other_direction_is_refused(data_overrides, tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.create_study(study_name="linucb", storage=storage, direction="maximize")
    cfg = compose(data_overrides, tmp_path, f"hydra.sweeper.storage={storage}")
    with pytest.raises(UserError, match=r"exists with direction \['maximize'\]"):
        prepare(cfg)


@pytest.mark.parametrize("overrides, message", [
    (["objective=train/reward", "hydra.sweeper.direction=minimize"],
     "objective=train/reward is to maximize; set hydra.sweeper.direction=maximize"),
    (["hydra.sweeper.n_jobs=2"], "hydra.sweeper.n_jobs must be 1"),
])
def test_a_sweeper_config_that_cannot_work_is_refused(data_overrides, tmp_path, overrides, message):
    cfg = compose(data_overrides, tmp_path, f"hydra.sweeper.storage=sqlite:///{tmp_path / 'optuna.db'}", *overrides)
    with pytest.raises(UserError, match=re.escape(message)):
        prepare(cfg)
    assert not (tmp_path / "optuna.db").exists()


@pytest.mark.parametrize("objective, direction", [
    ("train/cumulative_regret", "minimize"), ("train/reward", "maximize"), ("ope/dr", "maximize")])
def test_the_direction_follows_the_objective(data_overrides, tmp_path, objective, direction):
    assert compose(data_overrides, tmp_path, f"objective={objective}").hydra.sweeper.direction == direction


@pytest.mark.parametrize("sweep", sorted(path.stem for path in (PROJECT_ROOT / "conf/hparams_search").glob("*.yaml")))
def test_every_sweep_searches_keys_its_config_has_with_values_of_their_type(sweep, data_overrides):
    """A search dimension with a typo, or of the wrong type, would fail every trial."""
    fixed = [f"hparams_search={sweep}", *data_overrides, "offline.logs_run_id=any"]
    space = search_space(compose_sweep(fixed), [])
    for name, distribution in space.items():
        ends = [distribution.low, distribution.high] if hasattr(distribution, "low") else distribution.choices
        for value in ends:
            point = config.compose([*fixed, f"{name}={value}"])
            chosen = OmegaConf.select(point, name)
            chosen = chosen.name if isinstance(chosen, DictConfig) else chosen  # a group's option (grid's agent)
            assert chosen == value, f"{sweep} searches {name}, which its config lacks"
            config.check_run(point)


def test_the_sweep_settings_are_checked(data_overrides, tmp_path):
    cfg = config.compose(["hparams_search=linucb", "sweep.pruner=sometimes"], with_hydra=True)
    with pytest.raises(UserError, match="sweep.pruner must be null, median or hyperband"):
        check_sweeper(cfg)
