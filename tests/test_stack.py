"""stack.sh: the PostgreSQL + MLflow server stack campaigns share."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import urllib.error
import urllib.request

import pytest
import sqlalchemy

from src.paths import PROJECT_ROOT


def test_no_command_line_shows_the_database_password(stack):
    """Any local user can read every process's command line with `ps`. (The tests' own workers
    are given the storage URL on theirs, as a user may choose to: only the stack's servers count.)"""
    password = sqlalchemy.engine.make_url(stack["OPTUNA_STORAGE"]).password
    command_lines = subprocess.run(["ps", "-ww", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    servers = [line for line in command_lines.splitlines()
               if ("mlflow" in line and ("server" in line or "uvicorn" in line)) or line.startswith("postgres")]
    assert any("mlflow server" in line for line in servers), command_lines[-3000:]
    assert not [line for line in servers if password in line]


@pytest.mark.slow
def test_a_stack_open_to_the_network_asks_for_a_password(tmp_path):
    """STACK_HOST=0.0.0.0 lets anyone on the network reach the MLflow server; with STACK_AUTH=1
    (on by default off loopback) it answers only the user `up` exports."""
    env = {**os.environ, "STACK_DIR": str(tmp_path / "stack"), "STACK_AUTH": "1"}
    try:
        up = subprocess.run([str(PROJECT_ROOT / "stack.sh"), "up"], env=env, capture_output=True, text=True,
                            timeout=600)
        assert up.returncode == 0, up.stderr[-3000:]
        exported = dict(line.removeprefix("export ").split("=", 1) for line in up.stdout.splitlines())
        search = f"{exported['MLFLOW_TRACKING_URI']}/api/2.0/mlflow/experiments/search?max_results=1"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(search, timeout=60)
        assert refused.value.code == 401
        credentials = base64.b64encode(f"admin:{exported['MLFLOW_TRACKING_PASSWORD']}".encode()).decode()
        request = urllib.request.Request(search, headers={"Authorization": f"Basic {credentials}"})
        with urllib.request.urlopen(request, timeout=60) as answer:
            assert answer.status == 200
        assert oct((tmp_path / "stack" / "mlflow-admin").stat().st_mode & 0o777) == "0o600"
    finally:
        subprocess.run([str(PROJECT_ROOT / "stack.sh"), "down"], env=env, capture_output=True, timeout=300)
        cluster = tmp_path / "stack" / "pg"
        if cluster.is_symlink():  # PostgreSQL's own folder, where its user could enter: not under tmp_path
            shutil.rmtree(cluster.resolve(), ignore_errors=True)
