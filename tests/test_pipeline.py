"""src.pipeline: the closed loop end to end, with real processes: a champion trained and
registered, the service on uvicorn, simulated traffic over HTTP, a retraining round."""

from __future__ import annotations

import pandas as pd
import pytest


@pytest.mark.slow
def test_two_rounds_of_the_loop_serve_new_visitors_gate_and_promote_a_better_policy(run_cli, tmp_path):
    out = tmp_path / "out"
    done = run_cli("src.pipeline", "rounds=2", "decisions_per_round=600", "rate=60", "feedback.delay_s=0.5",
                   "champion_overrides=['data=synthetic','data.num_users=200','env.num_movies=10','env.rank_k=4']",
                   f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", f"out={out}", timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    first, second = pd.read_csv(out / "rounds.csv").to_dict("records")
    assert first["decisions"] == second["decisions"] == 600 and first["served_versions"] == 1
    # A random champion against LinUCB learnt from 400 decisions: the truth and the gate agree.
    assert first["decision"] == "promoted" and first["gate/true_difference"] > 0 and first["gate/lower_bound"] > 0
    # Each round's visitors are new draws: of 200 users, about 1 in 200 visits matches by chance.
    users = [pd.read_csv(out / f"round{number}" / "interactions.csv").user_id.to_numpy() for number in (1, 2)]
    assert (users[0] == users[1]).mean() < 0.05
    assert (out / "rounds.png").is_file() and "Rounds in" in done.stderr
