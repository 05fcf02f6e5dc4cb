"""Regret plots for a run."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from src.metrics import CUMULATIVE_REGRET, REGRET  # noqa: E402


def regret_figure(frame: pd.DataFrame, title: str, random_policy_regret: float | None = None):
    """Cumulative and per-interaction regret against interactions, beside a uniform-random policy."""
    figure, (cumulative, per_step) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    steps = frame["step"]
    cumulative.plot(steps, frame[CUMULATIVE_REGRET], label="agent")
    per_step.plot(steps, frame[REGRET], linewidth=0.6, alpha=0.5, label="agent, per loop")
    smooth = frame[REGRET].rolling(max(1, len(frame) // 50), min_periods=1).mean()
    per_step.plot(steps, smooth, label="agent, smoothed")
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
