"""Runs left behind: those of trials that ended without their worker, failed by a worker that
resumes the study, and any other run idle too long, ended by `src.runs reap`."""

from __future__ import annotations

import time

import mlflow
import optuna
import pytest
from mlflow.entities import RunStatus

from src import runs
from src.campaigns.repair import end_orphaned_runs
from src.campaigns.trials import FAIL


def test_resuming_fails_the_runs_of_failed_trials_only(tmp_path):
    """A worker joining late fails the runs a lost server left RUNNING, but not the best
    trial's run, RUNNING again while the summarising worker adds its policy."""
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    experiment = client.create_experiment("resume")
    study = optuna.create_study(study_name="resume", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    study.add_trial(optuna.trial.create_trial(value=1.0))
    study.add_trial(optuna.trial.create_trial(state=FAIL))
    completing, orphaned = (client.create_run(experiment, tags={"sweep.study": "resume", "sweep.trial": str(number)})
                            for number in (0, 1))
    end_orphaned_runs(study, "resume")
    assert client.get_run(completing.info.run_id).info.status == "RUNNING"
    assert client.get_run(orphaned.info.run_id).info.status == "FAILED"


def test_reap_ends_only_runs_idle_longer_than_the_threshold(tracking_uri, capsys):
    client = mlflow.MlflowClient(tracking_uri)
    experiment = client.create_experiment("reap")
    stale, fresh = client.create_run(experiment), client.create_run(experiment)
    time.sleep(1.5)
    client.log_metric(fresh.info.run_id, "train/regret", 1.0)  # activity keeps a run alive
    runs.main(["reap", "--older-than", "1s", "--experiment", "reap", "--tracking-uri", tracking_uri])
    assert client.get_run(stale.info.run_id).info.status == RunStatus.to_string(RunStatus.FAILED)
    assert "reap" in client.get_run(stale.info.run_id).data.tags["bandits.ended_by"]
    assert client.get_run(fresh.info.run_id).info.status == "RUNNING"
    with pytest.raises(SystemExit) as exit:
        runs.main(["reap", "--older-than", "soon", "--tracking-uri", tracking_uri])
    assert exit.value.code == 2
