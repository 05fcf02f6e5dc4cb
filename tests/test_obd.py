"""The Open Bandit Dataset's loader (src.data.obd) on small files written in its layout, and the
Bernoulli TS policy's position probabilities against their exact values."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from src.data import obd
from src.errors import UserError

ITEMS = 4


def write_obd(folder, behavior: str = "random", campaign: str = "men", rounds: int = 30) -> pd.DataFrame:
    """A log in OBD's layout: an unnamed index, hashed user categories, an affinity per item."""
    rng = np.random.default_rng(1)
    frame = pd.DataFrame({
        "timestamp": pd.date_range("2019-11-24", periods=rounds, freq="min").astype(str),
        "item_id": rng.integers(ITEMS, size=rounds), "position": rng.integers(1, 4, size=rounds),
        "click": rng.integers(2, size=rounds), "propensity_score": np.full(rounds, 1 / ITEMS),
        **{f"user_feature_{i}": rng.choice([f"{i}a1b2", f"{i}c3d4", f"{i}e5f6"], size=rounds) for i in range(4)},
        **{f"user-item_affinity_{item}": rng.random(rounds) for item in range(ITEMS)}})
    (folder / behavior / campaign).mkdir(parents=True)
    frame.to_csv(folder / behavior / campaign / f"{campaign}.csv")
    return frame


def test_a_log_becomes_contexts_actions_positions_clicks_and_propensities(tmp_path):
    written = write_obd(tmp_path)
    log = obd.load(tmp_path, "men", "random")
    categories = sum(written[f"user_feature_{i}"].nunique() for i in range(4))
    assert log.contexts.shape == (30, categories + ITEMS) and log.num_items == ITEMS
    np.testing.assert_array_equal(log.contexts[:, :categories].sum(axis=1), 4)  # one category per feature
    np.testing.assert_array_equal(log.contexts[:, categories:], written.filter(like="affinity").to_numpy())
    np.testing.assert_array_equal(log.positions, written.position - 1)
    np.testing.assert_array_equal(log.rewards, written.click)


def test_a_missing_campaign_lists_those_found_and_another_layout_is_named(tmp_path):
    write_obd(tmp_path, campaign="men")
    write_obd(tmp_path, campaign="women")
    with pytest.raises(UserError, match="has no campaign 'all' for behavior 'random'; it has: men, women"):
        obd.load(tmp_path, "all", "random")
    (tmp_path / "random" / "men" / "men.csv").write_text(",item_id,click\n0,1,0\n")
    with pytest.raises(UserError, match="is not in the Open Bandit Dataset's layout: it lacks position"):
        obd.load(tmp_path, "men", "random")
    with pytest.raises(UserError, match="data.behavior must be one of random, bts"):
        obd.load(tmp_path, "men", "greedy")


def test_bernoulli_ts_positions_match_their_exact_values():
    """Three items: the chance of each ordering, P(X_first > X_second > X_third) for independent
    Beta samples, summed on a fine grid; an item's chance at a position sums the orderings."""
    alpha, beta = np.array([2.0, 5.0, 1.0]), np.array([5.0, 2.0, 1.0])
    estimated = obd.bernoulli_ts_positions(alpha, beta, draws=200_000, seed=0)
    grid = np.linspace(0.0005, 0.9995, 1000)
    masses = np.array([stats.beta.pdf(grid, a, b) for a, b in zip(alpha, beta)]) / 1000
    below = np.hstack([np.zeros((3, 1)), np.cumsum(masses, axis=1)[:, :-1]])  # P(X < grid point)
    exact = np.zeros((3, 3))
    for first, second, third in itertools.permutations(range(3)):
        second_above_third = np.concatenate([[0], np.cumsum(masses[second] * below[third])[:-1]])
        chance = np.sum(masses[first] * second_above_third)
        for position, item in enumerate((first, second, third)):
            exact[item, position] += chance
    np.testing.assert_allclose(estimated.sum(axis=0), 1.0)
    # 200,000 draws: each share's standard error is at most 0.0011.
    np.testing.assert_allclose(estimated, exact / exact.sum(axis=0), atol=0.006)
