"""Regret plots for a run and for a comparison.

Figures are made without pyplot, so no GUI backend is needed and the caller's backend and
open figures are left alone; `figure.savefig` and `mlflow.log_figure` take them as they are.
"""

from __future__ import annotations

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from src.metrics import CUMULATIVE_REGRET, REGRET

PLOTTED_POINTS = 2000  # a run's curves' points, at most (and the last)
PANEL_HEIGHT = 3.5  # inches, a comparison panel's least
LEGEND_LINE = 0.2  # inches, one line of a small-font legend
SPAN_FOR_LOG = 20  # lines ending further apart than this factor are drawn on a log axis
REFERENCE_COLOUR = "grey"
# tab20 less its greys (the reference's): 9 hues in their dark shades, then in their light ones.
SHADES = [colour for pair in (0, 1) for colour in matplotlib.colormaps["tab20"].colors[pair::2]
          if not colour[0] == colour[1] == colour[2]]


def run_title(cfg) -> str:
    return f"{cfg.agent.name} on {cfg.env.name} (seed {cfg.training.seed})"


def regret_figure(frame: pd.DataFrame, title: str, random_policy_regret: float | None = None):
    """Cumulative and per-interaction regret against interactions, beside a uniform-random policy."""
    figure = Figure(figsize=(11, 4), layout="constrained")
    cumulative, per_step = figure.subplots(1, 2)
    # Single loops swing between exact optima (zero) and misses; a window of ~2% of the run
    # shows the trend, on a log scale that spans random play down to near-zero regret.
    window = max(1, len(frame) // 50)
    smooth = frame[REGRET].rolling(window, min_periods=1).mean()
    # Both curves are smooth at a fiftieth of the run and a panel is ~450 pixels wide: PLOTTED_POINTS
    # of them, the last included, draw the same lines as 20,000 loops, in a sixth less time.
    stride = max(1, -(-len(frame) // PLOTTED_POINTS))  # rounded up: at most PLOTTED_POINTS + 1
    shown = np.union1d(np.arange(0, len(frame), stride), np.arange(len(frame))[-1:])
    steps = frame["step"].to_numpy()[shown]
    cumulative.plot(steps, frame[CUMULATIVE_REGRET].to_numpy()[shown], label="agent")
    per_step.plot(steps, smooth.to_numpy()[shown], label=f"agent, mean over {window} loops")
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
    """A panel per `panel` of the curves (environment, data, run length), one line per `label`
    in it, the mean over its runs, in its band (`low`, `high`); each panel's legend beside it,
    where it covers no line, and the figure as tall as the longest legend needs."""
    panels = list(curves.groupby("panel", sort=False))
    heights = [max(PANEL_HEIGHT, LEGEND_LINE * curve["label"].nunique() + 1) for _, curve in panels]
    figure = Figure(figsize=(11, sum(heights) + 0.5), layout="constrained")
    axes = figure.subplots(len(panels), 1, squeeze=False, height_ratios=heights)[:, 0]
    for axis, (title, panel) in zip(axes, panels):
        lines = list(panel.groupby("label", sort=False))
        floor = log_floor([curve["mean"] for _, curve in lines])
        for (name, curve), colour, style in zip(lines, palette(len(lines)), styles(len(lines))):
            axis.plot(curve["step"], curve["mean"], style, color=colour, label=f"{name} (n={curve['n'].iloc[0]})")
            axis.fill_between(curve["step"], curve["low"].clip(lower=floor), curve["high"], color=colour, alpha=0.2,
                              linewidth=0)
        if floor:
            axis.set(yscale="log", ylim=(floor, None))
        axis.set(title=title, xlabel="interactions", ylabel=metric)
        axis.grid(alpha=0.3)
        axis.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small", frameon=False)
    figure.suptitle(f"{metric}: mean over runs, {confidence:.0%} t-interval")
    return figure


def leaderboard_figure(table: pd.DataFrame, curves: pd.DataFrame | None, reference: str, confidence: float):
    """One environment's entries in rank order (`table`: entry, agent, mean, ci_low, ci_high,
    best first): their final values in their intervals and, with `curves` (configuration: the
    entry, step, mean, low, high), their curves in their bands beside. The ranking is the legend:
    the entries in rank order, each in its colour. The `reference` agent's entry (random) is the
    line to beat, dashed grey, not a colour among the contenders'; the other entries have a
    colour each. Values that span more than SPAN_FOR_LOG go on a log axis, where the leaders
    stand apart instead of lying flat at zero under the reference."""
    looks = entry_looks(table, reference)
    rows = max(3.4, 0.3 * len(table) + 1.2)
    figure = Figure(figsize=(13 if curves is not None else 7, rows), layout="constrained")
    panels = figure.subplots(1, 2 if curves is not None else 1, squeeze=False,
                             width_ratios=[1, 1.4] if curves is not None else None)[0]
    ranking(panels[0], table, [colour for colour, _ in looks], confidence)
    if curves is not None:
        regret_curves(panels[1], table, curves, looks)
    return figure


def entry_looks(table: pd.DataFrame, reference: str) -> list[tuple]:
    """(colour, line style) per entry: the reference's grey dashes, a colour of its own for each other."""
    count = int((table["agent"] != reference).sum())
    contenders = iter(zip(palette(count), styles(count)))
    return [(REFERENCE_COLOUR, "--") if agent == reference else next(contenders) for agent in table["agent"]]


def ranking(axis, table: pd.DataFrame, colours: list, confidence: float) -> None:
    """Final means and intervals, rank 1 on top, each value written beside its interval; the
    names stay black, where a light colour would be hard to read, the dot beside carries it."""
    positions = list(range(len(table)))
    for position, row, colour in zip(positions, table.itertuples(), colours):
        errors = [[row.mean - row.ci_low], [row.ci_high - row.mean]] if row.n > 1 else None
        axis.errorbar(row.mean, position, xerr=errors, fmt="o", color=colour, capsize=3)
        axis.annotate(number(row.mean), (row.ci_high if row.n > 1 else row.mean, position), xytext=(5, 0),
                      textcoords="offset points", va="center", fontsize="small")
        if colour == REFERENCE_COLOUR:
            axis.axvline(row.mean, linestyle="--", color=colour, linewidth=1)
    axis.set_yticks(positions, [f"{rank}. {entry}" for rank, entry in enumerate(table["entry"], 1)])
    axis.set_ylim(len(table) - 0.5, -0.5)
    wide = spans(table["mean"])
    if wide:
        axis.set_xscale("log", nonpositive="clip")
    axis.margins(x=0.2)  # room for the last value's text
    axis.set(title="Ranking", xlabel=f"final cumulative regret{' (log scale)' if wide else ''}, mean and "
                                     f"{confidence:.0%} interval")
    axis.grid(alpha=0.3, axis="x")


def regret_curves(axis, table: pd.DataFrame, curves: pd.DataFrame, looks: list[tuple]) -> None:
    """Each entry's curve in its band (the reference's alone, a line to beat); looks as in the ranking."""
    lines = [curves[curves["configuration"] == entry] for entry in table["entry"]]
    floor = log_floor([line["mean"] for line in lines])
    for line, (colour, style) in zip(lines, looks):
        axis.plot(line["step"], line["mean"], style, color=colour)
        if colour == REFERENCE_COLOUR:
            continue
        axis.fill_between(line["step"], line["low"].clip(lower=floor), line["high"], color=colour, alpha=0.2,
                          linewidth=0)
    if floor:
        axis.set(yscale="log", ylim=(floor, None))
    scale = " (log scale)" if floor else ""
    axis.set(title="Over the run", xlabel="interactions", ylabel=f"cumulative regret{scale}")
    axis.grid(alpha=0.3)


def number(value: float) -> str:
    """1,182,334 or 0.463: whole at 100 and above, 3 significant digits below."""
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def palette(count: int) -> list:
    """`count` colours, no two alike and none the reference's grey: SHADES, then as many hues
    spread along turbo."""
    if count <= len(SHADES):
        return SHADES[:count]
    return [matplotlib.colormaps["turbo"](index / (count - 1)) for index in range(count)]


def styles(count: int) -> list[str]:
    """Solid lines in the dark shades, dash-dotted in the light ones: a second cue where hues repeat."""
    return ["-" if index < len(SHADES) // 2 else "-." for index in range(count)]


def log_floor(means: list[pd.Series]) -> float | None:
    """The foot of a log axis when the lines end more than SPAN_FOR_LOG apart, else None. Bands
    reaching below it, to zero, stop at it."""
    lowest = min(series.min() for series in means)
    return lowest / 2 if lowest > 0 and spans([series.iloc[-1] for series in means]) else None


def spans(values) -> bool:
    """Whether `values` lie more than SPAN_FOR_LOG apart: on a linear axis the lowest (the leaders,
    when a random agent is among them) would lie flat at zero."""
    return min(values) > 0 and max(values) > SPAN_FOR_LOG * min(values)


def estimates_figure(table: pd.DataFrame, true_value: float | None, title: str, confidence: float,
                     truth_name: str = "true value"):
    """Each estimator's estimate and interval (`table`: estimator, estimate, ci_low, ci_high)
    against the true value, where one is known."""
    figure = Figure(figsize=(7, 0.6 * len(table) + 1.6), layout="constrained")
    axis = figure.subplots()
    positions = range(len(table))
    errors = [table.estimate - table.ci_low, table.ci_high - table.estimate]
    axis.errorbar(table.estimate, positions, xerr=errors, fmt="o", capsize=4,
                  label=f"estimate, {confidence:.0%} {table.interval.iloc[0]} interval")
    if true_value is not None:
        axis.axvline(true_value, color="grey", linestyle="--", label=f"{truth_name} {true_value:.4g}")
    axis.set_yticks(list(positions), table.estimator)
    axis.invert_yaxis()
    axis.set(title=title, xlabel="value (mean reward per round)")
    axis.grid(alpha=0.3, axis="x")
    figure.legend(loc="outside lower center", ncols=2)
    return figure


def rounds_figure(table: pd.DataFrame):
    """The closed loop's rounds (src.pipeline): the true regret per interaction of what was
    served in each round, a promotion after the round marked."""
    figure = Figure(figsize=(8, 4), layout="constrained")
    axis = figure.add_subplot()
    axis.plot(table["round"], table["true_regret_served"], marker="o", color="tab:blue", label="served")
    promoted = table[table["decision"] == "promoted"]
    axis.scatter(promoted["round"], promoted["true_regret_served"], s=160, facecolors="none", edgecolors="tab:green",
                 linewidths=2, label="a challenger promoted after this round", zorder=3)
    axis.set(xlabel="round", ylabel="true regret per interaction (simulator)",
             title="The closed loop: what was served, round by round")
    axis.xaxis.get_major_locator().set_params(integer=True)
    axis.set_ylim(bottom=0)
    axis.grid(alpha=0.3)
    axis.legend()
    return figure
