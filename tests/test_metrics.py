"""src.metrics: per-loop sums into per-interaction rates, the cumulative regret, downsampling."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from src import metrics
from src.engine import LoopMetrics

N = 16  # interactions per loop


def chunk(regret, reward=None, suboptimal=None, loss=None) -> LoopMetrics:
    regret = np.asarray(regret, np.float64)
    fill = np.zeros_like(regret)
    return LoopMetrics(regret, fill if reward is None else np.asarray(reward, float),
                       fill if suboptimal is None else np.asarray(suboptimal, float),
                       fill if loss is None else np.asarray(loss, float))


def test_history_turns_loop_sums_into_rates_and_a_running_total():
    history = metrics.RegretHistory(N)
    first = history.add(chunk([16.0, 8.0], reward=[32.0, 48.0], suboptimal=[4.0, 2.0], loss=[0.5, 0.25]))
    second = history.add(chunk([0.0]))
    assert first["step"].tolist() == [16, 32] and second["step"].tolist() == [48]
    assert first[metrics.REGRET].tolist() == [1.0, 0.5]
    assert first[metrics.REWARD].tolist() == [2.0, 3.0]
    assert first[metrics.SUBOPTIMAL_ARM_RATE].tolist() == [0.25, 0.125]
    assert first[metrics.LOSS].tolist() == [0.5, 0.25]
    assert history.loops_done == 3
    assert history.frame()[metrics.CUMULATIVE_REGRET].tolist() == [16.0, 24.0, 24.0]
    assert history.final() == {metrics.REGRET: 0.0, metrics.CUMULATIVE_REGRET: 24.0, metrics.REWARD: 0.0,
                               metrics.SUBOPTIMAL_ARM_RATE: 0.0}


def frame_of(loops: int) -> pd.DataFrame:
    history = metrics.RegretHistory(N)
    history.add(chunk(np.arange(1, loops + 1) * N, reward=np.full(loops, N)))
    return history.frame()


def test_downsample_averages_rates_and_keeps_the_cumulative_regret_at_each_windows_end():
    frame = frame_of(5)
    coarse = metrics.downsample(frame, 2)
    assert coarse["step"].tolist() == [32, 64, 80]
    assert coarse[metrics.REGRET].tolist() == [1.5, 3.5, 5.0]
    assert coarse[metrics.CUMULATIVE_REGRET].tolist() == frame[metrics.CUMULATIVE_REGRET].iloc[[1, 3, 4]].tolist()
    assert list(coarse.columns) == list(frame.columns)
    pd.testing.assert_frame_equal(metrics.downsample(frame, 1), frame)
    # A loss the agent could not compute is left out of its window's mean, as pandas would.
    frame.loc[[0, 2, 3], metrics.LOSS] = np.nan
    assert metrics.downsample(frame, 2)[metrics.LOSS].tolist()[:2] == [frame[metrics.LOSS][1], pytest.approx(np.nan, nan_ok=True)]


@pytest.mark.parametrize("window", [1, 3, 4])
def test_downsampler_releases_whole_windows_then_the_rest_at_the_end(window):
    frame = frame_of(10)
    downsampler = metrics.Downsampler(window)
    released = [downsampler.push(frame.iloc[start:start + 4], last=start + 4 >= 10) for start in range(0, 10, 4)]
    # Pushed in chunks of 4 loops, the windows come out as if the whole run were downsampled at once.
    pd.testing.assert_frame_equal(pd.concat(released, ignore_index=True), metrics.downsample(frame, window))
    assert all(len(rows) == 0 or rows["step"].iloc[-1] % (window * N) == 0 for rows in released[:-1])


def test_a_window_longer_than_a_chunk_releases_nothing_until_it_is_full():
    frame = frame_of(7)
    downsampler = metrics.Downsampler(5)
    assert downsampler.push(frame.iloc[:2]).empty
    assert downsampler.push(frame.iloc[2:4]).empty
    pd.testing.assert_frame_equal(pd.concat([downsampler.push(frame.iloc[4:6]), downsampler.push(frame.iloc[6:], last=True)],
                                            ignore_index=True), metrics.downsample(frame, 5))


@pytest.mark.parametrize("value, logged", [
    (5947.0000000020955, 5947.0),  # float noise in a running total
    (3.5e-15, 0.0),  # a difference of equal ratings computed two ways
    (0.0031234567, 0.00312346),  # a small regret keeps its 6 significant digits
    (123456789.0, 123457000.0),
    (-1.23456789e-7, -1.23e-7),  # below 1e-9 nothing is kept
])
def test_logged_values_keep_6_significant_digits_and_no_noise_below_1e_9(value, logged):
    assert metrics.rounded(value) == logged
