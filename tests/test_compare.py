"""src.compare on synthetic MLflow runs with known histories, written straight to a tmp store."""

from __future__ import annotations

import logging
import re
import subprocess
import sys

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.entities import Metric, Param

from src import compare as compare_cli
from src import comparison as compare
from src import plots, tracking
from src.errors import UserError
from src.paths import PROJECT_ROOT

METRIC = "train/cumulative_regret"
STEPS = np.arange(1, 11) * 16
T_975_DF2 = 4.302652729911275  # Student t quantile, 97.5%, 2 degrees of freedom (from tables)
BASE = {"env.name": "movielens", "env.rank_k": 20, "training.loops": 10, "objective": METRIC}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('compare') / 'mlflow.db'}"


@pytest.fixture
def experiment(store, request, tmp_path):
    """A fresh experiment per test in the module's store; returns (name, id, log_run)."""
    client = mlflow.MlflowClient(store)
    name = request.node.name
    experiment_id = client.create_experiment(name, artifact_location=(tmp_path / "artifacts").as_uri())

    def log_run(values, steps=STEPS, status="FINISHED", tags=None, start_time=None, **params) -> str:
        run_id = client.create_run(experiment_id, start_time=start_time, tags=tags or {}).info.run_id
        settings = {**BASE, **{key.replace("__", "."): value for key, value in params.items()}}
        client.log_batch(run_id, metrics=[Metric(METRIC, float(v), 0, int(s)) for s, v in zip(steps, values)],
                         params=[Param(key, str(value)) for key, value in settings.items()])
        if status != "RUNNING":
            client.set_terminated(run_id, status)
        return run_id

    compare.open_experiment(store, name)
    return name, experiment_id, log_run


def test_final_mean_std_and_band_match_numpy(experiment):
    _, experiment_id, log_run = experiment
    rng = np.random.default_rng(0)
    histories = {agent: np.cumsum(rng.uniform(0, 5, (3, len(STEPS))), axis=1)
                 for agent in ("linucb", "epsilon_greedy")}
    run_ids = {agent: [log_run(values, agent__name=agent, training__seed=seed) for seed, values in enumerate(runs)]
               for agent, runs in histories.items()}

    report = compare.compare(experiment_id)

    table = report.table.set_index("configuration")
    clipped = []
    for agent, values in histories.items():
        row = table.loc[agent]
        assert row["n"] == 3 and row["step"] == STEPS[-1] and row["seeds"] == "0,1,2"
        assert set(row["run_ids"].split(",")) == set(run_ids[agent])
        assert row["mean"] == pytest.approx(values[:, -1].mean())
        assert row["std"] == pytest.approx(values[:, -1].std(ddof=1))
        curve = report.curves[report.curves["configuration"] == agent]
        half_width = T_975_DF2 * values.std(axis=0, ddof=1) / np.sqrt(3)
        np.testing.assert_array_equal(curve["step"], STEPS)
        np.testing.assert_allclose(curve["mean"], values.mean(axis=0))
        # Cumulative regret is never negative: the early, wide bands are clipped at 0.
        np.testing.assert_allclose(curve["low"], np.maximum(0, values.mean(axis=0) - half_width))
        clipped.append((values.mean(axis=0) - half_width < 0).any())
        np.testing.assert_allclose(curve["high"], values.mean(axis=0) + half_width)
    assert any(clipped)


def test_groups_by_the_config_parameters_that_differ(experiment):
    _, experiment_id, log_run = experiment
    ramp = STEPS * 1.0
    for seed in (0, 1):
        # Where runs are stored and how many threads they used must not split a group.
        where = {"tracking__uri": f"sqlite:///{seed}.db", "data__dir": f"/data{seed}",
                 "training__threads__intra_op": seed + 1}
        for alpha in (1.0, 10.0):
            log_run(ramp * alpha, agent__name="linucb", agent__alpha=alpha, training__seed=seed, **where)
        log_run(ramp, agent__name="epsilon_greedy", env__rank_k=10, training__seed=seed, **where)
    log_run(ramp, status="FAILED", agent__name="linucb", agent__alpha=1.0, training__seed=2)
    log_run(ramp, tags={tracking.ROLE_TAG: "comparison"}, agent__name="linucb", agent__alpha=1.0, training__seed=3)

    table = compare.compare(experiment_id).table

    assert sorted(table.columns[1:4]) == ["agent.alpha", "agent.name", "env.rank_k"]
    groups = table.set_index("configuration")[["agent.alpha", "env.rank_k", "n"]].fillna("-")
    assert groups.to_dict("index") == {
        "epsilon_greedy (env.rank_k=10)": {"agent.alpha": "-", "env.rank_k": "10", "n": 2},
        "linucb (alpha=1, env.rank_k=20)": {"agent.alpha": "1.0", "env.rank_k": "20", "n": 2},
        "linucb (alpha=10, env.rank_k=20)": {"agent.alpha": "10.0", "env.rank_k": "20", "n": 2},
    }


def test_a_mixed_store_keeps_labels_short_and_a_sweep_one_group(experiment, tmp_path):
    _, experiment_id, log_run = experiment
    rng = np.random.default_rng(1)

    def history():
        return np.cumsum(rng.uniform(0, 2, len(STEPS)))

    for seed in (0, 1):
        for agent in ("linucb", "lints"):
            log_run(history(), agent__name=agent, agent__alpha=1.0, training__seed=seed)
    log_run(history(), agent__name="lints", agent__alpha=1.0, env__name="movielens_per_arm", training__seed=0)
    sweep = {compare.STUDY_TAG: "linucb", "mlflow.parentRunId": "0" * 32}
    # Sampled values at full precision; the last two trials tie on rank k, as a search that converges does.
    trials = [log_run(history(), tags=sweep, agent__name="linucb", agent__alpha=rng.uniform(0.1, 30),
                      agent__tikhonov_weight=rng.uniform(1e-4, 1), env__rank_k=rank, training__seed=0)
              for rank in (3, 11, 17, 20, 20)]

    report = compare.compare(experiment_id)

    table = report.table.set_index("configuration")
    assert table["n"].to_dict() == {"linucb (env.name=movielens)": 2, "linucb (sweep=linucb, env.name=movielens)": 5,
                                    "lints (env.name=movielens)": 2, "lints (env.name=movielens_per_arm)": 1}
    assert set(table.loc["linucb (sweep=linucb, env.name=movielens)", "run_ids"].split(",")) == set(trials)
    assert (report.curves["low"].dropna() >= 0).all()
    text = compare.markdown(report.table, METRIC, 0.95)
    assert "nan" not in text and "1.234 (n=1)" not in text and " (n=1) |" in text
    compare.write(report, tmp_path / "report", METRIC, 0.95)
    assert (tmp_path / "report" / "comparison.png").stat().st_size > 0

    # One sweep looked into: a group per trial, its sampled values to 3 significant digits.
    labels = compare.compare(experiment_id, parent="0" * 32).table["configuration"]
    assert len(labels) == 5 and labels.str.len().max() <= 60, labels.tolist()
    assert not labels.str.contains(r"\d{6}").any(), labels.tolist()


def test_a_store_of_several_environments_and_lengths_gets_a_panel_each_with_short_labels(experiment, tmp_path):
    _, experiment_id, log_run = experiment
    # What the README's recipes leave in one store: quick and full runs, synthetic and real data,
    # two environments, two epsilons.
    synthetic = {"data__name": "synthetic", "data___target_": "src.data.synthetic.load"}
    real = {"data__name": "movielens", "data___target_": "src.data.movielens.load"}
    long_steps = STEPS * 10
    for seed in (0, 1):
        log_run(STEPS * 1.0, agent__name="linucb", **synthetic, training__seed=seed)
        log_run(long_steps * 1.0, steps=long_steps, agent__name="linucb", training__loops=100, **synthetic,
                training__seed=seed)
        log_run(STEPS * 2.0, agent__name="linucb", **real, training__seed=seed)
        log_run(STEPS * 3.0, agent__name="linucb", env__name="movielens_per_arm", env__num_movies=None,
                env___target_="src.envs.movielens_per_arm.build", **synthetic, training__seed=seed)
        for epsilon in (0.05, 0.1):
            log_run(STEPS * 4.0, agent__name="epsilon_greedy", agent__epsilon=epsilon, **synthetic, training__seed=seed)

    report = compare.compare(experiment_id)

    table = report.table
    assert table["panel"].drop_duplicates().tolist() == [
        "movielens · movielens data · 160 interactions", "movielens · synthetic data · 160 interactions",
        "movielens · synthetic data · 1,600 interactions", "movielens_per_arm · synthetic data · 160 interactions"]
    panels = table.groupby("panel", sort=False)["label"].agg(list).tolist()
    assert panels == [["linucb"], ["epsilon_greedy (eps=0.05)", "epsilon_greedy (eps=0.1)", "linucb"], ["linucb"],
                      ["linucb"]]
    # The table keeps every parameter that differs.
    assert table["configuration"].str.contains("data.name=synthetic").sum() == 5
    assert table["configuration"].str.contains("training.loops=100").sum() == 1
    assert set(report.curves["label"]) == set(table["label"])
    text = compare.write(report, tmp_path / "report", METRIC, 0.95)
    assert "| epsilon_greedy (eps=0.1) | epsilon_greedy (epsilon=0.1, data._target_=src.data.synthetic.load, " in text

    figure = plots.comparison_figure(report.curves, METRIC, 0.95)
    figure.draw_without_rendering()
    axes = figure.get_axes()
    assert [axis.get_title() for axis in axes] == table["panel"].drop_duplicates().tolist()
    for axis in axes:
        legend = axis.get_legend()
        assert legend.get_window_extent().x1 <= figure.bbox.x1 and legend.get_window_extent().x0 >= figure.bbox.x0
        assert legend.get_window_extent().y0 >= figure.bbox.y0
        assert not legend.get_window_extent().overlaps(axis.get_window_extent())


def test_the_lines_of_a_random_agent_far_above_the_others_go_on_a_log_axis(experiment):
    _, experiment_id, log_run = experiment
    for seed in (0, 1):
        log_run(STEPS * (100.0 + seed), agent__name="random", training__seed=seed)
        log_run(np.sqrt(STEPS) * (1.0 + seed), agent__name="linucb", training__seed=seed)

    report = compare.compare(experiment_id)

    (axis,) = plots.comparison_figure(report.curves, METRIC, 0.95).get_axes()
    assert axis.get_yscale() == "log"
    # Bands clipped at zero stop at the axis' foot.
    assert axis.get_ylim()[0] == pytest.approx(report.curves["mean"].min() / 2)


def test_repeats_of_a_seed_are_dropped_keeping_the_latest_and_named(experiment, caplog):
    _, experiment_id, log_run = experiment
    first = log_run(STEPS * 1.0, start_time=1_000, agent__name="linucb", agent__alpha=1.0, training__seed=0)
    again = log_run(STEPS * 3.0, start_time=2_000, agent__name="linucb", agent__alpha=1.0, training__seed=0)
    other = log_run(STEPS * 5.0, start_time=1_500, agent__name="linucb", agent__alpha=1.0, training__seed=1)
    # One seed under another configuration is no repeat.
    log_run(STEPS * 1.0, start_time=3_000, agent__name="linucb", agent__alpha=2.0, training__seed=0)

    with caplog.at_level(logging.WARNING, logger=compare.__name__):
        report = compare.compare(experiment_id)

    row = report.table.set_index("configuration").loc["linucb (alpha=1)"]
    assert row["n"] == 2 and row["seeds"] == "0,1" and set(row["run_ids"].split(",")) == {again, other}
    assert row["mean"] == pytest.approx(STEPS[-1] * 4.0)
    assert row["dropped_run_ids"] == first
    (warning,) = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert f"{first} (seed 0, kept {again})" in warning
    assert report.table["n"].sum() == 3
    assert ("Dropped as repeats of a seed already counted (the latest run of a seed is kept): "
            f"linucb (alpha=1): {first}") in compare.markdown(report.table, METRIC, 0.95)


def test_runs_left_out_for_their_status_are_counted_in_one_line(experiment, caplog):
    _, experiment_id, log_run = experiment
    for seed, status in enumerate(["FINISHED", "FINISHED", "RUNNING", "RUNNING", "FAILED"]):
        log_run(STEPS, status=status, agent__name="linucb", training__seed=seed)
    log_run(STEPS, status="KILLED", agent__name="lints", training__seed=0)  # not asked for

    with caplog.at_level(logging.INFO, logger=compare.__name__):
        table = compare.compare(experiment_id, agents=["linucb"]).table

    assert table["n"].tolist() == [2]
    (skipped,) = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert skipped == ("Skipped 3 runs that are not FINISHED: 2 RUNNING (still training, or left by a dead "
                       "process: `uv run python -m src.runs reap` ends those), 1 FAILED")


def test_different_step_grids_are_interpolated_over_the_common_range(experiment):
    _, experiment_id, log_run = experiment
    every_10 = np.arange(10, 101, 10)
    every_20 = np.arange(20, 121, 20)
    log_run(2.0 * every_10, steps=every_10, agent__name="linucb", training__seed=0)
    log_run(4.0 * every_20, steps=every_20, agent__name="linucb", training__seed=1)

    curve = compare.compare(experiment_id).curves

    # Both lines are exact under linear interpolation: the mean is 3 x step, from 20 to 100.
    np.testing.assert_array_equal(curve["step"], np.arange(20, 101, 10))
    np.testing.assert_allclose(curve["mean"], 3.0 * curve["step"])


@pytest.mark.parametrize("key, values", [("env.rank_k", (10, 20)), ("data.name", ("movielens", "synthetic"))])
def test_runs_on_different_environments_are_never_averaged(experiment, key, values):
    _, experiment_id, log_run = experiment
    for seed in (0, 1):
        for scale, value in enumerate(values, 1):
            log_run(STEPS * scale, agent__name="linucb", training__seed=seed, **{key.replace(".", "__"): value})

    assert compare.compare(experiment_id).table["n"].tolist() == [2, 2]
    with pytest.raises(UserError, match=f"different environments \\({re.escape(key)}"):
        compare.compare(experiment_id, group_by=["agent.name"])


def test_a_metric_the_runs_lack_is_refused(experiment):
    _, experiment_id, log_run = experiment
    for seed in (0, 1):
        log_run(STEPS, agent__name="linucb", training__seed=seed)

    with pytest.raises(UserError, match=f"none of the 2 runs has a history of train/nope.*one of: {METRIC}$"):
        compare.compare(experiment_id, metric="train/nope")


def test_runs_without_the_metrics_history_are_skipped_and_counted(experiment, store, caplog):
    _, experiment_id, log_run = experiment
    kept = [log_run(STEPS, agent__name="linucb", training__seed=seed) for seed in (0, 1)]
    client = mlflow.MlflowClient(store)
    offline = client.create_run(experiment_id).info.run_id  # as a policy learnt from logs: no training curve
    settings = {**BASE, "agent.name": "linucb", "training.seed": 2}
    client.log_batch(offline, params=[Param(key, str(value)) for key, value in settings.items()])
    client.set_terminated(offline, "FINISHED")

    with caplog.at_level(logging.WARNING):
        report = compare.compare(experiment_id)
    assert report.table["run_ids"].tolist() == [",".join(kept)]
    assert f"Skipped 1 of 3 runs that have no history of {METRIC}" in caplog.text and offline in caplog.text


def test_cli_writes_logs_and_prints_the_report(experiment, store, tmp_path, capsys):
    name, experiment_id, log_run = experiment
    for seed in (0, 1):
        log_run(STEPS * (seed + 1), agent__name="linucb", training__seed=seed)
    out = tmp_path / "report"

    compare_cli.main(["--tracking-uri", store, "--experiment", name, "--out", str(out)])

    assert {path.name for path in out.iterdir()} == {"comparison.png", "comparison.md", "comparison.csv", "curves.csv"}
    printed = capsys.readouterr().out
    assert printed.strip() == (out / "comparison.md").read_text().strip()
    assert "| linucb | linucb | 2 |" in printed
    assert pd.read_csv(out / "comparison.csv")["mean"].tolist() == [STEPS[-1] * 1.5]
    logged = mlflow.search_runs([experiment_id], filter_string=f"tags.{tracking.ROLE_TAG} = 'comparison'")
    assert len(logged) == 1
    # The comparison run sits in the same experiment, yet is not taken for a training run.
    assert compare.compare(experiment_id).table["n"].tolist() == [2]


def test_cli_no_matching_runs_is_one_line_and_non_zero(experiment, store, caplog, capsys):
    name, _, log_run = experiment
    log_run(STEPS, agent__name="linucb", training__seed=0)

    with pytest.raises(SystemExit) as exit:
        compare_cli.main(["--tracking-uri", store, "--experiment", name, "--agents", "lints"])

    assert exit.value.code == 2
    (error,) = [record.getMessage() for record in caplog.records if record.levelname == "ERROR"]
    assert "no FINISHED training runs" in error and "agents lints" in error and "\n" not in error
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("value, shown", [("1.2345678901234567", "1.23"), ("10.0", "10"), ("0.000123456", "0.000123"),
                                          ("20000", "20000"), ("movielens_per_arm", "movielens_per_arm")])
def test_label_values_are_rounded_and_whole_numbers_kept(value, shown):
    assert compare.shown(value) == shown


def test_a_bad_option_is_refused_before_mlflow_loads():
    """MLflow takes seconds to import; a typo should not wait for it."""
    probe = ("import sys\nfrom src import compare\ntry:\n    compare.main(['--confidence', '2'])\n"
             "except SystemExit as exit:\n    print(exit.code, 'mlflow' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["2", "False"], done.stdout + done.stderr[-2000:]
