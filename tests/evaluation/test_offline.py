"""Offline learning: an agent trained on logged interactions and scored off-policy, as one
run and as a sweep's objective."""

from __future__ import annotations

import re

import mlflow
import optuna
import pytest
import scipy.stats

from src import config, data, experiment, metrics
from src.campaigns import worker
from src.errors import UserError
from src.evaluation import offline
from src.training import train
from tests.conftest import SMALL


def offline_overrides(logged_runs, *extra):
    uri, data, ids = logged_runs
    return [*data, f"tracking.uri={uri}", *SMALL, "objective=ope/dr", f"offline.logs_run_id={ids['logs']}", *extra]


def test_an_agent_learns_offline_from_logs_and_is_scored_off_policy(logged_runs):
    # A small alpha: the policy LinUCB leaves offline still adds its exploration bonus. A
    # threshold below every nonzero weight makes Switch-DR the direct method: the estimators'
    # hyperparameters reach offline learning.
    cfg = config.compose(offline_overrides(logged_runs, "agent=linucb", "agent.alpha=0.01",
                                           "tracking.save_policy=false", "offline.estimator_params.switch_dr.tau=0.5"))
    final, run_id = train(cfg)
    rewards = experiment.assemble(cfg, data.load(cfg.data)).environment.reward_model.rewards
    assert final["ope/true_value"] > rewards.mean() + 0.5 * (rewards.max(axis=1).mean() - rewards.mean())
    # Linear rewards in the observed features: the estimates are close to the truth.
    for name in ("dm", "dr"):
        assert abs(final[f"ope/{name}"] - final["ope/true_value"]) < 0.05 * final["ope/true_value"]
    assert final["ope/switch_dr"] == pytest.approx(final["ope/dm"])
    run = mlflow.MlflowClient(logged_runs[0]).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["ope/dr"] == metrics.rounded(final["ope/dr"])


@pytest.mark.parametrize("extra, message", [
    (["objective=ope/ipw", "offline.logs_run_id={linucb_logs}"], "have no propensities: agent=linucb"),
    (["offline.logs_run_id=null"], "offline.logs_run_id must be a run trained with tracking.log_interactions=true"),
    (["env.num_movies=8"], "the action spaces differ"),
    (["offline.train_share=1"], "offline.train_share must be in (0, 1)"),
    (["offline.estimator_params.switch_dr.tau=0"], "offline.estimator_params.switch_dr.tau must be > 0"),
])
def test_offline_bad_input_is_one_line_before_any_run(logged_runs, extra, message):
    uri, _, ids = logged_runs
    client = mlflow.MlflowClient(uri)
    before = len(client.search_runs([client.get_run(ids["logs"]).info.experiment_id]))
    with pytest.raises(UserError, match=re.escape(message)) as error:
        train(config.compose(offline_overrides(logged_runs, *(e.format(**ids) for e in extra))))
    assert "\n" not in str(error.value)
    assert len(client.search_runs([client.get_run(ids["logs"]).info.experiment_id])) == before


def test_a_sweep_tunes_an_agent_offline_and_registers_its_best(logged_runs, tmp_path):
    uri, _, _ = logged_runs
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    overrides = [o for o in offline_overrides(logged_runs, "hparams_search=linucb_offline", "hydra.sweeper.n_trials=3",
                                              f"hydra.sweeper.storage={storage}", "tracking.experiment=offline")
                 if o != "objective=ope/dr"]
    worker.work(overrides)
    study = optuna.load_study(study_name="linucb_offline", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    client = mlflow.MlflowClient(uri)
    trials = client.search_runs([client.get_experiment_by_name("offline").experiment_id], "tags.`sweep.trial` != ''")
    # Runs log 6 significant digits (metrics.rounded): up to 5e-6 apart, relatively.
    assert sorted(run.data.metrics["ope/dr"] for run in trials) == pytest.approx(sorted(t.value for t in study.trials),
                                                                               rel=1e-5)
    (version,) = client.search_model_versions("name = 'linucb_offline-best'")
    assert version.run_id in {run.info.run_id for run in trials}
    # The parent run reports how well ope/dr chose among the trials, against their true values.
    (parent,) = client.search_runs([client.get_experiment_by_name("offline").experiment_id],
                                   "tags.`sweep.role` = 'parent'")
    estimates = [run.data.metrics["ope/dr"] for run in trials]
    truths = [run.data.metrics["ope/true_value"] for run in trials]
    chosen = next(run.data.metrics["ope/true_value"] for run in trials if run.info.run_id == version.run_id)
    reported = parent.data.metrics
    assert reported["ope_selection/trials"] == 3
    assert reported["ope_selection/regret"] == pytest.approx(max(truths) - chosen, abs=1e-6)
    if len(set(truths)) > 1:
        assert reported["ope_selection/spearman"] == pytest.approx(scipy.stats.spearmanr(estimates, truths).statistic)
    else:  # the trials learnt one greedy policy: no ranks to correlate
        assert "ope_selection/spearman" not in reported
    assert parent.data.tags["ope_selection"].startswith("off-policy selection: ")


def test_a_split_leaving_fewer_than_two_rounds_to_score_is_refused():
    """Found by a hostile try: train_share=0.999 left one round, and every estimate's interval NaN."""
    assert offline.split_point(800, 0.5, 16, "abc") == 400
    with pytest.raises(UserError, match=r"has 800 rounds: too few to train on 99\.9% of them in batches of 16"):
        offline.split_point(800, 0.999, 16, "abc")
