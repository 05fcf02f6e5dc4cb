"""src.leaderboard's tables on synthetic MLflow runs with known histories, and one tiny
end-to-end `benchmarks.leaderboard` on synthetic data."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import matplotlib
import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.entities import Metric, Param
from omegaconf import OmegaConf
from scipy import stats

from src import comparison, config, leaderboard, metrics, plots, replicas, tracking
from src.campaigns import tuned
from src.errors import UserError
from src.paths import PROJECT_ROOT
from tests.conftest import SMALL, wait_until

STEPS = np.arange(1, 21) * 16


def client_runs(tracking_uri: str, experiment_id: str):
    mlflow.set_tracking_uri(tracking_uri)
    return mlflow.search_runs([experiment_id])
SEEDS = 3


@pytest.fixture
def experiment(tracking_uri, tmp_path):
    """A fresh experiment in a tmp store; returns (id, log_run), which logs a leaderboard run
    (its entry the agent unless given) with these params."""
    client = mlflow.MlflowClient(tracking_uri)
    experiment_id = client.create_experiment("leaderboard", artifact_location=(tmp_path / "artifacts").as_uri())
    comparison.open_experiment(tracking_uri, "leaderboard")

    def log_run(regret: np.ndarray, rate: float, entry: str | None = None, **params) -> None:
        tags = {leaderboard.ENTRY_TAG: entry or params["agent__name"]}
        run_id = client.create_run(experiment_id, tags=tags).info.run_id
        history = [Metric(metrics.CUMULATIVE_REGRET, float(value), 0, int(step)) for step, value in zip(STEPS, regret)]
        client.log_batch(run_id, metrics=[*history, Metric(metrics.INTERACTIONS_PER_S, rate, 0, int(STEPS[-1]))],
                         params=[Param(key.replace("__", "."), str(value)) for key, value in params.items()])
        client.set_terminated(run_id, "FINISHED")

    return experiment_id, log_run


def regret_curves(rng: np.random.Generator, scale: float) -> np.ndarray:
    """SEEDS cumulative-regret histories, growing by about `scale` per step."""
    return np.cumsum(rng.uniform(0, 2 * scale, (SEEDS, len(STEPS))), axis=1)


def test_table_rows_means_and_bands_match_scipy_per_environment(experiment):
    experiment_id, log_run = experiment
    rng = np.random.default_rng(0)
    # The same agent on both environments, far apart: pooled, its row would lie between them.
    lineup = {("movielens", "linucb"): 20.0, ("movielens", "random"): 100.0, ("movielens_per_arm", "linucb"): 50.0,
              ("movielens_per_arm", "lints"): 10.0}
    histories, rates = {}, {}
    for (env, agent), scale in lineup.items():
        histories[env, agent] = regret_curves(rng, scale)
        rates[env, agent] = rng.uniform(1000, 30000, SEEDS)
        for seed in range(SEEDS):
            log_run(histories[env, agent][seed], rates[env, agent][seed], agent__name=agent, env__name=env,
                    training__seed=seed, training__loops=20)

    table = leaderboard.standings(experiment_id).table

    assert table[["environment", "entry"]].values.tolist() == [
        ["movielens", "linucb"], ["movielens", "random"], ["movielens_per_arm", "lints"],
        ["movielens_per_arm", "linucb"]]  # ranked by regret within each environment
    page = leaderboard.markdown(table, "the command", "wall time 1 s")
    sections = {part.split("\n")[0]: part for part in page.split("\n## ")[1:]}
    for row in table.itertuples():
        final = histories[row.environment, row.entry][:, -1]
        half_width = stats.t.ppf(0.975, SEEDS - 1) * final.std(ddof=1) / np.sqrt(SEEDS)
        assert row.n == SEEDS and row.seeds == "0,1,2" and row.interactions == STEPS[-1]
        assert row.mean == pytest.approx(final.mean())
        assert (row.ci_low, row.ci_high) == pytest.approx((max(0, final.mean() - half_width), final.mean() + half_width))
        assert row.interactions_per_s == pytest.approx(rates[row.environment, row.entry].mean())
        rank = 1 + (table["environment"][:row.Index] == row.environment).sum()
        shown = plots.number
        expected = (f"| {rank} | {row.entry} | {shown(row.mean)} [{shown(row.ci_low)}, {shown(row.ci_high)}] "
                    f"| {row.interactions_per_s:,.0f} | 3 (0,1,2) |")
        assert expected in sections[row.environment].splitlines(), sections[row.environment]
    assert "320 interactions" in sections["movielens"]


def test_a_tuned_entry_stands_apart_beside_its_defaults(experiment):
    experiment_id, log_run = experiment
    rng = np.random.default_rng(1)
    # per_arm and slate say what the agent can take, as a run logs them; they tune nothing.
    capabilities = {"agent__per_arm": True, "agent__slate": True}
    for seed in range(2):
        log_run(regret_curves(rng, 5.0)[0], 9000.0, agent__name="lints", agent__alpha=1.0, env__name="movielens",
                env__rank_k=20, training__seed=seed, **capabilities)
        log_run(regret_curves(rng, 1.0)[0], 9000.0, entry="lints (tuned)", agent__name="lints", agent__alpha=0.3,
                env__name="movielens", env__rank_k=7, training__seed=seed, **capabilities)

    table = leaderboard.standings(experiment_id).table.set_index("entry")

    assert table["n"].to_dict() == {"lints (tuned)": 2, "lints": 2}
    assert table.loc["lints (tuned)", "hyperparameters"] == "alpha=0.3 (default 1.0), rank_k=7 (default 20)"
    assert table.loc["lints", "hyperparameters"] == "alpha=1, rank_k=20"


@pytest.mark.parametrize("other, message", [({"training__loops": 99}, "differ in training.loops"),
                                            ({"training__seed": 0}, "more than one run of seed 0")])
def test_runs_of_one_entry_that_are_not_one_configurations_seeds_are_refused(experiment, other, message):
    experiment_id, log_run = experiment
    settings = {"agent__name": "linucb", "env__name": "movielens", "training__loops": 20}
    log_run(STEPS * 1.0, 9000.0, training__seed=0, **settings)
    log_run(STEPS * 1.0, 9000.0, **{**settings, "training__seed": 1, **other})

    with pytest.raises(UserError, match=message):
        leaderboard.standings(experiment_id)


def test_only_the_planned_configurations_are_ranked(experiment):
    experiment_id, log_run = experiment
    for loops in (20, 99):  # a cheap leaderboard beside the full one, in one experiment
        log_run(STEPS * loops, 9000.0, agent__name="linucb", env__name="movielens", training__seed=0,
                training__loops=loops)
    planned = {leaderboard.identity("linucb", {"agent.name": "linucb", "env.name": "movielens",
                                               "training.seed": "0", "training.loops": "99"})}

    table = leaderboard.standings(experiment_id, planned).table

    assert table["mean"].tolist() == [STEPS[-1] * 99]
    with pytest.raises(UserError, match="none of this line-up's runs has FINISHED"):
        leaderboard.standings(experiment_id, {leaderboard.identity("lints", dict(next(iter(planned))[1]))})


def test_the_figure_ranks_every_entry_in_a_colour_of_its_own_beside_random_as_the_line_to_beat(experiment):
    experiment_id, log_run = experiment
    rng = np.random.default_rng(2)
    # More entries than tab10 has colours, 3 orders of magnitude below random.
    scales = {f"entry {index}": 1.0 + index for index in range(13)} | {"random": 1000.0}
    for entry, scale in scales.items():
        for seed in range(2):
            log_run(regret_curves(rng, scale)[0], 9000.0, entry=entry, agent__name="random" if entry == "random"
                    else "linucb", env__name="movielens", training__seed=seed)
    report = leaderboard.standings(experiment_id)

    figure = plots.leaderboard_figure(report.table, report.curves, leaderboard.REFERENCE_AGENT, 0.95)

    ranking, curves = figure.get_axes()
    assert [label.get_text() for label in ranking.get_yticklabels()] == [
        f"{rank}. {entry}" for rank, entry in enumerate(report.table["entry"], 1)]
    assert report.table["entry"].iloc[-1] == "random" and report.table["mean"].is_monotonic_increasing
    assert ranking.get_xscale() == curves.get_yscale() == "log"
    dots = [line.get_color() for line in ranking.get_lines() if line.get_marker() == "o"]
    drawn = [line.get_color() for line in curves.get_lines()]
    assert drawn == dots  # the ranking is the legend: in rank order, a curve's colour is its row's
    assert len(set(map(str, drawn[:-1]))) == 13 and plots.REFERENCE_COLOUR not in drawn[:-1]
    assert drawn[-1] == plots.REFERENCE_COLOUR and curves.get_lines()[-1].get_linestyle() == "--"
    (reference,) = [line for line in ranking.get_lines() if line.get_linestyle() == "--"]
    assert reference.get_xdata()[0] == report.table["mean"].iloc[-1]


@pytest.mark.parametrize("count", [4, 13, 18, 40])
def test_the_palette_has_a_colour_for_every_entry(count):
    colours = [matplotlib.colors.to_hex(colour) for colour in plots.palette(count)]
    assert len(set(colours)) == count
    # none a grey, the reference's colour
    assert not any(red == green == blue for red, green, blue in map(matplotlib.colors.to_rgb, colours))


def test_a_page_is_made_again_from_its_csvs_without_its_runs(experiment, tmp_path, monkeypatch):
    experiment_id, log_run = experiment
    rng = np.random.default_rng(3)
    for agent, scale in (("linucb", 1.0), ("random", 50.0)):
        for seed in range(2):
            log_run(regret_curves(rng, scale)[0], 9000.0, agent__name=agent, env__name="movielens", training__seed=seed)
    out = tmp_path / "board"
    out.mkdir()
    (out / leaderboard.ABOUT).write_text("What the environments are.\n")
    command = "uv run python -m benchmarks.leaderboard --data-dir /work/shared/datasets/ml-100k --loops 20"
    leaderboard.write(leaderboard.standings(experiment_id), out, command, "wall time 1 s", "Board")
    page = (out / "leaderboard.md").read_text()
    (out / "regret_movielens.png").unlink()

    def unreachable(*args, **kwargs):
        raise AssertionError("the page is made again without its runs")

    monkeypatch.setattr(mlflow, "search_runs", unreachable)
    monkeypatch.setattr(mlflow, "MlflowClient", unreachable)
    leaderboard.rebuild(out)

    assert (out / "leaderboard.md").read_text() == page
    assert (out / "regret_movielens.png").stat().st_size > 0
    # A machine's path means nothing to a reader: the page shows where the data goes instead.
    assert "--data-dir /path/to/ml-100k --loops 20`" in page and "/work/shared" not in page
    assert page.index("What the environments are.") < page.index("## movielens")
    with pytest.raises(UserError, match="no leaderboard page"):
        leaderboard.rebuild(tmp_path / "elsewhere")


def test_the_lineup_runs_each_tuned_configuration_on_its_own_environment(data_overrides):
    lineup = OmegaConf.load(leaderboard.LINEUP)
    planned = leaderboard.jobs(lineup, None, None, 1, data_overrides)
    rows = {(job.label, job.cfg.env.name): job.cfg for job in planned}
    for agent, env in tuned.pairs(None, None):
        cfg = rows[f"{agent} (tuned)", env]
        assert (cfg.tuned_for.agent, cfg.tuned_for.env) == (agent, env)
        assert "tuned_for" not in rows[agent, env]
    assert ("dropout_ts (tuned)", "movielens_per_arm") not in rows  # no per-arm features for it
    for label in ("linucb (interaction features)", "lints (interaction features)"):
        assert rows[label, "movielens_per_arm"].env.arm_features == "interaction"
        assert (label, "movielens") not in rows
    # and random on each environment, and the two interaction-feature entries on one
    assert len(planned) == len(rows) == 2 * len(tuned.pairs(None, None)) + 2 + 2


def test_the_environments_lineup_runs_each_agent_where_its_yaml_allows(data_overrides):
    lineup = OmegaConf.load(config.CONFIG_DIR / "lineups" / "environments.yaml")
    agents = ["linucb", "random"]  # two of its four, each config composed and checked costs a moment
    planned = leaderboard.jobs(lineup, agents, None, 1, data_overrides)
    assert sorted((job.label, job.cfg.env.name) for job in planned) == sorted(
        (agent, env) for agent in agents for env in lineup.environments)
    assert {job.cfg.env.num_movies for job in planned if job.cfg.env.name == "movielens_catalogue"} == {1682}
    # An agent whose YAML says it cannot rank is left out of the slate environment, not failed there.
    lineup.entries.append({"agent": "neural_linucb"})
    planned = leaderboard.jobs(lineup, ["neural_linucb"], None, 1, data_overrides)
    assert sorted(job.cfg.env.name for job in planned) == ["movielens", "movielens_catalogue", "movielens_ratings"]


@pytest.mark.parametrize("arguments, message", [
    (["--agents", "linucb,nope"], "no entry for agent 'nope'"),
    # Found by a hostile try: both were refused only after training, or after the workers started.
    (["--out", "/proc/nope"], "--out=/proc/nope cannot hold files"),
    (["--data-dir", "/nonexistent"], "--data-dir must be a folder holding MovieLens 100K, got '/nonexistent'"),
])
def test_bad_options_are_one_line_and_exit_2_before_anything_trains(run_cli, tmp_path, arguments, message):
    store = tmp_path / "mlflow.db"
    done = run_cli("benchmarks.leaderboard", *arguments, "--tracking-uri", f"sqlite:///{store}", timeout=120)

    assert done.returncode == 2 and done.stdout == ""
    (error,) = [line for line in done.stderr.splitlines() if "ERROR" in line]
    assert message in error and not store.exists()


@pytest.mark.slow
def test_a_tiny_leaderboard_trains_tracks_ranks_and_finds_its_runs_again(run_cli, data_overrides, tracking_uri, tmp_path):
    # One worker: each worker process loads TensorFlow first, a second would cost more than it saves here.
    args = ["--agents", "linucb,random", "--seeds", "2", "--envs", "movielens", "--loops", "60", "--workers", "1",
            "--tracking-uri", tracking_uri, *data_overrides,
            *[override for override in SMALL if not override.startswith("training.loops=")]]

    trained = run_cli("benchmarks.leaderboard", "--out", "board", *args)

    assert trained.returncode == 0, trained.stderr[-3000:]
    page = (tmp_path / "board" / "leaderboard.md").read_text()
    assert trained.stdout.strip() == page.strip()
    rows = [line for line in page.splitlines() if line.startswith(("| 1 |", "| 2 |"))]
    assert sorted(row.split(" | ")[1] for row in rows) == ["linucb", "random"], page
    assert all(row.endswith("| 2 (0,1) |") for row in rows) and "960 interactions" in page
    assert "wall time" in page and "--loops 60" in page and "tensorflow 2." in page
    assert (tmp_path / "board" / "regret_movielens.png").stat().st_size > 0
    client = mlflow.MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("leaderboard").experiment_id])
    entries = sorted(run.data.tags[leaderboard.ENTRY_TAG] for run in runs if leaderboard.ENTRY_TAG in run.data.tags)
    assert entries == ["linucb", "linucb", "random", "random"]
    # Each entry's two seeds trained as one replica group (src.replicas): LinUCB's in one loop,
    # random's (compiled by XLA) on one compilation.
    trained = sorted((run for run in runs if leaderboard.ENTRY_TAG in run.data.tags),
                     key=lambda run: run.data.tags[leaderboard.ENTRY_TAG])
    groups = [run.data.tags.get(replicas.GROUP_TAG) for run in trained]
    assert groups[0] == groups[1] is not None and groups[2] == groups[3] is not None and groups[0] != groups[2]

    # The same line-up finds its runs again by their configurations: it would resume from them.
    planned = leaderboard.jobs(OmegaConf.load(leaderboard.LINEUP), ["linucb", "random"], ["movielens"], 2,
                               [*data_overrides, "training.loops=60", f"tracking.uri={tracking_uri}",
                                "tracking.experiment=leaderboard",
                                *[override for override in SMALL if not override.startswith("training.loops=")]])
    experiment_id = client.get_experiment_by_name("leaderboard").experiment_id
    found = set(leaderboard.identities(client_runs(tracking_uri, experiment_id)).dropna())
    # (linucb's tuned entry, rank 19, does not fit this data's 10 movies: its runs fail alone.)
    assert found == {job.identity() for job in planned if job.label in ("linucb", "random")}


def test_an_entrys_consecutive_seeds_left_to_train_go_as_replica_groups(data_overrides):
    planned = leaderboard.jobs(OmegaConf.load(leaderboard.LINEUP), ["linucb", "random"], ["movielens"], 4,
                               [*data_overrides, *SMALL])
    todo = [job for job in planned if not (job.label == "linucb" and job.cfg.training.seed == 1)]
    grouped = [str(job) for job in leaderboard.in_groups(todo)]
    assert grouped[:2] == ["linucb on movielens, seed 0", "linucb on movielens, seeds 2-3"]
    assert "linucb (tuned) on movielens, seeds 0-3" in grouped
    assert [job for job in grouped if job.startswith("random")] == ["random on movielens, seeds 0-3"]  # one compilation
    unshared = leaderboard.jobs(OmegaConf.merge(OmegaConf.load(leaderboard.LINEUP), {"jit_compile": False}), ["random"],
                                ["movielens"], 2, [*data_overrides, *SMALL])
    assert [str(job) for job in leaderboard.in_groups(unshared)] == [f"random on movielens, seed {seed}" for seed in (0, 1)]


def test_an_entrys_seeds_are_its_composition_with_each_seed(data_overrides):
    """Composed once an entry and copied per seed: each run's config is the one composing it
    with its seed would give."""
    overrides = [*data_overrides, *SMALL, "training.seed=7"]
    lineup = OmegaConf.load(leaderboard.LINEUP)
    planned = leaderboard.jobs(lineup, ["linucb"], ["movielens"], 3, overrides)
    plain = [job for job in planned if job.label == "linucb"]
    assert [job.cfg.training.seed for job in plain] == [0, 1, 2]
    for job in plain:
        composed = config.compose(["agent=linucb", "env=movielens", *lineup.overrides, *overrides,
                                   f"training.seed={job.cfg.training.seed}"])
        assert OmegaConf.to_yaml(job.cfg) == OmegaConf.to_yaml(composed)
    assert plain[0].cfg.training is not plain[1].cfg.training


def test_a_fault_in_a_job_fails_its_runs_in_one_line_and_the_board_goes_on(data_overrides, monkeypatch, caplog):
    from src import training

    (job,) = [job for job in leaderboard.jobs(OmegaConf.load(leaderboard.LINEUP), ["linucb"], ["movielens"], 1,
                                              [*data_overrides, *SMALL]) if job.label == "linucb"]

    def broken(cfg, tags):
        raise RuntimeError("the disk is full\nand a page of detail")

    monkeypatch.setattr(training, "train", broken)
    assert leaderboard.train_job(job, 1) == (None, "the disk is full")
    assert leaderboard.failed_runs(job, None) == 1
    assert "Traceback" in caplog.text and "linucb on movielens, seed 0 failed" in caplog.text


def killed_once_its_run_started(job, cores, tags):
    """LinUCB's job trains until its run has logged metrics, then its worker process is killed
    outright, as the out-of-memory killer does, or sent SIGTERM, as earlyoom or a user's `kill`
    does (every time: the job that kills its worker); the others train."""
    if job.label != "linucb":
        return leaderboard.train_job(job, cores, tags)
    training = threading.Thread(target=leaderboard.train_job, args=(job, cores, tags), daemon=True)
    training.start()
    client = mlflow.MlflowClient(job.cfg.tracking.uri)
    while training.is_alive():
        experiment = client.get_experiment_by_name(job.cfg.tracking.experiment)
        if experiment and client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING' and "
                                             f"tags.`{leaderboard.ENTRY_TAG}` = 'linucb' and "
                                             f"metrics.`{metrics.CUMULATIVE_REGRET}` >= 0"):
            break
        training.join(0.05)
    os.kill(os.getpid(), signal.Signals[os.environ["KILL_WITH"]])
    training.join()  # SIGTERM: stopped here, in the main thread


@pytest.mark.parametrize("kill_with", ["SIGKILL", "SIGTERM"])
def test_a_worker_killed_fails_its_jobs_runs_and_the_board_goes_on(data_overrides, tracking_uri, monkeypatch,
                                                                    kill_with):
    monkeypatch.setenv("KILL_WITH", kill_with)  # the workers' environment: spawned from this process
    planned = leaderboard.jobs(OmegaConf.load(leaderboard.LINEUP), ["linucb", "random"], ["movielens"], 2,
                               [*data_overrides, *SMALL, f"tracking.uri={tracking_uri}", "tracking.experiment=board"])
    todo = [next(job for job in planned if job.label == "linucb"), *(job for job in planned if job.label == "random")]
    todo[0].cfg.training.loops = 10**6  # killed long before its end
    experiment_id = tracking.connect(tracking_uri, "board")
    outcomes = {}
    leaderboard.train_in_processes(todo, 2, experiment_id, lambda job, *outcome: outcomes.setdefault(str(job), outcome),
                                   train=killed_once_its_run_started)
    assert outcomes.pop("linucb on movielens, seed 0") == (
        None, "its worker process died 2 times (killed, or out of memory): given up, its runs ended FAILED")
    assert sorted(outcomes) == ["random on movielens, seed 0", "random on movielens, seed 1"]
    assert all(finals[0] > 0 and error is None for finals, error in outcomes.values())
    runs = client_runs(tracking_uri, experiment_id)
    assert "RUNNING" not in set(runs.status)
    linucb = runs[runs[f"tags.{leaderboard.ENTRY_TAG}"] == "linucb"]
    assert len(linucb) == 2 and set(linucb.status) == {"FAILED"}
    assert set(linucb["tags.bandits.ended_by"]) == {"benchmarks.leaderboard: its worker process died"}
    # Each trained to its end once; those the pool stopped to start afresh ended KILLED.
    random = runs[runs[f"tags.{leaderboard.ENTRY_TAG}"] == "random"]
    assert sorted(random[random.status == "FINISHED"]["params.training.seed"]) == ["0", "1"]
    assert set(random.status) <= {"FINISHED", "KILLED"}


def test_the_lineup_compiles_with_xla_only_the_entries_whose_agent_can(data_overrides):
    lineup = OmegaConf.load(leaderboard.LINEUP)
    compiled = {job.label: job.cfg.training.jit_compile for job in leaderboard.jobs(
        lineup, ["linucb", "epsilon_greedy", "random"], ["movielens"], 1, data_overrides)}
    assert compiled == {"linucb": False, "linucb (tuned)": False, "epsilon_greedy": True,
                        "epsilon_greedy (tuned)": True, "random": True}
    delayed = leaderboard.jobs(lineup, ["epsilon_greedy"], ["movielens"], 1,
                               [*data_overrides, "env.delay=geometric", "env.delay_loops=2"])
    assert not any(job.cfg.training.jit_compile for job in delayed)  # XLA cannot compile a delay's ring
    lineup.jit_compile = False
    assert not any(job.cfg.training.jit_compile for job in leaderboard.jobs(lineup, None, None, 1, data_overrides))


def test_a_replicas_speed_on_the_board_is_its_groups():
    runs = pd.DataFrame({f"metrics.{metrics.INTERACTIONS_PER_S}": [1000.0, 100.0],
                         f"metrics.{metrics.GROUP_INTERACTIONS_PER_S}": [np.nan, 1000.0]})
    assert list(leaderboard.training_rate(runs)) == [1000.0, 1000.0]
    alone = runs.drop(columns=f"metrics.{metrics.GROUP_INTERACTIONS_PER_S}")  # no group in the experiment
    assert list(leaderboard.training_rate(alone)) == [1000.0, 100.0]


def test_a_run_made_before_its_options_gained_settings_keeps_its_place(data_overrides):
    """A run logged before agent.action_mask, env.arrivals and training.jit_compile existed is the
    planned run with them at their defaults; one whose real setting differs is not, nor one that
    drew from the seeds' old streams (logged without training.streams)."""
    job = leaderboard.jobs(OmegaConf.load(leaderboard.LINEUP), ["linucb"], ["movielens"], 1, data_overrides)[0]
    params = tracking.run_params(job.cfg)
    old = {key: value for key, value in params.items()
           if key not in ("agent.action_mask", "env.arrivals", "env.arrivals_start", "env.arrivals_every",
                          "training.jit_compile")}
    other = {**old, "agent.alpha": "2.0"}
    old_streams = {key: value for key, value in params.items() if key != tracking.STREAMS_PARAM}
    runs = pd.DataFrame([{f"tags.{leaderboard.ENTRY_TAG}": job.label, **{f"params.{k}": v for k, v in run.items()}}
                         for run in (old, other, old_streams)])
    found = leaderboard.identities(runs)
    assert found[0] == job.identity() and found[1] != job.identity() and found[2] != job.identity()


def test_a_compiled_entry_says_so_beside_its_hyperparameters():
    params = pd.Series({"agent.name": "random", "env.name": "movielens", "env.rank_k": "20",
                        "training.jit_compile": "True"})
    assert leaderboard.hyperparameters(params) == "rank_k=20, loop compiled by XLA"
    assert "XLA" not in leaderboard.hyperparameters(params.drop("training.jit_compile"))


@pytest.mark.slow
def test_a_stopped_board_stops_its_worker_and_starts_no_queued_job(data_overrides, tracking_uri, tmp_path):
    """Found by a hostile try: a SIGTERM (or Ctrl-C) left the job the pool had queued beyond its
    worker to start and train to its end, and the running one too."""
    log = tmp_path / "board.log"
    board = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.leaderboard", "--agents", "linucb,lints,random", "--seeds", "1",
         "--envs", "movielens", "--loops", "100000", "--workers", "1", "--out", str(tmp_path / "board"),
         "--tracking-uri", tracking_uri, *data_overrides, *[o for o in SMALL if not o.startswith("training.loops=")]],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}, stdout=subprocess.DEVNULL,
        stderr=open(log, "w"))
    client = mlflow.MlflowClient(tracking_uri)

    def runs():
        found = client.get_experiment_by_name("leaderboard")
        return client.search_runs([found.experiment_id]) if found else []

    wait_until(lambda: board.poll() is not None or any(run.data.metrics for run in runs()), 300,
               "the board's first run to train")
    assert board.poll() is None, log.read_text()[-3000:]
    board.send_signal(signal.SIGTERM)
    assert board.wait(timeout=300) == 143, log.read_text()[-3000:]
    assert [run.info.status for run in runs()] == ["KILLED"]  # the one that ran; the queued never started
