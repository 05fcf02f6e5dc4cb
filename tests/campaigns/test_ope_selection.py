"""Off-policy selection: the rank correlation between the trials' estimates and true values,
and the regret of the chosen trial (an offline sweep's end to end is in
tests/evaluation/test_offline.py)."""

from __future__ import annotations

import pytest

from src.campaigns.selection import selection


def test_the_rank_correlation_and_the_regret_of_the_chosen_trial():
    # The estimate picks trial 3 (0.9), truly second best; one swapped pair in the ranks:
    # Spearman 1 - 6 * (1 + 1) / (4 * (16 - 1)) = 0.8.
    found = selection([0.1, 0.5, 0.3, 0.9], [1.0, 3.0, 2.0, 2.5], chosen=3)
    assert found.trials == 4
    assert found.spearman == pytest.approx(0.8)
    assert (found.chosen, found.best, found.regret) == (2.5, 3.0, 0.5)
    assert found.line("ope/dr") == ("off-policy selection: Spearman 0.80 between ope/dr and the true value over 4 "
                                    "trials; the chosen trial's true value 2.5 is 0.5 below the best trial's (3)")


def test_an_estimate_that_ranks_the_trials_backwards():
    found = selection([3.0, 2.0, 1.0], [10.0, 20.0, 30.0], chosen=0)
    assert found.spearman == pytest.approx(-1.0)
    assert found.regret == 20.0


def test_a_chosen_trial_with_the_best_true_value_gives_nothing_up():
    found = selection([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], chosen=2)
    assert found.spearman == pytest.approx(1.0) and found.regret == 0
    assert found.line("ope/snipw").endswith("the chosen trial has the best true value (3)")


def test_fewer_than_three_trials_give_no_correlation():
    found = selection([1.0, 2.0], [2.0, 1.0], chosen=1)
    assert found.spearman is None and found.regret == 1.0
    line = found.line("ope/dr")
    assert "too few trials with ope/dr and the true value for a rank correlation (2, at least 3)" in line


def test_equal_true_values_give_no_correlation():
    # LinUCB's trials may all learn the same greedy policy: no ranks to compare, not a NaN.
    found = selection([1.0, 2.0, 3.0], [4.0, 4.0, 4.0], chosen=2)
    assert found.spearman is None and found.regret == 0
    assert "no rank correlation over 3 trials" in found.line("ope/dr")


def test_a_chosen_trial_without_a_true_value_has_no_regret():
    found = selection([1.0, 2.0, 3.0], [1.0, 3.0, 2.0], chosen=None)
    assert found.spearman == pytest.approx(0.5) and found.regret is None
    assert found.line("ope/dr").endswith("the chosen trial's run logged no true value")
