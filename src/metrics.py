"""Regret bookkeeping. Regret is measured against the best movie for each sampled user.

Per loop, with n = batch_size x steps_per_loop interactions:
  train/regret                 mean regret per interaction in the loop
  train/cumulative_regret      total regret over all interactions so far
  train/reward                 mean reward (reconstructed rating) per interaction
  train/suboptimal_arm_rate    share of interactions whose pick earned less than the best movie
  train/loss                   the agent's training loss on the loop's experience
and the environment's own (a slate environment's NDCG, precision and click-through rate, a
drifting one's share of users whose best movie moved), means per interaction like the reward.
Under drift the best movie is the best at that time: the regret is dynamic regret.
TF-Agents' `RegretMetric` reports only the last batch's mean; the cumulative sum is ours.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from src.evaluation import estimators

if TYPE_CHECKING:  # the engine brings TensorFlow, which readers of metrics (src.compare) do without
    from src.engine import LoopMetrics

REGRET = "train/regret"
CUMULATIVE_REGRET = "train/cumulative_regret"
REWARD = "train/reward"
SUBOPTIMAL_ARM_RATE = "train/suboptimal_arm_rate"
LOSS = "train/loss"
# A slate environment's metrics (src.envs.movielens_ranking), each a mean per recommended slate.
NDCG = "train/ndcg"
PRECISION = "train/precision"
CLICK_THROUGH_RATE = "train/click_through_rate"
# A drifting environment's (src.envs.movielens, env.drift): the share of interactions whose best
# movie at that time is not the user's best without drift.
BEST_MOVIE_MOVED = "train/best_movie_moved"
# An environment whose movies arrive over time (env.arrivals): the movies a round's candidates
# could come from, averaged over the interactions.
CATALOGUE_SIZE = "train/catalogue_size"
# Training speed, in the train/ section beside the regret: MLflow sorts sections by name, and
# the cumulative regret should be the first chart a person sees.
INTERACTIONS_PER_S = "train/interactions_per_s"
SECONDS = "train/seconds"
# A replica's (src.replicas): its whole group's interactions per second, what the machine gave the
# group; the run's own rate above is its share of it.
GROUP_INTERACTIONS_PER_S = "train/group_interactions_per_s"
# Expected regret per interaction of a uniform-random policy, the dashed line in regret.png; a
# constant of the environment, so a run's tag rather than one more metric chart.
RANDOM_REGRET_TAG = "bandits.random_policy_regret"
SIGNIFICANT_DIGITS = 6
# Regrets are differences of reconstructed ratings (1 to 5) in float64: below 1e-9 what is left
# is rounding error (3.5e-15 where the pick was the best movie), not regret.
DECIMALS = 9
# The metrics a run returns, each with the direction a sweep optimising it must take; an
# off-policy estimate of the learned policy's value when the agent learns offline
# (src.evaluation.offline).
OBJECTIVES = {REGRET: "minimize", CUMULATIVE_REGRET: "minimize", REWARD: "maximize",
              SUBOPTIMAL_ARM_RATE: "minimize",
              **{estimators.metric_name(name): "maximize" for name in estimators.ESTIMATORS}}
FINAL_METRICS = tuple(OBJECTIVES)
ONLINE_METRICS = (REGRET, CUMULATIVE_REGRET, REWARD, SUBOPTIMAL_ARM_RATE)
# The range each metric lies in (None: unbounded), which a confidence band must respect.
BOUNDS = {REGRET: (0.0, None), CUMULATIVE_REGRET: (0.0, None), SUBOPTIMAL_ARM_RATE: (0.0, 1.0), LOSS: (0.0, None),
          NDCG: (0.0, 1.0), PRECISION: (0.0, 1.0), CLICK_THROUGH_RATE: (0.0, 1.0), BEST_MOVIE_MOVED: (0.0, 1.0),
          CATALOGUE_SIZE: (0.0, None)}


def rounded(value: float) -> float:
    """`value` to 6 significant digits and 9 decimals, as logged to MLflow: what lies beyond is
    float noise (5947.0000000020955), and the per-loop sums come from float32 (7 digits) anyway."""
    return round(float(f"{value:.{SIGNIFICANT_DIGITS}g}"), DECIMALS)


class RegretHistory:
    """Accumulates the engine's per-loop sums into per-loop metrics, step = interactions."""

    def __init__(self, interactions_per_loop: int):
        self.interactions_per_loop = interactions_per_loop
        self._frames: list[pd.DataFrame] = []
        self.loops_done = 0
        self._cumulative = 0.0

    def add(self, chunk: LoopMetrics) -> pd.DataFrame:
        """Record a chunk of loops; return its rows."""
        n = self.interactions_per_loop
        loops = self.loops_done + np.arange(1, len(chunk.regret) + 1)
        cumulative = self._cumulative + np.cumsum(chunk.regret)
        frame = pd.DataFrame({
            "step": loops * n,
            REGRET: chunk.regret / n,
            CUMULATIVE_REGRET: cumulative,
            REWARD: chunk.reward / n,
            SUBOPTIMAL_ARM_RATE: chunk.suboptimal / n,
            LOSS: chunk.loss,
            **{name: sums / n for name, sums in chunk.extras.items()},
        })
        self.loops_done = int(loops[-1])
        self._cumulative = float(cumulative[-1])
        self._frames.append(frame)
        return frame

    def frame(self) -> pd.DataFrame:
        return pd.concat(self._frames, ignore_index=True)

    def final(self) -> dict[str, float]:
        last = self._frames[-1].iloc[-1]
        return {key: float(last[key]) for key in ONLINE_METRICS}


def downsample(frame: pd.DataFrame, window: int) -> pd.DataFrame:
    """One row per `window` loops: the per-loop rates (every metric but the cumulative regret)
    averaged over the window (NaNs skipped, as pandas does), cumulative regret at its end. In
    NumPy: it runs on every chunk of training, where a pandas groupby cost neural
    epsilon-greedy a tenth of its speed."""
    if window == 1 or frame.empty:  # a chunk shorter than a window releases nothing yet
        return frame
    starts = np.arange(0, len(frame), window)
    ends = np.append(starts[1:], len(frame)) - 1
    values = frame.to_numpy(dtype=np.float64)  # one copy: pandas' column selections cost a millisecond each
    position = {name: index for index, name in enumerate(frame.columns)}
    rate_names = [name for name in frame.columns if name not in ("step", CUMULATIVE_REGRET)]
    rates = values[:, [position[name] for name in rate_names]]
    seen = ~np.isnan(rates)
    with np.errstate(invalid="ignore", divide="ignore"):  # a window of NaNs only stays NaN
        means = np.add.reduceat(np.where(seen, rates, 0.0), starts) / np.add.reduceat(seen, starts)
    coarse = dict(zip(rate_names, means.T))
    coarse["step"] = frame["step"].to_numpy()[ends]
    coarse[CUMULATIVE_REGRET] = values[ends, position[CUMULATIVE_REGRET]]
    return pd.DataFrame({name: coarse[name] for name in frame.columns})


class Downsampler:
    """Buffers per-loop rows and releases them a whole `window` of loops at a time, one row each."""

    def __init__(self, window: int):
        self.window = window
        self._pending = pd.DataFrame()

    def push(self, rows: pd.DataFrame, last: bool = False) -> pd.DataFrame:
        """The whole windows now complete (all pending rows when `last`), one row per window."""
        pending = pd.concat([self._pending, rows], ignore_index=True) if len(self._pending) else rows
        ready = len(pending) if last else len(pending) - len(pending) % self.window
        self._pending = pending.iloc[ready:]
        return downsample(pending.iloc[:ready], self.window)
