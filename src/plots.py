"""Regret plots for a run and for a comparison.

Figures are made without pyplot, so no GUI backend is needed and the caller's backend and
open figures are left alone; `figure.savefig` and `mlflow.log_figure` take them as they are.
"""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure

from src.metrics import CUMULATIVE_REGRET, REGRET


def run_title(cfg) -> str:
    return f"{cfg.agent.name} on {cfg.env.name} (seed {cfg.training.seed})"


def regret_figure(frame: pd.DataFrame, title: str, random_policy_regret: float | None = None):
    """Cumulative and per-interaction regret against interactions, beside a uniform-random policy."""
    figure = Figure(figsize=(11, 4), layout="constrained")
    cumulative, per_step = figure.subplots(1, 2)
    steps = frame["step"]
    cumulative.plot(steps, frame[CUMULATIVE_REGRET], label="agent")
    # Single loops swing between exact optima (zero) and misses; a window of ~2% of the run
    # shows the trend, on a log scale that spans random play down to near-zero regret.
    window = max(1, len(frame) // 50)
    smooth = frame[REGRET].rolling(window, min_periods=1).mean()
    per_step.plot(steps, smooth, label=f"agent, mean over {window} loops")
    if random_policy_regret is not None:
        cumulative.plot(steps, steps * random_policy_regret, "--", color="grey", label="uniform random (expected)")
        per_step.axhline(random_policy_regret, linestyle="--", color="grey", label="uniform random (expected)")
    cumulative.set(title="Cumulative regret", xlabel="interactions", ylabel="regret")
    per_step.set(title="Regret per interaction", xlabel="interactions", ylabel="regret", yscale="log")
    for axis in (cumulative, per_step):
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(title)
    return figure


def comparison_figure(curves: pd.DataFrame, metric: str, confidence: float):
    """One line per configuration, the mean over its runs, in its band (`low`, `high`); the
    legend below the plot, where it covers no line however many configurations there are."""
    groups = list(curves.groupby("configuration", sort=False))
    columns = 1 if len(groups) <= 4 else 2
    legend_rows = -(-len(groups) // columns)
    figure = Figure(figsize=(9, 5 + 0.22 * legend_rows), layout="constrained")
    axis = figure.subplots()
    # Dashes keep a line visible where another configuration lies on top of it.
    styles = ["-", "--", ":", "-."]
    for index, (configuration, curve) in enumerate(groups):
        (line,) = axis.plot(curve["step"], curve["mean"], styles[index % len(styles)],
                            label=f"{configuration} (n={curve['n'].iloc[0]})")
        axis.fill_between(curve["step"], curve["low"], curve["high"], color=line.get_color(), alpha=0.25, linewidth=0)
    axis.set(title=f"{metric}: mean over runs, {confidence:.0%} t-interval", xlabel="interactions", ylabel=metric)
    axis.grid(alpha=0.3)
    figure.legend(loc="outside lower center", ncols=columns, fontsize="small", frameon=False)
    return figure


def estimates_figure(table: pd.DataFrame, true_value: float, title: str, confidence: float):
    """Each estimator's estimate and interval (`table`: estimator, estimate, ci_low, ci_high)
    against the true value."""
    figure = Figure(figsize=(7, 0.6 * len(table) + 1.6), layout="constrained")
    axis = figure.subplots()
    positions = range(len(table))
    errors = [table.estimate - table.ci_low, table.ci_high - table.estimate]
    axis.errorbar(table.estimate, positions, xerr=errors, fmt="o", capsize=4, label=f"estimate, {confidence:.0%} bootstrap")
    axis.axvline(true_value, color="grey", linestyle="--", label=f"true value {true_value:.3f}")
    axis.set_yticks(list(positions), table.estimator)
    axis.invert_yaxis()
    axis.set(title=title, xlabel="value (mean reward per interaction)")
    axis.grid(alpha=0.3, axis="x")
    figure.legend(loc="outside lower center", ncols=2)
    return figure
