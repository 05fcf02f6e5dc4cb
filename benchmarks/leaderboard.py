"""The leaderboard: every entry of conf/leaderboard.yaml trained with 10 seeds at TF-Agents'
example size on both environments, into one MLflow experiment, then ranked by final regret.

    uv run python -m benchmarks.leaderboard --data-dir /path/to/ml-100k
    uv run python -m benchmarks.leaderboard --data-dir /path/to/ml-100k --seeds 2 --loops 500 --out /tmp/lb
    uv run python -m benchmarks.leaderboard --tables-only   # rebuild the tables from the tracked runs

Each run is `src.training.train` on the config `python -m src.train agent=<agent> env=<env>
training.seed=<seed>` would compose, with the line-up's overrides, tagged `leaderboard.entry`
with its row's label. A run of the same entry and configuration (seed included; where it is
stored aside) that already FINISHED in the experiment is not trained again: an interrupted
leaderboard resumes. The tables take exactly the runs of the line-up the command describes,
so a cheap run (`--loops 500`) and the full one may share an experiment.

Then, per environment, one row per entry: the final cumulative regret, mean over seeds with
the 95% Student t-interval of the mean (src.compare's alignment and statistics), the mean of
the runs' `train/interactions_per_s`, and the seeds; a figure of the regret curves in their
bands (src.plots); each entry's hyperparameters against its agent's defaults; the package
versions the runs were trained with, the command and its wall time. Written to `--out`
(leaderboard.md, regret_<env>.png, leaderboard.csv) and logged to a run tagged
`bandits.role=comparison` in the same experiment.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import mlflow
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from src import compare, config, metrics, plots, tracking
from src.cli import exit_on_user_error, stop_on_termination_signals
from src.errors import UserError, require
from src.paths import PROJECT_ROOT

log = logging.getLogger("benchmarks.leaderboard")

LINEUP = config.CONFIG_DIR / "leaderboard.yaml"
ENTRY_TAG = "leaderboard.entry"
# Experiment tags: what trained the leaderboard's runs, so that --tables-only can say it too.
COMMAND_TAG = "leaderboard.command"
WALL_TAG = "leaderboard.wall_time"
ENV = "env.name"
METRIC = metrics.CUMULATIVE_REGRET
CONFIDENCE = 0.95
VERSIONS = ("tensorflow", "tf-agents", "mlflow", "optuna", "numpy")
# Agent parameters that name or wire the agent rather than set how it learns.
NOT_HYPERPARAMETERS = ("agent._target_", "agent.name", "agent.per_arm")


Identity = tuple[str, tuple[tuple[str, str], ...]]


def identity(label: str, params: dict[str, str]) -> Identity:
    """What makes two runs the same leaderboard run: the entry, and every config parameter, the
    seed included, but where the run is stored and how it spreads over threads (src.compare's
    NOT_CONFIG)."""
    return label, tuple(sorted((key, value) for key, value in params.items()
                               if key == compare.SEED or not compare.NOT_CONFIG.fullmatch(key)))


@dataclass(frozen=True)
class Job:
    label: str
    cfg: DictConfig

    def identity(self) -> Identity:
        return identity(self.label, tracking.flatten(self.cfg))

    def __str__(self) -> str:
        return f"{self.label} on {self.cfg.env.name}, seed {self.cfg.training.seed}"


def jobs(lineup: DictConfig, agents: list[str] | None, envs: list[str] | None, seeds: int,
         overrides: list[str]) -> list[Job]:
    """Every run of the line-up, its config composed and checked before any training starts."""
    known = [entry.agent for entry in lineup.entries]
    for name in agents or []:
        if name not in known:
            raise UserError(f"--agents: no entry for agent '{name}' in {LINEUP.relative_to(PROJECT_ROOT)}; "
                            f"choose from {', '.join(dict.fromkeys(known))}")
    for name in envs or []:
        if name not in lineup.environments:
            raise UserError(f"--envs: unknown environment '{name}'; choose from {', '.join(lineup.environments)}")
    found = []
    for entry in lineup.entries:
        if agents and entry.agent not in agents:
            continue
        label = entry.get("label") or entry.agent
        for env in entry.get("envs") or lineup.environments:
            if envs and env not in envs:
                continue
            base = [f"agent={entry.agent}", f"env={env}", *lineup.overrides, *entry.get("overrides", []), *overrides]
            config.check_command_line(base)
            configs = [config.compose([*base, f"training.seed={seed}"]) for seed in range(seeds)]
            if env in lineup.per_arm_environments and not configs[0].agent.per_arm:
                continue  # its YAML says it cannot take per-arm features
            found += [Job(label, cfg) for cfg in configs]
    if not found:
        raise UserError("no runs: no entry of the line-up matches --agents and --envs")
    return found


def identities(runs: pd.DataFrame) -> pd.Series:
    """Each leaderboard run's `identity` (None for other runs), from MLflow's runs frame."""
    entries = compare.column(runs, f"tags.{ENTRY_TAG}")
    params = runs.filter(regex=r"^params\.").rename(columns=lambda name: name.removeprefix("params."))
    return pd.Series([identity(entry, values.dropna().to_dict()) if isinstance(entry, str) else None
                      for entry, (_, values) in zip(entries, params.iterrows())], index=runs.index, dtype=object)


def finished(experiment_id: str) -> set[Identity]:
    """The identities of the leaderboard runs already FINISHED in the experiment."""
    runs = mlflow.search_runs([experiment_id], filter_string="attributes.status = 'FINISHED'")
    return set(identities(runs).dropna())


def train_all(todo: list[Job]) -> int:
    """Train `todo` in turn; return how many failed (a diverged agent fails alone)."""
    from src import training  # TensorFlow loads here: --tables-only does without it

    for job in todo:  # a wrong value fails now, not after an hour of training
        training.check_training(job.cfg)
    started = time.perf_counter()
    failures = 0
    for number, job in enumerate(todo, 1):
        log.info("Run %d of %d: %s", number, len(todo), job)
        try:
            final, _ = training.train(job.cfg, {ENTRY_TAG: job.label})
        except UserError as error:
            failures += 1
            log.warning("Run %d of %d (%s) failed, the others go on: %s", number, len(todo), job, error)
            continue
        elapsed = time.perf_counter() - started
        log.info("Run %d of %d done: %s, cumulative regret %.1f; about %.0f min left", number, len(todo), job,
                 final[METRIC], elapsed / number * (len(todo) - number) / 60)
    return failures


def standings(experiment_id: str, planned: set[Identity] | None = None) -> compare.Report:
    """One row per environment and entry of the FINISHED leaderboard runs (those `planned`, if
    given), ranked by final regret within an environment, and the curves (mean and band per
    step) of each."""
    runs = compare.find_runs(experiment_id)
    found = identities(runs)
    chosen = found.map(lambda run: run is not None and (planned is None or run in planned)).astype(bool)
    if not chosen.any():
        raise UserError(f"none of this line-up's runs has FINISHED in experiment "
                        f"'{mlflow.get_experiment(experiment_id).name}'; train them first (without --tables-only)")
    runs = runs[chosen]
    client = mlflow.MlflowClient()
    rows, curves = [], []
    for (environment, label), members in runs.groupby([f"params.{ENV}", f"tags.{ENTRY_TAG}"], sort=True):
        params = compare.config_params(members)
        check_one_configuration(members, params, environment, label)
        aligned = compare.align([compare.history(client, run_id, METRIC) for run_id in members.index])
        curve = compare.summarise(aligned, CONFIDENCE, METRIC)
        final = curve.iloc[-1]
        rows.append({"environment": environment, "entry": label, "agent": params[compare.AGENT].iloc[0],
                     "n": len(members), "mean": final["mean"], "ci_low": final["low"], "ci_high": final["high"],
                     "interactions": int(final["step"]),
                     "interactions_per_s": compare.column(members, f"metrics.{metrics.INTERACTIONS_PER_S}").mean(),
                     "seeds": ",".join(members[f"params.{compare.SEED}"]),
                     "hyperparameters": hyperparameters(params.iloc[0]),
                     "versions": versions(members)})
        curves.append(curve.assign(environment=environment, configuration=label))
    table = pd.DataFrame(rows).sort_values(["environment", "mean"], ignore_index=True)
    return compare.Report(table, pd.concat(curves, ignore_index=True))


def check_one_configuration(runs: pd.DataFrame, params: pd.DataFrame, environment: str, label: str) -> None:
    """An entry's runs on an environment must be the seeds of one configuration, each seed once."""
    differing = compare.grouping_key(params)[1:]
    fix = "train the leaderboard into a fresh experiment (--experiment)"
    if differing:
        raise UserError(f"the runs of {label} on {environment} differ in {', '.join(differing)}; {fix}")
    seeds = runs[f"params.{compare.SEED}"]
    if seeds.duplicated().any():
        raise UserError(f"{label} on {environment} has more than one run of seed "
                        f"{', '.join(sorted(set(seeds[seeds.duplicated()])))}; {fix}")


def hyperparameters(params: pd.Series) -> str:
    """`alpha=0.3 (default 1.0), tikhonov_weight=1.0`: each value beside its agent's default
    (conf/agent/<agent>.yaml) where it differs, as a tuned configuration's do."""
    path = config.CONFIG_DIR / "agent" / f"{params[compare.AGENT]}.yaml"
    defaults = tracking.flatten(OmegaConf.create({"agent": OmegaConf.load(path)})) if path.is_file() else {}
    shown = []
    for key, value in sorted(params.dropna().items()):
        if key.startswith("agent.") and key not in NOT_HYPERPARAMETERS:
            default = defaults.get(key)
            differs = f" (default {default})" if default is not None and default != value else ""
            shown.append(f"{key.removeprefix('agent.')}={value}{differs}")
    return ", ".join(shown) or "none"


def versions(runs: pd.DataFrame) -> str:
    """The package versions the runs were trained with (every one, if they differ)."""
    return ", ".join(f"{name} {'/'.join(sorted(set(compare.column(runs, f'tags.version.{name}').dropna()))) or '?'}"
                     for name in VERSIONS)


def number(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def markdown(table: pd.DataFrame, command: str, wall: str) -> str:
    """The leaderboard page: a ranked table and a figure per environment, the hyperparameters,
    the versions and the command."""
    lines = ["# Leaderboard", "",
             f"Made by `{command}`; {wall}. Rank by final cumulative regret (lower is better): the mean "
             f"over seeds with the {CONFIDENCE:.0%} Student t-interval of the mean (clipped at 0); "
             "interactions/s is the mean of the runs' `train/interactions_per_s` (tracked training, "
             "first loop to last). The same command with `--tables-only` rebuilds this page from the "
             "tracked runs.", ""]
    for environment, rows in table.groupby("environment", sort=True):
        interactions = rows["interactions"].iloc[0]
        lines += [f"## {environment}", "",
                  f"| rank | entry | final cumulative regret ({interactions:,} interactions), mean "
                  f"[{CONFIDENCE:.0%} CI] | interactions/s | seeds |", "|---:|---|---|---:|---|"]
        for rank, row in enumerate(rows.itertuples(), 1):
            band = f" [{number(row.ci_low)}, {number(row.ci_high)}]" if row.n > 1 else " (n=1, no band)"
            lines.append(f"| {rank} | {row.entry} | {number(row.mean)}{band} | {row.interactions_per_s:,.0f} "
                         f"| {row.n} ({row.seeds}) |")
        lines += ["", f"![Cumulative regret on {environment}: mean over seeds, {CONFIDENCE:.0%} band]"
                      f"({figure_name(environment)})", ""]
    lines += ["## Hyperparameters", "", "| entry | environment | hyperparameters |", "|---|---|---|"]
    lines += [f"| {row.entry} | {row.environment} | {row.hyperparameters} |"
              for row in table.sort_values(["entry", "environment"]).itertuples()]
    lines += ["", "## Versions", ""]
    lines += [f"- {text}" for text in dict.fromkeys(table["versions"])]
    return "\n".join(lines) + "\n"


def figure_name(environment: str) -> str:
    return f"regret_{environment}.png"


def write(report: compare.Report, out: Path, command: str, wall: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "leaderboard.md").write_text(markdown(report.table, command, wall))
    report.table.to_csv(out / "leaderboard.csv", index=False)
    for environment, curves in report.curves.groupby("environment"):
        figure = plots.comparison_figure(curves, METRIC, CONFIDENCE)
        figure.suptitle(f"Leaderboard on {environment}")
        figure.savefig(out / figure_name(environment), dpi=120)
    log.info("Wrote %s", out / "leaderboard.md")


def duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes} min {seconds} s" if minutes else f"{seconds} s"


def parser(lineup: DictConfig) -> argparse.ArgumentParser:
    names = argparse.ArgumentParser(prog="python -m benchmarks.leaderboard", description=__doc__,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
    names.add_argument("--data-dir", help="a local ml-100k directory (default: download into data/ on first use)")
    names.add_argument("--seeds", type=int, default=lineup.seeds, help="seeds 0..N-1 per entry (default: %(default)s)")
    names.add_argument("--loops", type=int, help="training loops per run (default: conf/training/default.yaml)")
    names.add_argument("--agents", type=lambda text: text.split(","), help="comma-separated agents to keep")
    names.add_argument("--envs", type=lambda text: text.split(","), help="comma-separated environments to keep")
    names.add_argument("--experiment", default=lineup.experiment, help="MLflow experiment (default: %(default)s)")
    names.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, "
                                              "else sqlite:///mlflow.db at the project root)")
    names.add_argument("--out", type=Path, default=Path("docs", "leaderboard"), help="default: %(default)s")
    names.add_argument("--tables-only", action="store_true", help="rebuild the outputs from the runs already tracked")
    names.add_argument("overrides", nargs="*", help="more config overrides for every run, e.g. env.rank_k=10")
    return names


def main(argv: list[str] | None = None) -> None:
    started = time.perf_counter()
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    lineup = OmegaConf.load(LINEUP)
    args = parser(lineup).parse_args(argv)
    command = shlex.join(["uv", "run", "python", "-m", "benchmarks.leaderboard",
                          *(sys.argv[1:] if argv is None else argv)])
    with exit_on_user_error():
        require(args.seeds >= 1, "--seeds", args.seeds, "an integer >= 1")
        require(args.loops is None or args.loops >= 1, "--loops", args.loops, "an integer >= 1")
        overrides = [*([f"data.dir={args.data_dir}"] if args.data_dir else []),
                     *([f"training.loops={args.loops}"] if args.loops else []),
                     *([f"tracking.uri={args.tracking_uri}"] if args.tracking_uri else []),
                     f"tracking.experiment={args.experiment}", *args.overrides]
        planned = jobs(lineup, args.agents, args.envs, args.seeds, overrides)
        if args.tables_only:
            experiment_id = compare.open_experiment(args.tracking_uri, args.experiment)
            report = standings(experiment_id, {job.identity() for job in planned})
            tags = mlflow.get_experiment(experiment_id).tags
            trained_by = tags.get(COMMAND_TAG, "runs tracked in this experiment")
            wall = tags.get(WALL_TAG, "wall time unknown")
        else:
            experiment_id = tracking.connect(args.tracking_uri, args.experiment)
            done = finished(experiment_id)
            todo = [job for job in planned if job.identity() not in done]
            log.info("%d runs in the line-up, %d already finished in experiment '%s'; training %d",
                     len(planned), len(planned) - len(todo), args.experiment, len(todo))
            failures = train_all(todo)
            report = standings(experiment_id, {job.identity() for job in planned})
            seconds = time.perf_counter() - started
            trained_by = command
            wall = (f"wall time {duration(seconds)} on {os.cpu_count()} CPU cores, "
                    f"{datetime.now(timezone.utc):%Y-%m-%d}, for {len(todo)} runs trained ({failures} failed) "
                    f"and the tables")
            client = mlflow.MlflowClient()
            client.set_experiment_tag(experiment_id, COMMAND_TAG, command)
            client.set_experiment_tag(experiment_id, WALL_TAG, wall)
        write(report, args.out, trained_by, wall)
        compare.log_comparison(experiment_id, args.out, {"leaderboard": trained_by, "runs": int(report.table["n"].sum())})
    print(markdown(report.table, trained_by, wall))


if __name__ == "__main__":
    stop_on_termination_signals()
    main()
