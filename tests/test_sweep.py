"""src.sweep's command lines: multirun.sh refusing an unknown sweep, and the single-process
Hydra sweep (`python -m src.train -m`) ending its parent run."""

from __future__ import annotations

import re
import subprocess

import mlflow
import pytest

from src.paths import PROJECT_ROOT
from tests.campaigns.conftest import sweep_overrides


def test_unknown_sweep_name_is_one_line(tmp_path):
    result = subprocess.run([str(PROJECT_ROOT / "multirun.sh"), "nope"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: no sweep for 'nope'; choose one of: "
                                                  + ", ".join(sorted(p.stem for p in (PROJECT_ROOT / "conf/hparams_search").glob("*.yaml")))
                                                  + ", all"]


@pytest.mark.parametrize("option", ["--workers", "--trials", "--storage"])
def test_an_option_without_its_value_is_one_line(option):
    result = subprocess.run([str(PROJECT_ROOT / "multirun.sh"), "linucb", option], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2 and result.stderr == f"error: {option} needs a value\n"


@pytest.mark.parametrize("arguments", [["--help"], ["-h"], ["linucb", "--help"]])
def test_help_is_the_scripts_header_and_exit_0(arguments):
    result = subprocess.run([str(PROJECT_ROOT / "multirun.sh"), *arguments], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and not result.stderr
    assert result.stdout.startswith("A campaign on N worker processes") and "./multirun.sh SWEEP" in result.stdout


def test_a_study_name_is_never_run_as_shell_code(tmp_path):
    """multirun.sh once `eval`ed what `src.sweep prepare` printed, MLflow's lines among it."""
    planted = tmp_path / "planted"
    for name, refusal in ((f"x$(touch {planted})", "quote a value holding brackets or $"),
                          (f"'x$(touch {planted})'", "hydra.sweeper.study_name must be letters, digits")):
        result = subprocess.run([str(PROJECT_ROOT / "multirun.sh"), "linucb", f"hydra.sweeper.study_name={name}",
                                 f"hydra.sweeper.storage=sqlite:///{tmp_path / 'optuna.db'}",
                                 f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"],
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 2 and refusal in result.stderr, result.stderr[-2000:]
        assert not planted.exists() and "Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("ranks, parent_status", [("choice(2, 3)", "FINISHED"), ("choice(50)", "FAILED")])
def test_single_process_sweep_ends_its_parent_run(data_overrides, tmp_path, run_cli, ranks, parent_status):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    overrides = sweep_overrides(data_overrides, tmp_path, f"hydra.sweeper.storage={storage}",
                                "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={tmp_path / 'multirun'}")
    overrides = [o if not o.startswith("env.rank_k=") else f"env.rank_k={ranks}" for o in overrides]
    result = run_cli("src.train", "-m", *overrides)
    # Every trial failing ends the sweep with an error, and the parent run must not stay RUNNING.
    assert (result.returncode == 0) == (parent_status == "FINISHED"), result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    if parent_status == "FAILED":
        assert result.returncode == 2
        assert re.search(r"\] every trial of the sweep failed; the last because: env.rank_k must be",
                         result.stderr), result.stderr[-1000:]
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("movielens-bandits").experiment_id])
    parent = next(r for r in runs if r.data.tags.get("sweep.role") == "parent")
    assert parent.info.status == parent_status
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(trials) == (2 if parent_status == "FINISHED" else 0)  # a config error starts no run


# Found by a hostile try: the first three were tracebacks, the rest passed `prepare` or blamed the storage.
@pytest.mark.parametrize("overrides, message", [
    (["hparams_search=nope"], "unknown hparams_search 'nope'; choose one of: dropout_ts"),
    (["hparams_search=linucb", "foo=1"], "Could not override 'foo'"),
    (["hparams_search=linucb", "hydra.sweeper.n_trials=abc"], "Error merging override hydra.sweeper.n_trials=abc"),
    (["hparams_search=linucb", "hydra.sweeper.n_trials=0"], "hydra.sweeper.n_trials must be an integer >= 1"),
    (["hparams_search=linucb", "sweep.grace_s=abc"], "sweep.grace_s must be an integer, got 'abc'"),
    (["hparams_search=linucb", "env.drift=wobble"], "env.drift must be one of none, rotate, switch"),
    # Found by another: trials of live workers failed (grace under a heartbeat), an IndexError
    # (no failures allowed), the storage blamed (a heartbeat of 0).
    (["hparams_search=linucb", "sweep.grace_s=1", "sweep.heartbeat_s=5"],
     "sweep.grace_s must be an integer of at least 2 x sweep.heartbeat_s = 10"),
    (["hparams_search=linucb", "sweep.max_failures=0"], "sweep.max_failures must be an integer >= 1, got 0"),
    (["hparams_search=linucb", "sweep.heartbeat_s=0"], "sweep.heartbeat_s must be an integer >= 1, got 0"),
    (["hparams_search=linucb", "sweep.max_retries=-1"], "sweep.max_retries must be an integer >= 0, got -1"),
    (["hparams_search=linucb", "sweep.storage_patience_s=-1"], "sweep.storage_patience_s must be an integer >= 1"),
    (["hparams_search=linucb", "sweep.max_pruned=0"], "sweep.max_pruned must be an integer >= 1, got 0"),
    (["hparams_search=linucb", "agent.alpha=interval(5, 1)"],
     "the search space cannot be built: `low <= high` must hold, but got (low=5.0, high=1.0)."),
])
def test_a_bad_sweep_is_refused_in_one_line_before_its_study_is_made(overrides, message):
    from src.campaigns import study
    from src.errors import UserError

    with pytest.raises(UserError) as refused:
        study.check_sweeper(study.compose_sweep(overrides), overrides)
    assert str(refused.value).startswith(message) and "\n" not in str(refused.value)


def test_a_sweep_whose_trials_choose_their_agent_leaves_xla_to_each_trial():
    from src.campaigns import study
    from src.errors import UserError

    for overrides in (["hparams_search=grid", "training.jit_compile=true"],
                      ["hparams_search=linucb", "agent=choice(epsilon_greedy,random)", "training.jit_compile=true"]):
        study.check_sweeper(study.compose_sweep(overrides), overrides)
    with pytest.raises(UserError, match="XLA cannot compile agent=linucb's loop"):
        overrides = ["hparams_search=linucb", "training.jit_compile=true"]
        study.check_sweeper(study.compose_sweep(overrides), overrides)


def test_a_study_resumed_with_another_search_is_refused_in_one_line(tmp_path):
    """A hostile try ran a grid again with other choices: it reported the old grid's best, the new
    agent never trained."""
    from src.campaigns import study
    from src.errors import UserError

    common = [f"hydra.sweeper.storage=sqlite:///{tmp_path / 'optuna.db'}", "hydra.sweeper.study_name=again",
              f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "training.seed=choice(0,1)"]
    first = ["hparams_search=grid", "agent=choice(linucb,random)", *common]
    study.prepare(study.compose_sweep(first), first)
    study.prepare(study.compose_sweep(first), first)  # the same search resumes
    other = ["hparams_search=grid", "agent=choice(linucb,lints)", *common]
    with pytest.raises(UserError, match=r"^study 'again' searches agent in CategoricalDistribution\(choices=\('linucb', "
                                        r"'random'\)\).*this command agent in .*'lints'.*name a new study"):
        study.prepare(study.compose_sweep(other), other)
