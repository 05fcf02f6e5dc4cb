"""stack.sh: the PostgreSQL + MLflow server stack campaigns share."""

from __future__ import annotations

import subprocess

import sqlalchemy


def test_no_command_line_shows_the_database_password(stack):
    """Any local user can read every process's command line with `ps`."""
    password = sqlalchemy.engine.make_url(stack["OPTUNA_STORAGE"]).password
    command_lines = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    assert "mlflow server" in command_lines and password not in command_lines
