"""What the campaign tests share: sweep command lines on synthetic data, and what a study and
its experiment hold after a sweep."""

from __future__ import annotations

import collections

import mlflow
import optuna

from src.campaigns.study import compose_sweep
from tests.conftest import SMALL

FIXED = ["env.num_movies=10", "env.reward_rank=4", "env.rank_k=3", "training.chunk_loops=20",
         "tracking.save_policy=false"]


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
    return compose_sweep(sweep_overrides(data_overrides, tmp_path, *extra))


def overrides_for(data_overrides, study: str, storage: str, tracking_uri: str, *extra: str) -> list[str]:
    return ["hparams_search=linucb", f"hydra.sweeper.study_name={study}", f"hydra.sweeper.storage={storage}",
            *data_overrides, *FIXED, f"tracking.uri={tracking_uri}", f"tracking.experiment={study}", *extra]


def states(study: optuna.Study) -> collections.Counter:
    return collections.Counter(trial.state.name for trial in study.trials)


def runs_of(tracking_uri: str, experiment: str) -> list:
    client = mlflow.MlflowClient(tracking_uri)
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
