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
ENV = "env.name"
DATA = "data.name"
SEED = "training.seed"
STUDY_TAG = "sweep.study"
SWEEP = "sweep"  # in a group's key: the study whose trials it gathers
# Where results are stored, how the work is spread over threads and what a sweeper
# optimises: none of these changes what an agent learns, so they never split a group.
NOT_CONFIG = re.compile(
    r"training\.seed|training\.chunk_loops|training\.replicas|tracking\..*|sweep\..*|data\.(dir|cache_dir)|"
    r"training\.threads\..*|objective")
# Legend labels' short names for the longer keys.
ABBREVIATIONS = {"epsilon": "eps", "learning_rate": "lr", "tikhonov_weight": "tikhonov", "num_movies": "movies",
                 "num_actions": "actions", "encoding_network_num_train_steps": "encoder_steps"}


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
    # Another data set is another environment: its rewards, and so its regret, are other numbers.
    environments = [name for name in mixed if name.startswith(("env.", "data."))]
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


def repeated_runs(runs: pd.DataFrame, params: pd.DataFrame) -> dict[str, str]:
    """{run id: the run id kept in its place} for each run that repeats a seed of its configuration.

    Two runs of one seed and configuration are not independent draws: counting both would weigh
    that seed twice and narrow the band on no new evidence, so one is kept. The latest is the
    one, as a seed is rerun after a change (a fix, a new version) that the earlier run predates.
    """
    oldest_first = runs["start_time"].sort_values(kind="stable").index
    identity = params.assign(**{SEED: runs[f"params.{SEED}"]}).loc[oldest_first].fillna("").apply(tuple, axis=1)
    latest = {signature: run_id for run_id, signature in identity.items()}
    repeats = {run_id: latest[signature] for run_id, signature in identity.items() if latest[signature] != run_id}
    if repeats:
        log.warning("Dropped as repeats of a seed of their configuration, the latest run kept: %s",
                    "; ".join(f"{run_id} (seed {runs.at[run_id, f'params.{SEED}']}, kept {kept})"
                              for run_id, kept in repeats.items()))
    return repeats


def panel(members: pd.DataFrame, interactions: int) -> str:
    """`movielens · synthetic data · 32,000 interactions`: regrets on another environment, data
    set or run length are other numbers, so each such set of groups gets a panel of its own."""
    where = [f"{values.iloc[0]}{suffix}" for name, suffix in ((ENV, ""), (DATA, " data"))
             if (values := column(members, name).dropna()).any()]
    return " · ".join([*where, f"{interactions:,} interactions"])


def short_labels(table: pd.DataFrame, key: list[str]) -> pd.Series:
    """A legend's labels: the agent and what tells a group apart from the others of its panel
    (`epsilon_greedy (eps=0.1)`); the table keeps the full `configuration`."""
    labels = pd.Series("", index=table.index)
    for _, rows in table.groupby("panel", sort=False):
        # A class path says again what the option's name beside it says.
        telling = [name for name in key[1:] if not name.endswith("._target_") and differs(rows, name)]
        for index, row in rows.iterrows():
            details = ", ".join(short(name, value) for name, value in row[telling].dropna().items())
            labels[index] = f"{row[AGENT]} ({details})" if details else row[AGENT]
    return labels


def differs(rows: pd.DataFrame, name: str) -> bool:
    """Whether `name` takes more than one value (absent counting as one) among `rows`; an agent's
    own parameter, among the rows of one agent."""
    groups = rows.groupby(AGENT)[name] if name.startswith("agent.") else [(None, rows[name])]
    return any(values.nunique(dropna=False) > 1 for _, values in groups)


def short(key: str, value: str) -> str:
    """`eps=0.1` for agent.epsilon=0.1: the key's last part, abbreviated where it is long."""
    name = key.rsplit(".", 1)[-1]
    return f"{ABBREVIATIONS.get(name, name)}={shown(value)}"


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
    runs = with_metric(find_runs(experiment_id, agents, parent), metric)
    params = config_params(runs)
    repeats = repeated_runs(runs, params)
    runs, params = runs.drop(index=list(repeats)), params.drop(index=list(repeats))
    if not parent and not group_by:
        params = gather_searches(runs, params)
    key = [AGENT, *[name for name in group_by if name != AGENT]] if group_by else grouping_key(params)
    check_groups(params, key)
    client = mlflow.MlflowClient()
    groups = []
    for values, members in params.groupby(key, dropna=False, sort=True):
        name = label(pd.Series(values, index=key))
        curve = summarise(align([history(client, run_id, metric) for run_id in members.index]), confidence, metric)
        dropped = [run_id for run_id, kept in repeats.items() if kept in members.index]
        row = summary_row(curve, runs.loc[members.index, f"params.{SEED}"], dropped)
        place = (str(column(members, ENV).iloc[0]), str(column(members, DATA).iloc[0]), row["step"])
        groups.append((place, {"configuration": name, **dict(zip(key, values)),
                               "panel": panel(members, row["step"]), **row}, curve.assign(configuration=name)))
    log.info("%d runs in %d configurations, grouped by %s", len(runs), len(groups), ", ".join(key))
    # Panels by environment, data and run length; within one, the groups in the key's order.
    groups.sort(key=lambda group: group[0])
    table = pd.DataFrame([row for _, row, _ in groups])
    table.insert(table.columns.get_loc("panel") + 1, "label", short_labels(table, key))
    curves = pd.concat([curve for _, _, curve in groups], ignore_index=True)
    return Report(table, curves.merge(table[["configuration", "panel", "label"]], on="configuration", sort=False))


def with_metric(runs: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The runs that have a history of `metric`; those without (a policy learnt offline from logs
    has no training curve) are counted in a warning. None: refused, naming the metrics they have."""
    lacking = column(runs, f"metrics.{metric}").isna()
    if lacking.all():
        held = [name.removeprefix("metrics.") for name in runs.filter(regex=r"^metrics\.") if runs[name].notna().any()]
        raise UserError(f"none of the {len(runs)} runs has a history of {metric}; pass --metric, one of: "
                        f"{', '.join(held) or 'none'}")
    if lacking.any():
        log.warning("Skipped %d of %d runs that have no history of %s (offline learning has no training curve): %s",
                    lacking.sum(), len(runs), metric, ", ".join(runs.index[lacking]))
    return runs[~lacking]


def summary_row(curve: pd.DataFrame, seeds: pd.Series, dropped: list[str]) -> dict:
    """A group's row of the table: its final values, seeds and runs."""
    final = curve.iloc[-1]
    return {"n": len(seeds), "mean": final["mean"], "std": final["std"], "ci_low": final["low"],
            "ci_high": final["high"], "step": int(final["step"]), "seeds": ",".join(seeds),
            "run_ids": ",".join(seeds.index), "dropped_run_ids": ",".join(dropped)}


def markdown(table: pd.DataFrame, metric: str, confidence: float) -> str:
    """A table per panel of the figure: its label there, the full configuration, the statistics;
    a note names the runs dropped as repeats of a seed."""
    bounded = " (within the metric's range)" if metric in metrics.BOUNDS else ""
    columns = ["in the figure", "configuration", "n", f"final {metric}, mean ± std",
               f"{confidence:.0%} CI of the mean{bounded}", "seeds", "run ids"]
    lines = []
    for title, rows in table.groupby("panel", sort=False):
        lines += [f"## {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += [markdown_row(row) for row in rows.itertuples()] + [""]
    dropped = table[table["dropped_run_ids"] != ""]
    if len(dropped):
        lines.append("Dropped as repeats of a seed already counted (the latest run of a seed is kept): "
                     + "; ".join(f"{row.configuration}: {row.dropped_run_ids.replace(',', ', ')}"
                                 for row in dropped.itertuples()))
    return "\n".join(lines).rstrip("\n") + "\n"


def markdown_row(row) -> str:
    interval = f"[{number(row.ci_low)}, {number(row.ci_high)}]" if row.n > 1 else "— (n=1)"
    spread = f" ± {number(row.std)}" if row.n > 1 else " (n=1)"
    cells = [row.label, row.configuration, str(row.n), number(row.mean) + spread, interval, row.seeds,
             row.run_ids.replace(",", ", ")]
    return "| " + " | ".join(cells) + " |"


def number(value: float) -> str:
    return np.format_float_positional(value, precision=4, fractional=False, trim="-")


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
    log.info("Logged MLflow run %s: %s", name, tracking.where_to_see(active.info.run_id, experiment_id))
    return active.info.run_id
