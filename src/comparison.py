"""What src.compare reports, as functions other readers of runs (the leaderboard) share:
finding finished training runs, grouping them by configuration, aligning their histories and
the mean with its Student t-interval over seeds. See src.compare for the rules."""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from scipy import stats

from src import metrics, plots, tracking
from src.errors import UserError

log = logging.getLogger(__name__)

AGENT = "agent.name"
SEED = "training.seed"
STUDY_TAG = "sweep.study"
SWEEP = "sweep"  # in a group's key: the study whose trials it gathers
# Where results are stored, how the work is spread over threads and what a sweeper
# optimises: none of these changes what an agent learns, so they never split a group.
NOT_CONFIG = re.compile(
    r"training\.seed|training\.chunk_loops|tracking\..*|sweep\..*|data\.(dir|cache_dir)|training\.threads\..*|objective")


@dataclass(frozen=True)
class Report:
    table: pd.DataFrame  # one row per configuration
    curves: pd.DataFrame  # configuration, step, mean, std, n, low, high


def open_experiment(configured_uri: str | None, experiment: str) -> str:
    """The id of an existing experiment; comparing never creates one."""
    experiment_id = tracking.connect(configured_uri, experiment, create=False)
    if experiment_id is None:
        raise UserError(f"no experiment '{experiment}' in the MLflow tracking store "
                        f"{tracking.tracking_uri(configured_uri)}; pass --experiment or --tracking-uri")
    return experiment_id


def find_runs(experiment_id: str, agents: list[str] | None = None, parent: str | None = None) -> pd.DataFrame:
    """Finished training runs, one row each, MLflow's `params.*`/`metrics.*`/`tags.*` columns;
    the matching runs in any other state are counted in a warning."""
    runs = mlflow.search_runs([experiment_id])
    agent = column(runs, f"params.{AGENT}")
    chosen = agent.notna() & column(runs, f"tags.{tracking.ROLE_TAG}").isna()
    if parent:
        chosen &= column(runs, "tags.mlflow.parentRunId") == parent
    if agents:
        chosen &= agent.isin(agents)
    finished = runs["status"] == "FINISHED"
    if (chosen & ~finished).any():
        log.warning(skipped(runs["status"][chosen & ~finished]))
    chosen &= finished
    if agents and (absent := sorted(set(agents) - set(agent[chosen]))):
        log.warning("No finished runs of %s", ", ".join(absent))
    if not chosen.any():
        wanted = "".join([f", agents {','.join(agents)}" if agents else "", f", parent run {parent}" if parent else ""])
        experiment = mlflow.get_experiment(experiment_id).name
        raise UserError(f"no FINISHED training runs in experiment '{experiment}'{wanted} "
                        f"({mlflow.get_tracking_uri()}); train some first or widen --agents/--parent")
    numeric = functools.partial(pd.to_numeric, errors="coerce")
    return runs[chosen].sort_values(f"params.{SEED}", key=numeric).set_index("run_id")


def skipped(statuses: pd.Series) -> str:
    """One line counting the runs left out, by status."""
    # A RUNNING run may be training still, or be left by a process that died without ending it.
    hint = " (still training, or left by a dead process: `uv run python -m src.runs reap` ends those)"
    parts = [f"{count} {status}" + (hint if status == "RUNNING" else "")
             for status, count in statuses.value_counts().items()]
    return f"Skipped {len(statuses)} runs that are not FINISHED: {', '.join(parts)}"


def column(runs: pd.DataFrame, name: str) -> pd.Series:
    """MLflow leaves out the column of a param, metric or tag that no run has."""
    return runs[name] if name in runs else pd.Series(np.nan, index=runs.index)


def config_params(runs: pd.DataFrame) -> pd.DataFrame:
    params = runs.filter(regex=r"^params\.").rename(columns=lambda name: name.removeprefix("params."))
    # Other kinds of run in the experiment (comparisons) leave their params' columns empty here.
    return params.drop(columns=[key for key in params if NOT_CONFIG.fullmatch(key)]).dropna(axis=1, how="all")


def gather_searches(runs: pd.DataFrame, params: pd.DataFrame) -> pd.DataFrame:
    """`params` with the trials of each search made one configuration per study and agent: the
    parameters that vary among them are blanked, and the study takes their place in the key."""
    study = column(runs, f"tags.{STUDY_TAG}")
    trials = params[study.notna()]
    gathered = params.copy()
    for (name, agent), members in trials.groupby([study[trials.index], trials[AGENT]]):
        searched = [key for key in members if members[key].nunique(dropna=False) > 1]
        if searched:  # a grid of agents x seeds searched nothing within an agent: its runs stay as they are
            gathered.loc[members.index, searched] = np.nan
            gathered.loc[members.index, SWEEP] = name
            log.info("%d trials of sweep '%s' (%s) form one group over the %s they searched; --parent "
                     "compares one sweep's trials one by one", len(members), name, agent, ", ".join(searched))
    return gathered


def grouping_key(params: pd.DataFrame) -> list[str]:
    """The agent, and every parameter that differs: across all runs, or for agent.* within an agent.
    A parameter some runs lack (another agent's, or one a search blanked) does not differ for them;
    a search's trials are kept apart by their study."""
    across = params.nunique()
    within_agent = params.groupby(AGENT).nunique().max()
    differs = [key for key in sorted(params) if key != AGENT
               and (within_agent[key] if key.startswith("agent.") else across[key]) > 1]
    return [AGENT, *([SWEEP] if SWEEP in params else []), *differs]


def check_groups(params: pd.DataFrame, key: list[str]) -> None:
    """Refuse groups that mix environments; warn about other parameters averaged over."""
    unknown = [name for name in key if name not in params]
    if unknown:
        raise UserError(f"--group-by names {', '.join(unknown)}, not a config parameter of these runs; "
                        f"choose from {', '.join(sorted(params))}")
    spread = params.groupby(key, dropna=False).nunique(dropna=False).max()
    mixed = [name for name in spread.index if spread[name] > 1]
    environments = [name for name in mixed if name.startswith("env.")]
    if environments:
        raise UserError(f"--group-by {','.join(key)} would average runs on different environments "
                        f"({', '.join(environments)} differ within a group); add them to --group-by or drop it")
    if mixed:
        log.warning("Averaging over differing %s, as --group-by %s asks", ", ".join(mixed), ",".join(key))


def history(client: mlflow.MlflowClient, run_id: str, metric: str) -> pd.Series:
    points = client.get_metric_history(run_id, metric)
    return pd.Series({point.step: point.value for point in points}, name=run_id, dtype=float).sort_index()


def align(histories: list[pd.Series]) -> pd.DataFrame:
    """Runs as columns on the union of their steps, within the range every run covers."""
    start = max(series.index[0] for series in histories)
    end = min(series.index[-1] for series in histories)
    frame = pd.concat(histories, axis=1).sort_index().interpolate(method="index", limit_area="inside")
    return frame.loc[start:end]


def summarise(aligned: pd.DataFrame, confidence: float, metric: str) -> pd.DataFrame:
    """Mean, sample std and the t-interval of the mean over the runs (columns), per step, within
    the metric's range."""
    n = aligned.shape[1]
    mean = aligned.mean(axis=1)
    half_width = stats.t.ppf(0.5 + confidence / 2, n - 1) * stats.sem(aligned, axis=1) if n > 1 else np.nan
    low, high = metrics.BOUNDS.get(metric, (None, None))
    return pd.DataFrame({"step": aligned.index, "mean": mean, "std": aligned.std(axis=1), "n": n,
                         "low": (mean - half_width).clip(lower=low), "high": (mean + half_width).clip(upper=high)}
                        ).reset_index(drop=True)


def label(values: pd.Series) -> str:
    """`linucb (alpha=1.23, env.rank_k=7)`: the agent leads, so its own parameters go unprefixed."""
    details = ", ".join(f"{key.removeprefix('agent.')}={shown(value)}"
                        for key, value in values.drop(AGENT).dropna().items())
    return f"{values[AGENT]} ({details})" if details else values[AGENT]


def shown(value: str, digits: int = 3) -> str:
    """A parameter's value as a person reads it: fractional numbers to `digits` significant
    digits (a sampled 1.2345678901234567 is 1.23), anything else, whole numbers included, as it is."""
    try:
        number = float(value)
    except ValueError:
        return value
    return value if number.is_integer() and "." not in value else f"{number:.{digits}g}"


def compare(experiment_id: str, metric: str = metrics.CUMULATIVE_REGRET, agents: list[str] | None = None,
            parent: str | None = None, group_by: list[str] | None = None, confidence: float = 0.95) -> Report:
    """Group the matching runs by configuration and summarise `metric` over each group's seeds."""
    runs = find_runs(experiment_id, agents, parent)
    lacking = runs.index[column(runs, f"metrics.{metric}").isna()]
    if len(lacking):
        shared = [name.removeprefix("metrics.") for name in runs.filter(regex=r"^metrics\.")
                  if runs[name].notna().all()]
        which = f"none of the {len(runs)} runs has" if len(lacking) == len(runs) else \
            f"{len(lacking)} of {len(runs)} runs ({', '.join(lacking)}) have"
        raise UserError(f"{which} a history of {metric}; pass --metric, one of: {', '.join(shared) or 'none shared'}")
    params = config_params(runs)
    if not parent and not group_by:
        params = gather_searches(runs, params)
    key = [AGENT, *[name for name in group_by if name != AGENT]] if group_by else grouping_key(params)
    check_groups(params, key)
    client = mlflow.MlflowClient()
    rows, curves = [], []
    for values, members in params.groupby(key, dropna=False, sort=True):
        name = label(pd.Series(values, index=key))
        aligned = align([history(client, run_id, metric) for run_id in members.index])
        curve = summarise(aligned, confidence, metric)
        final = curve.iloc[-1]
        seeds = runs.loc[members.index, f"params.{SEED}"]
        rows.append({"configuration": name, **dict(zip(key, values)), "n": len(members),
                     "mean": final["mean"], "std": final["std"], "ci_low": final["low"], "ci_high": final["high"],
                     "step": int(final["step"]), "seeds": ",".join(seeds), "run_ids": ",".join(members.index)})
        curves.append(curve.assign(configuration=name))
    log.info("%d runs in %d configurations, grouped by %s", len(runs), len(rows), ", ".join(key))
    return Report(pd.DataFrame(rows), pd.concat(curves, ignore_index=True))


def markdown(table: pd.DataFrame, metric: str, confidence: float) -> str:
    def number(value: float) -> str:
        return np.format_float_positional(value, precision=4, fractional=False, trim="-")

    bounded = " (within the metric's range)" if metric in metrics.BOUNDS else ""
    columns = ["configuration", "n", f"final {metric}, mean ± std", f"{confidence:.0%} CI of the mean{bounded}",
               "interactions", "seeds", "run ids"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in table.itertuples():
        interval = f"[{number(row.ci_low)}, {number(row.ci_high)}]" if row.n > 1 else "— (n=1)"
        spread = f" ± {number(row.std)}" if row.n > 1 else " (n=1)"
        cells = [row.configuration, str(row.n), number(row.mean) + spread, interval,
                 f"{row.step:,}", row.seeds, row.run_ids.replace(",", ", ")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write(report: Report, out: Path, metric: str, confidence: float) -> str:
    """Write the plot, the table (Markdown, CSV) and the curves under `out`; return the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(report.table, metric, confidence)
    (out / "comparison.md").write_text(table)
    report.table.to_csv(out / "comparison.csv", index=False)
    report.curves.to_csv(out / "curves.csv", index=False)
    figure = plots.comparison_figure(report.curves, metric, confidence)
    figure.savefig(out / "comparison.png", dpi=120)
    log.info("Wrote %s", out)
    return table


def log_comparison(experiment_id: str, out: Path, params: dict) -> str:
    """Log the report as a run tagged so that later comparisons do not take it for a training run."""
    name = f"comparison__{datetime.now():%Y%m%d-%H%M%S}"
    with mlflow.start_run(experiment_id=experiment_id, run_name=name, tags={tracking.ROLE_TAG: "comparison"}) as active:
        mlflow.log_params({key: str(value) for key, value in params.items()})
        mlflow.log_artifacts(str(out))
    log.info("Logged MLflow run %s (%s)", name, active.info.run_id)
    return active.info.run_id
