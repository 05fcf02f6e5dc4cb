"""A study's summary: the best trial's model registered once, under `<study>-best@champion`."""

from __future__ import annotations

import mlflow

from src.campaigns.summary import register_best_model
from tests.campaigns.conftest import compose


def test_the_best_trials_model_is_registered(make_config, tracking_uri, data_overrides, tmp_path):
    from src.training import train

    train(make_config("tracking.save_policy=true"))
    client = mlflow.MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("movielens-bandits").experiment_id])
    cfg = compose(data_overrides, tmp_path)
    register_best_model(cfg, run.info.run_id)
    register_best_model(cfg, run.info.run_id)  # a resumed sweep, same best trial
    (version,) = client.search_model_versions("name = 'linucb-best'")
    assert version.run_id == run.info.run_id
    assert client.get_model_version_by_alias("linucb-best", "champion").version == version.version
    assert "Optuna study 'linucb'" in client.get_registered_model("linucb-best").description
    model = mlflow.pyfunc.load_model(f"models:/linucb-best/{version.version}")
    assert model.metadata.signature is not None
