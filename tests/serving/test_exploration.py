"""Exploration at serving time (src.serving.exploration): the propensity formulas, the draws
they describe, and how each agent's own pick is classified on a real saved policy."""

from __future__ import annotations

import math

import numpy as np
import pytest

from src.serving.exploration import Explorer, OwnPick, epsilon_probabilities, softmax_probabilities
from src.serving.service import ModelSource
from tests.serving.trained import train_with_policy

N = 10
DETERMINISTIC = OwnPick(deterministic=True, scores_drawn=False)
UNKNOWN = OwnPick(deterministic=False, scores_drawn=False)
SCORES = np.linspace(1.0, 5.0, N)


def within(share: float, p: float, draws: int, sd: float = 5.0) -> bool:
    """A sampled share agrees with probability p to `sd` binomial standard deviations."""
    return abs(share - p) <= sd * math.sqrt(p * (1 - p) / draws)


def test_epsilon_gives_the_pick_one_minus_epsilon_plus_epsilon_over_n():
    p = epsilon_probabilities(np.eye(N)[3], 0.2)
    assert p[3] == pytest.approx(1 - 0.2 + 0.2 / N)
    assert np.delete(p, 3) == pytest.approx(np.full(N - 1, 0.2 / N))
    # Over a policy exploring by itself (epsilon-greedy at 0.3 around movie 3): the mixture.
    own = 0.7 * np.eye(N)[3] + 0.3 / N
    assert epsilon_probabilities(own, 0.2) == pytest.approx(0.8 * own + 0.02)
    assert epsilon_probabilities(own, 0.2).sum() == pytest.approx(1)


def test_softmax_is_the_closed_form_and_never_overflows():
    expected = np.exp(SCORES / 0.5) / np.exp(SCORES / 0.5).sum()
    assert softmax_probabilities(SCORES, 0.5) == pytest.approx(expected)
    huge = softmax_probabilities(np.array([1e6, 1e6 - 1, 0.0]), 0.01)
    assert np.isfinite(huge).all() and huge[0] == pytest.approx(1)


@pytest.mark.parametrize("epsilon", [0.0, 0.1, 0.5, 1.0])
def test_epsilon_draws_match_their_propensities(epsilon):
    explorer = Explorer("epsilon", epsilon, 1.0, seed=1)
    draws = 20_000
    served = [explorer.choose(4, SCORES, DETERMINISTIC, N) for _ in range(draws)]
    actions = np.array([action for action, _ in served])
    for action, propensity in served[:200]:
        assert propensity == pytest.approx(1 - epsilon + epsilon / N if action == 4 else epsilon / N)
    greedy = 1 - epsilon + epsilon / N
    assert within(np.mean(actions == 4), greedy, draws)
    assert within(np.mean(actions == 0), epsilon / N, draws)


def test_softmax_draws_match_their_propensities():
    explorer = Explorer("softmax", 0.1, 1.0, seed=2)
    draws = 20_000
    served = [explorer.choose(0, SCORES, UNKNOWN, N) for _ in range(draws)]
    p = softmax_probabilities(SCORES, 1.0)
    shares = np.bincount([action for action, _ in served], minlength=N) / draws
    assert all(within(share, probability, draws) for share, probability in zip(shares, p))
    assert all(propensity == pytest.approx(p[action]) for action, propensity in served[:200])


def test_unknown_own_picks_and_drawn_scores_log_nan_and_no_scores_serve_uniformly():
    assert math.isnan(Explorer("none", 0.1, 1.0, 0).choose(2, SCORES, UNKNOWN, N)[1])
    assert math.isnan(Explorer("epsilon", 0.1, 1.0, 0).choose(2, SCORES, UNKNOWN, N)[1])
    drawn = OwnPick(deterministic=False, scores_drawn=True)
    assert math.isnan(Explorer("softmax", 0.1, 1.0, 0).choose(2, SCORES, drawn, N)[1])
    assert Explorer("none", 0.1, 1.0, 0).choose(2, SCORES, DETERMINISTIC, N) == (2, 1.0)
    action, propensity = Explorer("softmax", 0.1, 1.0, 0).choose(2, None, UNKNOWN, N)
    assert propensity == pytest.approx(1 / N)


def test_a_drawn_picks_propensity_is_its_share_of_the_redraws():
    drawn = OwnPick(deterministic=False, scores_drawn=False)
    explorer = Explorer("epsilon", 0.2, 1.0, 0, draws=9)
    assert explorer.redraws_for(drawn) == 9 and explorer.redraws_for(DETERMINISTIC) == 0
    assert Explorer("softmax", 0.2, 1.0, 0, draws=9).redraws_for(drawn) == 0
    redraws = np.array([2, 2, 2, 5, 5, 7, 2, 2, 5])  # with the pick, 2: 6 of 10 draws, 5: 3, 7: 1
    q = drawn.probabilities(2, SCORES, N, redraws)
    assert q == pytest.approx(np.bincount([2] * 6 + [5] * 3 + [7], minlength=N) / 10)
    for _ in range(50):
        action, propensity = explorer.choose(2, SCORES, drawn, N, redraws)
        assert propensity == pytest.approx(0.8 * q[action] + 0.2 / N)


def test_the_same_seed_serves_the_same_movies():
    def served(seed):
        explorer = Explorer("epsilon", 0.5, 1.0, seed)
        return [explorer.choose(1, SCORES, DETERMINISTIC, N) for _ in range(100)]

    assert served(7) == served(7) != served(8)


def test_a_slate_starts_with_the_served_movie_then_the_best_predicted():
    explorer = Explorer("epsilon", 0.1, 1.0, 0)
    assert explorer.slate(2, SCORES, 4, N) == (2, 9, 8, 7)
    assert explorer.slate(9, SCORES, 3, N) == (9, 8, 7)
    unscored = explorer.slate(2, None, N, N)
    assert unscored[0] == 2 and sorted(unscored) == list(range(N))


@pytest.mark.parametrize("agent, deterministic, known, scores_drawn", [
    ("linucb", True, False, False),  # deterministic given its statistics
    ("lints", False, False, False),  # Thompson sampling: draws inside the SavedModel, no closed form
    ("dropout_ts", False, False, True),  # its predicted rewards are a draw (dropout at inference)
    ("epsilon_greedy", False, True, False),  # its own epsilon, stated by src.agents.epsilon_greedy
    ("random", False, True, False),  # uniform: 1/n
])
def test_each_agents_own_pick_is_classified_on_its_saved_policy(make_config, monkeypatch, tracking_uri,
                                                                 agent, deterministic, known, scores_drawn):
    run_id, _, _ = train_with_policy(make_config, monkeypatch, f"agent={agent}")
    model = ModelSource(f"runs:/{run_id}/model").load(None)
    assert (model.own.deterministic, model.own.known is not None, model.own.scores_drawn) == \
        (deterministic, known, scores_drawn)
    assert model.version == run_id
    users = model.catalogue.user_features[:3]
    picks, scores = model.policy.decide(users, model.catalogue)
    q = model.own.probabilities(int(picks[0]), None if scores is None else scores[0], model.size)
    if agent == "random":
        assert q == pytest.approx(np.full(model.size, 1 / model.size))
    elif agent == "epsilon_greedy":
        greedy = int(np.argmax(scores[0]))
        assert q[greedy] == pytest.approx(1 - 0.05 + 0.05 / model.size)  # conf/agent/epsilon_greedy.yaml
    assert (q is None) == (not deterministic and not known)
    if model.own.drawn:  # estimated from redraws for the same user, as the service asks for them
        draws = Explorer("epsilon", 0.1, 1.0, 0, draws=400).redraws_for(model.own)
        picks, _ = model.policy.decide(np.repeat(users[:1], 1 + draws, axis=0), model.catalogue)
        q = model.own.probabilities(int(picks[0]), None, model.size, picks[1:])
        assert q.sum() == pytest.approx(1) and q[picks[0]] >= 1 / (draws + 1)
        # Against the shares of 4,000 more independent draws: within 5 standard errors of the estimate's.
        shares = np.bincount(model.policy.decide(np.repeat(users[:1], 4000, axis=0), model.catalogue)[0],
                             minlength=model.size) / 4000
        assert all(abs(estimate - share) <= 5 * math.sqrt(share * (1 - share) / draws) + 1 / (draws + 1)
                   for estimate, share in zip(q, shares))
