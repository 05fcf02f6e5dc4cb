"""A worker in this process: trials that all fail, pruning, a grid, and trials whose value
does not depend on the trials the worker ran before them."""

from __future__ import annotations

import collections
import re
import subprocess
import sys

import numpy as np
import optuna
import pytest

from src import data, experiment, replicas
from src.campaigns import summary, worker
from src.campaigns.trials import COMPLETE, ERROR_ATTR, FAIL
from src.campaigns.study import compose_sweep, prepare
from src.campaigns.worker import sampler_seed, work
from src.errors import UserError
from src.paths import PROJECT_ROOT
from src.sweep import SweepTracking
from src.training import train
from tests.campaigns.conftest import overrides_for, runs_of, states


def test_a_sweep_whose_every_trial_fails_says_why_and_leaves_nothing_running(data_overrides, tmp_path):
    storage, tracking_uri = f"sqlite:///{tmp_path / 'optuna.db'}", f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = overrides_for(data_overrides, "doomed", storage, tracking_uri, "training.loops=20",
                              "env.rank_k=50", "sweep.max_failures=20")
    # The second identical failure stops it, not the twentieth.
    with pytest.raises(UserError, match=r"study 'doomed' stopped: its trials fail alike and none has completed: "
                                        r"env.rank_k must be"):
        work(overrides)
    assert states(optuna.load_study(study_name="doomed", storage=storage)) == {"FAIL": 2}
    statuses = collections.Counter(run.info.status for run in runs_of(tracking_uri, "doomed"))
    assert statuses == {"FAILED": 1}  # the parent; a config error starts no run


def test_a_study_whose_pruner_stops_every_new_trial_stops_in_one_line():
    """A hostile try pruned 1,280 trials in a row (the search's worst corner against the median of
    nine good ones), the sweep never ending: COMPLETE trials are its goal, and none came."""
    cfg = compose_sweep(["hparams_search=linucb", "hydra.sweeper.n_trials=2", "sweep.pruner=median"])
    study = optuna.create_study(study_name="hopeless")
    for _ in range(7):
        study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.PRUNED))
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.PRUNED, user_attrs={"surplus": True}))
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.COMPLETE, value=1.0))
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.PRUNED))
    # 8 = 4 x the 2 trials asked for; the surplus one (another worker's extra) is not counted.
    with pytest.raises(UserError, match=r"^study 'hopeless' stopped: 8 trials pruned \(sweep.max_pruned=8\) and 1 of "
                                        r"2 COMPLETE: the pruner stops nearly every new trial"):
        worker.run_next(cfg, study, {}, [], 1)


def test_pruning_stops_hopeless_trials_and_a_trial_reproduces_standalone(make_config, data_overrides, tmp_path,
                                                                      monkeypatch):
    # The sampler's seed fixed (a worker's own mixes in its host and process): trials this seed
    # samples include hopeless ones.
    monkeypatch.setattr(worker, "sampler_seed", lambda base, number, trials: base + number + trials)
    storage, tracking_uri = f"sqlite:///{tmp_path / 'optuna.db'}", f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = overrides_for(data_overrides, "pruned", storage, tracking_uri, "hydra.sweeper.n_trials=9",
                              "training.loops=60", "sweep.pruner=median")
    work(overrides)
    study = optuna.load_study(study_name="pruned", storage=storage)
    counts = states(study)
    assert counts["COMPLETE"] == 9 and counts["PRUNED"] >= 1, counts
    found = runs_of(tracking_uri, "pruned")
    pruned = [run for run in found if "sweep.pruned" in run.data.tags]
    assert len(pruned) == counts["PRUNED"] and all(run.info.status == "KILLED" for run in pruned)
    # A trial's value is the value of its configuration, trained anywhere else.
    best = study.best_trial
    params = [f"{name}={value}" for name, value in best.params.items()]
    final, _ = train(make_config("agent=linucb", "env.reward_rank=4", "env.rank_k=3", "training.loops=60", *params))
    assert final["train/cumulative_regret"] == best.value


def test_a_grid_of_agents_and_seeds_runs_each_point_once(data_overrides, tmp_path):
    storage, tracking_uri = f"sqlite:///{tmp_path / 'optuna.db'}", f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [o.replace("hparams_search=linucb", "hparams_search=grid") for o in overrides_for(
        data_overrides, "grid", storage, tracking_uri, "training.loops=20",
        "agent=choice(linucb, random)", "training.seed=choice(0, 1)")]
    work(overrides)
    study = optuna.load_study(study_name="grid", storage=storage)
    assert sorted((t.params["agent"], t.params["training.seed"]) for t in study.trials) == [
        ("linucb", 0), ("linucb", 1), ("random", 0), ("random", 1)]
    assert states(study) == {"COMPLETE": 4}


def test_a_batch_of_trials_shares_one_loop_and_each_trial_is_told_and_pruned_alone(make_config, data_overrides,
                                                                                    tmp_path, monkeypatch):
    monkeypatch.setattr(worker, "sampler_seed", lambda base, number, trials: base + number + trials)
    storage, tracking_uri = f"sqlite:///{tmp_path / 'optuna.db'}", f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [o for o in overrides_for(data_overrides, "batched", storage, tracking_uri, "hydra.sweeper.n_trials=12",
                                          "training.loops=60", "sweep.pruner=median", "sweep.batch=3",
                                          "env.rank_k=choice(2, 3)") if o != "env.rank_k=3"]
    work(overrides)
    study = optuna.load_study(study_name="batched", storage=storage)
    counts = states(study)
    assert counts["COMPLETE"] == 12 and counts["PRUNED"] >= 1 and set(counts) == {"COMPLETE", "PRUNED"}, counts
    runs = {int(run.data.tags["sweep.trial"]): run for run in runs_of(tracking_uri, "batched")
            if "sweep.trial" in run.data.tags}
    batches = collections.defaultdict(list)
    for trial in study.trials:
        batches[runs[trial.number].data.tags[replicas.GROUP_TAG]].append(trial)
    # A batch is one loop: its trials share the first's rank and sample their own alpha and ridge.
    assert sorted(len(trials) for trials in batches.values())[-1] == 3
    for trials in batches.values():
        assert len({trial.params["env.rank_k"] for trial in trials}) == 1
        assert len({trial.params["agent.alpha"] for trial in trials}) == len(trials)
    pruned = [run for run in runs.values() if "sweep.pruned" in run.data.tags]
    assert len(pruned) == counts["PRUNED"] and all(run.info.status == "KILLED" for run in pruned)
    # A batched trial's value is the value of its configuration trained alone.
    batched = next(trial for trial in study.get_trials(states=(COMPLETE,)) if worker.BATCH_ATTR in trial.user_attrs)
    params = [f"{name}={value}" for name, value in batched.params.items()]
    final, _ = train(make_config("agent=linucb", "env.reward_rank=4", "training.loops=60", *params))
    assert final["train/cumulative_regret"] == batched.value


def test_a_batch_of_grid_points_trains_alike_seeds_together_and_a_refused_point_fails_alone(data_overrides,
                                                                                                tmp_path):
    storage, tracking_uri = f"sqlite:///{tmp_path / 'optuna.db'}", f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [o.replace("hparams_search=linucb", "hparams_search=grid") for o in overrides_for(
        data_overrides, "grid", storage, tracking_uri, "training.loops=20", "sweep.batch=4",
        "agent=choice(linucb, random)", "training.seed=choice(0, 1)", "env.rank_k=choice(3, 50)") if o != "env.rank_k=3"]
    work(overrides)
    study = optuna.load_study(study_name="grid", storage=storage)
    assert states(study) == {"COMPLETE": 4, "FAIL": 4}
    assert {trial.params["env.rank_k"] for trial in study.get_trials(states=(FAIL,))} == {50}
    assert all("env.rank_k must be" in trial.user_attrs[ERROR_ATTR] for trial in study.get_trials(states=(FAIL,)))
    runs = runs_of(tracking_uri, "grid")
    assert len(runs) == 5  # the parent and the 4 points that ran: a refused config starts no run
    tags = {int(run.data.tags["sweep.trial"]): run.data.tags for run in runs if "sweep.trial" in run.data.tags}
    by_point = {(trial.params["agent"], trial.params["training.seed"]): tags[trial.number]
                for trial in study.get_trials(states=(COMPLETE,))}
    assert by_point[("linucb", 0)][replicas.GROUP_TAG] == by_point[("linucb", 1)][replicas.GROUP_TAG]


@pytest.mark.parametrize("settings, refusal", [
    (["sweep.batch=0"], "sweep.batch must be an integer >= 1, got 0"),
    (["sweep.batch=2", "tracking.log_interactions=true"], "sweep.batch must be 1 with tracking.log_interactions=true"),
    (["sweep.batch=100000", "hydra.sweeper.n_trials=100000", "env.rank_k=20"],
     "sweep.batch must be small enough for the runs' statistics and histories to fit in half"),
])
def test_a_batch_that_cannot_run_is_refused_before_its_study_is_made(data_overrides, tmp_path, settings, refusal):
    cfg = compose_sweep(["hparams_search=linucb", *data_overrides, *settings,
                         f"hydra.sweeper.storage=sqlite:///{tmp_path / 'optuna.db'}",
                         f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"])
    with pytest.raises(UserError, match=re.escape(refusal)):
        prepare(cfg)
    assert not (tmp_path / "optuna.db").exists() and not (tmp_path / "mlflow.db").exists()


def test_the_single_process_sweep_refuses_a_batch_in_one_line(data_overrides, tmp_path, caplog):
    cfg = compose_sweep(["hparams_search=linucb", *data_overrides, "sweep.batch=2",
                         f"hydra.sweeper.storage=sqlite:///{tmp_path / 'optuna.db'}"])
    with pytest.raises(SystemExit) as exit_:
        SweepTracking().on_multirun_start(cfg)
    assert exit_.value.code == 2 and "sweep.batch=2 batches the trials of ./multirun.sh's workers" in caplog.text
    assert not (tmp_path / "optuna.db").exists()


# Each source of randomness once: sampled actions, network weights, dropout, posterior draws,
# uniform picks. (NeuralLinUCB's come from the same network weights and epsilon sampling.)
STOCHASTIC = ["epsilon_greedy", "neural_boltzmann", "dropout_ts", "lints", "random"]


def test_a_jobs_metrics_do_not_depend_on_the_jobs_before_it(make_config):
    """Every stochastic agent's job, run after the others in one order and then in the reverse
    order (other jobs before it each time), gives the same metrics. A job is what `train` runs:
    the engine `experiment.assemble` seeds and builds, in a process that ran other jobs."""
    jobs = {agent: make_config(f"agent={agent}", "training.loops=20", "training.seed=5") for agent in STOCHASTIC}

    def job_metrics(cfg):
        engine = experiment.assemble(cfg, data.load(cfg.data))
        return np.concatenate([np.stack([chunk.regret, chunk.reward, chunk.suboptimal])
                               for chunk in engine.run(cfg.training.loops, cfg.training.chunk_loops)], axis=1)

    forward = {agent: job_metrics(job) for agent, job in jobs.items()}
    backward = {agent: job_metrics(job) for agent, job in reversed(jobs.items())}
    for agent in STOCHASTIC:
        np.testing.assert_array_equal(backward[agent], forward[agent], err_msg=agent)


def test_a_partial_or_interrupted_study_registers_no_model(data_overrides, tmp_path, monkeypatch, caplog):
    """@champion must follow a complete campaign's best trial, never a partial study's."""
    storage, tracking_uri = f"sqlite:///{tmp_path / 'optuna.db'}", f"sqlite:///{tmp_path / 'mlflow.db'}"
    registered = []
    monkeypatch.setattr(summary, "register_best_model", lambda cfg, run_id: registered.append(run_id))
    overrides = overrides_for(data_overrides, "partial", storage, tracking_uri, "training.loops=20")
    work([*overrides, "hydra.sweeper.n_trials=1"])
    assert len(registered) == 1  # complete: its best is registered
    assert optuna.load_study(study_name="partial", storage=storage).metric_names == ["train/cumulative_regret"]
    summary.summarise(compose_sweep([*overrides, "hydra.sweeper.n_trials=1"]), failed=True)
    summary.summarise(compose_sweep([*overrides, "hydra.sweeper.n_trials=2"]))
    assert len(registered) == 1
    assert "Study 'partial' is not complete (1 of 2 trials): its best trial is not registered" in caplog.text


def test_workers_of_two_invocations_draw_different_seeds():
    seeds = {sampler_seed(0, worker=0, trials=0)}
    other_process = subprocess.run(
        [sys.executable, "-c", "from src.campaigns.worker import sampler_seed; print(sampler_seed(0, 0, 0))"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert int(other_process.stdout) not in seeds
    assert sampler_seed(0, 0, 0) == sampler_seed(0, 0, 0) != sampler_seed(0, 1, 0)
