"""Tuned configurations (conf/tuned/, written by benchmarks/tune.py): each composes, validates and
builds its agent, refuses another agent or environment, and the script writes the best trial."""

from __future__ import annotations

import optuna
import pytest
from omegaconf import OmegaConf

from src import config, data, experiment
from src.campaigns import tuned
from src.errors import UserError
from src.config import check_run

TUNED = sorted(path.stem for path in tuned.TUNED.glob("*.yaml"))


@pytest.mark.parametrize("name", TUNED)
def test_every_tuned_config_composes_validates_and_builds_its_agent(name, data_overrides, tmp_path):
    cfg = config.compose([f"tuned={name}", *data_overrides, f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"])
    check_run(cfg)
    assert name == f"{cfg.tuned_for.agent}-{cfg.tuned_for.env}"
    assert (cfg.agent.name, cfg.env.name) == (cfg.tuned_for.agent, cfg.tuned_for.env)
    # The study's fixed ground truth, whatever rank the features were tuned to.
    assert cfg.env.reward_rank == config.compose([f"hparams_search={cfg.agent.name}"]).env.reward_rank
    # As the leaderboard composes an entry: its agent and environment named as well.
    assert config.compose([f"agent={cfg.agent.name}", f"env={cfg.env.name}", f"tuned={name}", *data_overrides,
                           f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]) == cfg
    engine = experiment.assemble(cfg, data.load(cfg.data))
    assert engine.agent.name == cfg.agent.name


@pytest.mark.parametrize("other", ["agent=random", "env=movielens_per_arm"])
def test_a_tuned_config_refuses_another_agent_or_environment(other):
    cfg = config.compose([other, "tuned=linucb-movielens"])
    with pytest.raises(UserError, match=r"^tuned=linucb-movielens holds values tuned for agent=linucb on "
                                        r"env=movielens, not for .*; drop the other agent= or env= choice$"):
        check_run(cfg)


def test_every_learning_agent_of_the_lineup_is_tuned_on_each_environment_it_takes():
    pairs = tuned.pairs(None, None)
    assert ("linucb", "movielens_per_arm") in pairs and ("dropout_ts", "movielens") in pairs
    assert ("dropout_ts", "movielens_per_arm") not in pairs  # it cannot take per-arm features
    assert not any(agent == "random" for agent, _ in pairs)  # nothing to tune
    assert sorted(f"{agent}-{env}" for agent, env in pairs) == TUNED
    with pytest.raises(UserError, match="--agents: nothing to tune for random; choose from linucb, lints"):
        tuned.pairs(["random"], None)


def test_the_best_trial_becomes_the_tuned_config(tmp_path, monkeypatch):
    monkeypatch.setattr(tuned, "TUNED", tmp_path)
    study = optuna.create_study(study_name="tune-lints-movielens")
    distributions = {"agent.alpha": optuna.distributions.FloatDistribution(0.01, 10, log=True),
                     "env.rank_k": optuna.distributions.IntDistribution(2, 20)}
    for alpha, rank, regret in ((3.0, 20, 900.0), (0.25, 7, 400.0), (0.5, 12, 600.0)):
        study.add_trial(optuna.trial.create_trial(params={"agent.alpha": alpha, "env.rank_k": rank},
                                                  distributions=distributions, value=regret))
    tuned.write_tuned("lints", "movielens", study, workers=2, loops=5000)
    written = OmegaConf.load(tmp_path / "lints-movielens.yaml")
    assert written.agent == {"alpha": 0.25} and written.env == {"reward_rank": 20, "rank_k": 7}
    assert written.tuned_for == {"agent": "lints", "env": "movielens", "study": "tune-lints-movielens"}
    assert written.defaults == [{"override /agent": "lints"}, {"override /env": "movielens"}]
    text = (tmp_path / "lints-movielens.yaml").read_text()
    assert text.startswith("# @package _global_\n") and "3 trials" in text and "cumulative_regret 400.0" in text


def test_a_study_resumes_from_its_complete_trials(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    name = "tune-lints-movielens"
    assert tuned.completed_trials(name, storage) == 0  # not started
    study = optuna.create_study(study_name=name, storage=storage)
    distributions = {"agent.alpha": optuna.distributions.FloatDistribution(0.01, 10, log=True)}
    for state, value in ((optuna.trial.TrialState.COMPLETE, 500.0), (optuna.trial.TrialState.FAIL, None),
                         (optuna.trial.TrialState.COMPLETE, 400.0)):
        study.add_trial(optuna.trial.create_trial(params={"agent.alpha": 1.0}, distributions=distributions,
                                                  value=value, state=state))
    study.enqueue_trial({"agent.alpha": 2.0})  # waiting, as a dead worker's trial may be
    assert tuned.completed_trials(name, storage) == 2
