"""Optuna sweeps: multirun.sh workers on one study, every trial in MLflow, failures, resumption,
and the single-process Hydra sweep."""

from __future__ import annotations

import re
import subprocess

import mlflow
import optuna
import pytest
from omegaconf import DictConfig, OmegaConf

from src import campaign, config, training
from src.errors import UserError
from src.paths import PROJECT_ROOT
from tests.conftest import SMALL


def sweep_overrides(data_overrides, tmp_path, *extra):
    return [
        "hparams_search=linucb", *data_overrides, "training.loops=20",
        *(o for o in SMALL if not o.startswith("env.rank_k")),  # a fixed value would win over the search
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "tracking.save_policy=false",
        "env.reward_rank=4",
        # A search dimension from the command line, as Hydra allows; rank 50 is out of
        # range for 10 movies: those trials must fail alone.
        "env.rank_k=choice(2, 3, 50)",
        *extra,
    ]


def compose(data_overrides, tmp_path, *extra):
    return campaign.compose_sweep(sweep_overrides(data_overrides, tmp_path, *extra))


def test_unreachable_storage_is_refused_before_any_trial(data_overrides, tmp_path):
    cfg = compose(data_overrides, tmp_path, f"hydra.sweeper.storage=sqlite:///{tmp_path}/missing/dir/optuna.db")
    with pytest.raises(UserError, match="cannot open Optuna storage"):
        campaign.prepare(cfg)


def test_a_study_with_the_other_direction_is_refused(data_overrides, tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.create_study(study_name="linucb", storage=storage, direction="maximize")
    cfg = compose(data_overrides, tmp_path, f"hydra.sweeper.storage={storage}")
    with pytest.raises(UserError, match=r"exists with direction \['maximize'\]"):
        campaign.prepare(cfg)


@pytest.mark.parametrize("overrides, message", [
    (["objective=train/reward", "hydra.sweeper.direction=minimize"],
     "objective=train/reward is to maximize; set hydra.sweeper.direction=maximize"),
    (["hydra.sweeper.n_jobs=2"], "hydra.sweeper.n_jobs must be 1"),
])
def test_a_sweeper_config_that_cannot_work_is_refused(data_overrides, tmp_path, overrides, message):
    cfg = compose(data_overrides, tmp_path, f"hydra.sweeper.storage=sqlite:///{tmp_path / 'optuna.db'}", *overrides)
    with pytest.raises(UserError, match=re.escape(message)):
        campaign.prepare(cfg)
    assert not (tmp_path / "optuna.db").exists()



@pytest.mark.parametrize("objective, direction", [
    ("train/cumulative_regret", "minimize"), ("train/reward", "maximize"), ("ope/dr", "maximize")])
def test_the_direction_follows_the_objective(data_overrides, tmp_path, objective, direction):
    assert compose(data_overrides, tmp_path, f"objective={objective}").hydra.sweeper.direction == direction


def test_unknown_sweep_name_is_one_line(tmp_path):
    result = subprocess.run([str(PROJECT_ROOT / "multirun.sh"), "nope"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: no sweep for 'nope'; choose one of: "
                                                  + ", ".join(sorted(p.stem for p in (PROJECT_ROOT / "conf/hparams_search").glob("*.yaml")))
                                                  + ", all"]


def test_the_best_trials_model_is_registered(make_config, tracking_uri, data_overrides, tmp_path):
    from src.training import train

    train(make_config("tracking.save_policy=true"))
    client = mlflow.MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("movielens-bandits").experiment_id])
    cfg = compose(data_overrides, tmp_path)
    campaign.register_best_model(cfg, run.info.run_id)
    campaign.register_best_model(cfg, run.info.run_id)  # a resumed sweep, same best trial
    (version,) = client.search_model_versions("name = 'linucb-best'")
    assert version.run_id == run.info.run_id
    assert client.get_model_version_by_alias("linucb-best", "champion").version == version.version
    assert "Optuna study 'linucb'" in client.get_registered_model("linucb-best").description
    model = mlflow.pyfunc.load_model(f"models:/linucb-best/{version.version}")
    assert model.metadata.signature is not None


@pytest.mark.slow
@pytest.mark.parametrize("ranks, parent_status", [("choice(2, 3)", "FINISHED"), ("choice(50)", "FAILED")])
def test_single_process_sweep_ends_its_parent_run(data_overrides, tmp_path, run_cli, ranks, parent_status):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    overrides = sweep_overrides(data_overrides, tmp_path, f"hydra.sweeper.storage={storage}",
                                "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={tmp_path / 'multirun'}")
    overrides = [o if not o.startswith("env.rank_k=") else f"env.rank_k={ranks}" for o in overrides]
    result = run_cli("src.train", "-m", *overrides)
    # Every trial failing ends the sweep with an error, and the parent run must not stay RUNNING.
    assert (result.returncode == 0) == (parent_status == "FINISHED"), result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    if parent_status == "FAILED":
        assert result.returncode == 2
        assert re.search(r"\] every trial of the sweep failed; the last because: env.rank_k must be",
                         result.stderr), result.stderr[-1000:]
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("movielens-bandits").experiment_id])
    parent = next(r for r in runs if r.data.tags.get("sweep.role") == "parent")
    assert parent.info.status == parent_status
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(trials) == (2 if parent_status == "FINISHED" else 0)  # a config error starts no run


@pytest.mark.parametrize("sweep", sorted(path.stem for path in (PROJECT_ROOT / "conf/hparams_search").glob("*.yaml")))
def test_every_sweep_searches_keys_its_config_has_with_values_of_their_type(sweep, data_overrides):
    """A search dimension with a typo, or of the wrong type, would fail every trial."""
    fixed = [f"hparams_search={sweep}", *data_overrides, "offline.logs_run_id=any"]
    space = campaign.search_space(campaign.compose_sweep(fixed), [])
    for name, distribution in space.items():
        ends = [distribution.low, distribution.high] if hasattr(distribution, "low") else distribution.choices
        for value in ends:
            point = config.compose([*fixed, f"{name}={value}"])
            chosen = OmegaConf.select(point, name)
            chosen = chosen.name if isinstance(chosen, DictConfig) else chosen  # a group's option (grid's agent)
            assert chosen == value, f"{sweep} searches {name}, which its config lacks"
            training.check_training(point)
