"""A tiny tracked LinUCB run with its policy logged, for the tests of what serves it."""

from __future__ import annotations

import mlflow
from tf_agents.trajectories import time_step as ts

from src import serving
from src.training import train

USER = 7


def train_with_policy(make_config, monkeypatch, *overrides: str):
    """Train with the policy saved; return (run id, in-memory greedy policy, catalogue)."""
    logged = {}
    log_policy = serving.log_policy

    def spy(policy, catalogue, movies_arrived=None):
        logged.update(policy=policy, catalogue=catalogue)
        log_policy(policy, catalogue, movies_arrived)

    monkeypatch.setattr(serving, "log_policy", spy)
    train(make_config("tracking.save_policy=true", *overrides))
    return mlflow.last_active_run().info.run_id, logged["policy"], logged["catalogue"]


def greedy_movie(policy, catalogue, user_id: int) -> tuple[int, str]:
    observation = catalogue.observations_of([user_id])
    action = int(policy.action(ts.restart(observation, batch_size=1)).action[0])
    return int(catalogue.movie_ids[action]), str(catalogue.titles[action])
