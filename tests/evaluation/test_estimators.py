"""The estimators against exact values and closed forms, their bootstrap, their registry and
configuration, and a worked example of adding one."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

import numpy as np
import pytest
from omegaconf import OmegaConf

from src import config, evaluate
from src.errors import UserError
from src.evaluation import estimators, interactions, intervals
from src.evaluation.estimators import ESTIMATORS

# A tiny environment with exact values: 4 users (contexts), 3 movies.
REWARDS = np.array([[1.0, 2.0, 3.0], [4.0, 0.0, 1.0], [2.0, 2.0, 5.0], [0.0, 3.0, 1.0]])
TARGET = np.array([2, 0, 2, 1])  # a deterministic target policy: its movie for each user
TRUE_VALUE = REWARDS[np.arange(4), TARGET].mean()


def logged(rng, rounds: int, logging_probabilities: np.ndarray) -> tuple[estimators.Feedback, np.ndarray]:
    """Rounds of uniformly drawn users, each acted on by the logging distribution of its user."""
    users = rng.integers(4, size=rounds)
    cumulative = logging_probabilities[users].cumsum(axis=1)
    actions = (rng.random((rounds, 1)) > cumulative).sum(axis=1)
    feedback = estimators.Feedback(np.eye(4)[users], actions, REWARDS[users, actions],
                                   logging_probabilities[users, actions])
    return feedback, users


def target_terms(feedback, users, reward_estimates) -> estimators.Terms:
    return estimators.terms(feedback, np.eye(3)[TARGET[users]], reward_estimates[users])


def estimate(name: str, t: estimators.Terms, **hyperparameters) -> float:
    return ESTIMATORS[name](**hyperparameters).for_actions(3).estimate(t)


def mean_over_seeds(name: str, logging_probabilities, reward_estimates, seeds: int = 2000, rounds: int = 50):
    values = []
    for seed in range(seeds):
        feedback, users = logged(np.random.default_rng(seed), rounds, logging_probabilities)
        values.append(estimate(name, target_terms(feedback, users, reward_estimates)))
    return np.mean(values), np.std(values) / np.sqrt(seeds)


UNIFORM = np.full((4, 3), 1 / 3)
SKEWED = np.array([[0.8, 0.1, 0.1], [0.1, 0.1, 0.8], [0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
WRONG_MODEL = np.full((4, 3), 2.0)  # a reward model far from the truth


@pytest.mark.parametrize("name, logging_probabilities, reward_estimates", [
    ("ipw", UNIFORM, WRONG_MODEL),
    ("ipw", SKEWED, WRONG_MODEL),
    ("dr", SKEWED, WRONG_MODEL),  # unbiased whatever the reward model, given true propensities
])
def test_importance_weighted_estimators_are_unbiased(name, logging_probabilities, reward_estimates):
    mean, standard_error = mean_over_seeds(name, logging_probabilities, reward_estimates)
    assert abs(mean - TRUE_VALUE) < 4 * standard_error
    # ... while the wrong model alone is off by far more than that
    assert abs(mean_over_seeds("dm", logging_probabilities, reward_estimates)[0] - TRUE_VALUE) > 0.2


def test_dm_and_dr_equal_the_truth_when_the_reward_model_is_exact():
    # Every user once: the logged contexts are the population, so the exact model gives the true value.
    feedback = estimators.Feedback(np.eye(4), np.array([0, 1, 2, 0]), REWARDS[np.arange(4), [0, 1, 2, 0]],
                                   np.full(4, 1 / 3))
    t = target_terms(feedback, np.arange(4), REWARDS)
    assert estimate("dm", t) == pytest.approx(TRUE_VALUE)
    assert estimate("dr", t) == pytest.approx(TRUE_VALUE)


def test_the_fitted_reward_model_recovers_linear_rewards():
    rng = np.random.default_rng(0)
    contexts = rng.normal(size=(600, 5))
    weights = rng.normal(size=(4, 5))
    actions = rng.integers(4, size=600)
    rewards = np.einsum("nd,nd->n", contexts, weights[actions]) + 3.0
    feedback = estimators.Feedback(contexts, actions, rewards, np.full(600, 0.25))
    coefficients = estimators.fit_reward_model(feedback, 4, ridge=1e-6)
    np.testing.assert_allclose(estimators.predict_rewards(coefficients, contexts), contexts @ weights.T + 3.0,
                               atol=1e-4)


def test_closed_forms_of_snipw_and_switch_dr():
    t = estimators.Terms(dm=np.array([1.0, 2.0]), weights=np.array([0.5, 4.0]), rewards=np.array([2.0, 1.0]),
                         residuals=np.array([1.0, -1.0]), max_weights=np.array([1.0, 4.0]), reward_model_range=(0, 2))
    assert estimate("snipw", t) == pytest.approx((0.5 * 2 + 4 * 1) / 4.5)
    assert estimate("switch_dr", t, tau=np.inf) == pytest.approx(estimate("dr", t))
    assert estimate("switch_dr", t, tau=1.0) == pytest.approx((1.0 + 0.5 * 1.0 + 2.0) / 2)
    assert estimate("switch_dr", t, tau=0.1) == pytest.approx(estimate("dm", t))


def test_switch_dr_falls_back_above_the_number_of_actions_unless_told_otherwise():
    assert estimators.SwitchDoublyRobust().for_actions(7).tau == 7
    assert estimators.SwitchDoublyRobust(tau=2.5).for_actions(7).tau == 2.5


def bootstrap(chosen, t, samples, confidence, seed):
    return intervals.estimate_all(chosen, t, "bootstrap", confidence, reward_range=(0.0, 5.0), samples=samples,
                                  seed=seed)


def test_the_bootstrap_interval_brackets_the_estimate_and_narrows_with_more_rounds():
    chosen = estimators.configured(ESTIMATORS, {"switch_dr": {"tau": 10.0}, "dr_os": {"lambda_": 9.0}},
                                   "estimator_params")
    widths = []
    for rounds in (100, 1600):
        feedback, users = logged(np.random.default_rng(1), rounds, SKEWED)
        table = bootstrap(chosen, target_terms(feedback, users, 0.5 * REWARDS), 200, 0.95, 0)
        assert (table.ci_low <= table.estimate).all() and (table.estimate <= table.ci_high).all()
        widths.append((table.ci_high - table.ci_low).to_numpy())
    # Sixteen times the rounds: about a quarter of the width.
    assert (widths[1] < 0.5 * widths[0]).all()


def test_the_bootstrap_draws_the_same_resamples_as_ever():
    # Values from before the estimators were classes: an interval must not move when code does.
    feedback, users = logged(np.random.default_rng(1), 100, SKEWED)
    chosen = estimators.configured(["dm", "ipw", "snipw", "dr", "switch_dr"], {"switch_dr": {"tau": 7}},
                                   "estimator_params")
    table = bootstrap(chosen, target_terms(feedback, users, 0.5 * REWARDS), 50, 0.9, 0)
    expected = {"dm": (1.86, 1.7895, 1.9355), "ipw": (2.2, 0.7225, 3.6525),
                "snipw": (3.6666666666666665, 3.2857142857142856, 3.9126923076923075),
                "dr": (2.96, 2.22875, 3.63975), "switch_dr": (2.01, 1.81725, 2.167)}
    assert list(table.estimator) == list(expected)
    np.testing.assert_allclose(table[["estimate", "ci_low", "ci_high"]].to_numpy(), list(expected.values()),
                               rtol=1e-12)


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_each_estimator_declares_whether_it_needs_propensities(name):
    """What it declares is what it does: an estimator that needs none gives the same value with
    the propensities unknown, and only those that need them refuse logs without them."""
    # Uniform logging: every weight of the target's picks is the number of movies, within
    # Switch-DR's default threshold, so that it weights them.
    feedback, users = logged(np.random.default_rng(2), 200, UNIFORM)
    unknown = estimators.Feedback(feedback.contexts, feedback.actions, feedback.rewards,
                                  np.full(len(feedback), np.nan))
    exact, without = (estimate(name, target_terms(f, users, WRONG_MODEL)) for f in (feedback, unknown))
    assert ESTIMATORS[name].needs_propensities == (exact != without)
    if ESTIMATORS[name].needs_propensities:
        with pytest.raises(UserError, match=f"have no propensities: agent=linucb .* so {name} cannot"):
            interactions.check_propensities(unknown, [name], "abc", "linucb")
    else:
        interactions.check_propensities(unknown, [name], "abc", "linucb")


def test_conf_offers_every_estimator_with_its_defaults():
    # A sequence default is a tuple in the (frozen, hashable) dataclass, a list in YAML.
    defaults = {name: {field.name: list(field.default) if isinstance(field.default, tuple) else field.default
                       for field in fields(estimator)}
                for name, estimator in ESTIMATORS.items() if fields(estimator)}
    evaluation = evaluate.parse(["target_run_id=x", "logs_run_id=y"])
    assert evaluation.estimators is None  # every registered one for the logs' kind unless told
    assert evaluate.names_for(evaluation, ESTIMATORS, "logged movies") == list(ESTIMATORS)
    assert OmegaConf.to_container(evaluation.estimator_params) == defaults
    assert OmegaConf.to_container(config.compose().offline.estimator_params) == defaults


@pytest.mark.parametrize("params, message", [
    ({"switch_dr": {"tau": -1}}, "estimator_params.switch_dr.tau must be > 0, or null for the number of actions"),
    ({"switch_dr": {"tau": "abc"}}, "estimator_params.switch_dr.tau must be > 0"),
    ({"switch_dr": {"lambda_": 3}}, "estimator_params.switch_dr.lambda_: switch_dr has no such hyperparameter; "
                                    "it has tau"),
    ({"dm": {"tau": 3}}, "estimator_params.dm.tau: dm has no such hyperparameter; it has none"),
    ({"magic": {}}, "estimator_params.magic: no such estimator; choose from dm, ipw, snipw, dr, switch_dr"),
    ({"switch_dr": 3}, "estimator_params.switch_dr must be a mapping of hyperparameter to value"),
])
def test_a_bad_hyperparameter_is_one_line_naming_its_key(params, message):
    # Whether or not the estimator is asked for: a typo is refused, not ignored.
    with pytest.raises(UserError) as error:
        estimators.configured(["dm"], params, "estimator_params")
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


# Adding an estimator, as a newcomer would: the class below goes to src/evaluation/estimators.py,
# `clipped_ipw: {clip: 10.0}` to conf/estimator_params.yaml, and a test beside these. The
# command line, the offline objective (ope/clipped_ipw), src.metrics and the bootstrap all read
# the registry.
@pytest.fixture
def clipped_ipw(monkeypatch):
    monkeypatch.setattr(estimators, "ESTIMATORS", dict(ESTIMATORS))  # registered for one test only

    @estimators.register
    @dataclass(frozen=True)
    class ClippedInverseProbabilityWeighting(estimators.Estimator):
        """IPW with each weight clipped at `clip`: less variance, some bias."""

        name: ClassVar[str] = "clipped_ipw"
        clip: float = 10.0

        def per_round(self, t: estimators.Terms) -> np.ndarray:
            return np.minimum(t.weights, self.clip) * t.rewards

    return ClippedInverseProbabilityWeighting


def test_a_new_estimator_shares_the_bootstrap(clipped_ipw):
    feedback, users = logged(np.random.default_rng(1), 400, SKEWED)
    t = target_terms(feedback, users, 0.5 * REWARDS)
    chosen = estimators.configured(["ipw", "clipped_ipw"], {"clipped_ipw": {"clip": 2.0}}, "estimator_params")
    clipped = bootstrap(chosen, t, 100, 0.9, 0).set_index("estimator").loc["clipped_ipw"]
    assert clipped.estimate == pytest.approx(np.mean(np.minimum(t.weights, 2.0) * t.rewards))
    assert clipped.ci_low <= clipped.estimate <= clipped.ci_high
    # Unclipped it is IPW, interval and all: every estimator is drawn on the same resamples.
    table = bootstrap([estimators.InverseProbabilityWeighting(), clipped_ipw(clip=np.inf)], t, 100, 0.9, 0)
    assert (table.iloc[0, 1:] == table.iloc[1, 1:]).all()


def test_a_new_estimator_takes_its_hyperparameters_from_the_command_line(clipped_ipw):
    # `+`: only because this test cannot add clipped_ipw's defaults to conf/estimator_params.yaml.
    cfg = evaluate.parse(["target_run_id=x", "logs_run_id=y", "estimators=[dm,clipped_ipw]",
                          "+estimator_params.clipped_ipw.clip=2.5"])
    assert evaluate.chosen(cfg, cfg.estimators) == [estimators.DirectMethod(), clipped_ipw(clip=2.5)]
    assert estimators.needing_propensities(cfg.estimators) == ["clipped_ipw"]
    with pytest.raises(UserError, match="estimator_params.clipped_ipw.clop: clipped_ipw has no such hyperparameter"):
        evaluate.parse(["target_run_id=x", "logs_run_id=y", "+estimator_params.clipped_ipw.clop=2.5"])


# Self-normalised DR, DR with optimistic shrinkage, sub-Gaussian IPW and the tuned ones, each
# against its formula written out here (benchmarks/obp_crosscheck.py checks them against obp).
def random_log(seed: int = 0, rounds: int = 400, actions: int = 4):
    """The terms of a log of random propensities, rewards and a reward model off by 0.5 on average
    (so that the tuned ones trade DM's bias against DR's variance), for a target deterministic in
    half the rounds (so some weights are 0) and random in the others; and the weights, rewards,
    residuals and DM terms written out from the same arrays."""
    rng = np.random.default_rng(seed)
    logging_policy = rng.dirichlet(np.ones(actions), size=rounds)
    chosen = np.array([rng.choice(actions, p=p) for p in logging_policy])
    target = rng.dirichlet(np.full(actions, 0.5), size=rounds)
    target[: rounds // 2] = np.eye(actions)[rng.integers(actions, size=rounds // 2)]
    rewards, model = rng.normal(2, 1, rounds), rng.normal(2.5, 0.5, (rounds, actions))
    each = np.arange(rounds)
    propensities = logging_policy[each, chosen]
    t = estimators.terms(estimators.Feedback(np.zeros((rounds, 1)), chosen, rewards, propensities), target, model)
    w = target[each, chosen] / propensities
    return t, w, rewards, rewards - model[each, chosen], (target * model).sum(axis=1)


def test_self_normalised_dr_and_its_linearisation():
    t, w, _, residuals, dm = random_log()
    value = dm.mean() + (w * residuals).sum() / w.sum()
    assert estimate("sndr", t) == pytest.approx(value, rel=1e-12)
    assert estimate("sndr", t) == pytest.approx(np.mean(dm + w * residuals / w.mean()), rel=1e-12)  # obp's form
    # The delta method's: the value plus each round's pull on the ratio sum(w res) / sum(w).
    ratio = value - dm.mean()
    np.testing.assert_allclose(ESTIMATORS["sndr"]().per_round(t), value + dm - dm.mean() + w * (residuals - ratio)
                               / w.mean(), rtol=1e-12)


@pytest.mark.parametrize("lambda_", [0.5, 4.0, 100.0])
def test_dr_with_optimistic_shrinkage(lambda_):
    t, w, _, residuals, dm = random_log()
    assert estimate("dr_os", t, lambda_=lambda_) == pytest.approx(np.mean(dm + lambda_ * w / (w**2 + lambda_)
                                                                          * residuals), rel=1e-12)


def test_dr_with_optimistic_shrinkage_spans_dm_to_dr():
    t, w, *_ = random_log()
    assert (w == 0).any()  # where the formula is 0 / 0 at λ = 0
    assert estimate("dr_os", t, lambda_=np.inf) == estimate("dr", t)
    assert estimate("dr_os", t, lambda_=0.0) == estimate("dm", t)
    # Unset, λ is the number of actions squared: a weight of the number of actions is halved.
    assert estimators.DoublyRobustWithShrinkage().for_actions(7).lambda_ == 49
    assert estimators.DoublyRobustWithShrinkage(lambda_=2.0).for_actions(7).lambda_ == 2.0


@pytest.mark.parametrize("lambda_", [0.0, 0.3, 1.0])
def test_sub_gaussian_ipw(lambda_):
    t, w, rewards, *_ = random_log()
    shrunk = np.where(w == 0, 0.0, w / np.where(w == 0, 1.0, 1 - lambda_ + lambda_ * w))
    assert estimate("sg_ipw", t, lambda_=lambda_) == pytest.approx(np.mean(shrunk * rewards), rel=1e-12)
    assert estimate("sg_ipw", t) == estimate("ipw", t)  # the default, λ = 0
    # λ = 1: every round the target can pick counts once, whatever its weight.
    assert estimate("sg_ipw", t, lambda_=1.0) == pytest.approx(np.mean((w > 0) * rewards), rel=1e-12)


@pytest.mark.parametrize("name", ["switch_dr_tuned", "dr_os_tuned"])
@pytest.mark.parametrize("rule", ["slope", "mse"])
def test_a_tuned_estimator_is_the_fixed_one_at_the_candidate_its_rule_chooses(name, rule):
    from scipy import stats

    t, w, _, residuals, _ = random_log()
    tuned = ESTIMATORS[name](rule=rule)
    choice = tuned.selected(t)
    assert choice in tuned.candidates
    assert tuned.estimate(t) == tuned.at(choice).estimate(t)
    np.testing.assert_array_equal(tuned.per_round(t), tuned.at(choice).per_round(t))
    n = len(w)
    terms = {value: tuned.at(value).per_round(t) for value in tuned.candidates}
    if rule == "mse":
        # Variance over n plus the square of the bias's high-probability bound, at delta 0.1.
        slack = np.sqrt(2 * np.mean(w**2) * np.log(20) / n) + 2 * w.max() * np.log(20) / (3 * n)
        scores = {value: np.var(x) / n + (abs(np.mean(w * residuals + t.dm - x)) + slack) ** 2
                  for value, x in terms.items()}
        assert scores[choice] == pytest.approx(min(scores.values()), rel=1e-12)
    else:
        # From the widest 90% t-interval down, every estimate up to the choice is within reach of
        # every wider one's, and the next one is not.
        width = {value: stats.t.ppf(0.9, n - 1) * x.std(ddof=1) / np.sqrt(n) for value, x in terms.items()}
        widest_first = sorted(tuned.candidates, key=width.get, reverse=True)

        def within_reach(k: int) -> bool:
            value = widest_first[k]
            return all(abs(terms[wider].mean() - terms[value].mean()) <= width[value] + (np.sqrt(6) - 1) * width[wider]
                       for wider in widest_first[:k])

        chosen_rank = max(k for k, value in enumerate(widest_first) if terms[value].mean() == terms[choice].mean())
        assert all(within_reach(k) for k in range(chosen_rank + 1))
        assert chosen_rank == len(widest_first) - 1 or not within_reach(chosen_rank + 1)


def test_a_tuned_estimator_chooses_again_on_each_resample():
    t, *_ = random_log()
    tuned = estimators.DoublyRobustWithShrinkageTuned()
    choices = set()
    for seed in range(20):
        resample = t.take(np.random.default_rng(seed).integers(len(t.rewards), size=len(t.rewards)))
        choices.add(tuned.selected(resample))
        assert tuned.estimate(resample) == tuned.at(tuned.selected(resample)).estimate(resample)
    assert len(choices) > 1


def test_tuned_candidates_from_hydra_are_a_tuple():
    params = OmegaConf.create({"switch_dr_tuned": {"candidates": [1, 5.5], "rule": "mse"}})
    (tuned,) = estimators.configured(["switch_dr_tuned"], params, "estimator_params")
    assert tuned == estimators.SwitchDoublyRobustTuned(candidates=(1, 5.5), rule="mse")
    assert hash(tuned) == hash(estimators.SwitchDoublyRobustTuned(candidates=(1, 5.5), rule="mse"))


@pytest.mark.parametrize("params, message", [
    ({"dr_os": {"lambda_": -1}}, "estimator_params.dr_os.lambda_ must be >= 0 (.inf: DR, 0: DM), or null"),
    ({"dr_os": {"lambda_": float("nan")}}, "estimator_params.dr_os.lambda_ must be >= 0"),
    ({"sg_ipw": {"lambda_": 1.5}}, "estimator_params.sg_ipw.lambda_ must be in [0, 1] (0: IPW), got 1.5"),
    ({"sg_ipw": {"lambda_": None}}, "estimator_params.sg_ipw.lambda_ must be in [0, 1]"),
    ({"switch_dr_tuned": {"candidates": []}},
     "estimator_params.switch_dr_tuned.candidates must be a non-empty list of values of tau > 0, got []"),
    ({"switch_dr_tuned": {"candidates": [1, 0]}}, "estimator_params.switch_dr_tuned.candidates must be"),
    ({"switch_dr_tuned": {"candidates": [1, None]}}, "estimator_params.switch_dr_tuned.candidates must be"),
    ({"dr_os_tuned": {"candidates": 5}}, "estimator_params.dr_os_tuned.candidates must be a non-empty list of "
                                         "values of lambda_ >= 0 (.inf: DR), got 5"),
    ({"dr_os_tuned": {"candidates": [1, -4]}}, "estimator_params.dr_os_tuned.candidates must be"),
    ({"dr_os_tuned": {"rule": "aic"}}, "estimator_params.dr_os_tuned.rule must be slope or mse, got 'aic'"),
    ({"dr_os_tuned": {"tau": 3}}, "estimator_params.dr_os_tuned.tau: dr_os_tuned has no such hyperparameter; "
                                  "it has candidates, rule"),
])
def test_a_bad_hyperparameter_of_the_new_estimators_is_refused_naming_its_key(params, message):
    with pytest.raises(UserError) as error:
        estimators.configured(["dm"], params, "estimator_params")
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_the_mean_of_the_per_round_terms_is_the_estimate(name):
    # For a ratio estimator the terms are its linearisation, whose mean is the estimate too.
    t, *_ = random_log(seed=5)
    estimator = ESTIMATORS[name]().for_actions(4)
    assert np.mean(estimator.per_round(t)) == pytest.approx(estimator.estimate(t), rel=1e-12)
