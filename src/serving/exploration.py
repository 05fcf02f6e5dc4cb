"""Exploration at serving time, and the exact probability (propensity) of what it serves.

The service starts from the policy's own pick and its predicted reward of every movie:

  none     the policy's pick:                      p(a) = q(a)
  epsilon  uniform with probability epsilon,       p(a) = (1 - epsilon) q(a) + epsilon / n
           else the policy's pick:
  softmax  a draw from the predicted rewards s:    p(a) = exp(s_a / T) / sum_b exp(s_b / T)

where q is the distribution of the policy's own pick (`OwnPick`) over the n movies. For a
deterministic policy (LinUCB, any per-arm policy, which serves the best predicted movie) q is
one-hot, so epsilon gives 1 - epsilon + epsilon / n to its pick and epsilon / n to the others.
A policy that explores by itself in a known way (epsilon-greedy, Boltzmann, the random agent)
has the q its agent module states (`action_probabilities`, the propensities training logs).
Thompson-style policies (LinTS, dropout TS) and NeuralLinUCB while its encoder trains draw
inside the SavedModel with no closed form: q is estimated by Monte Carlo, from `draws` more
decisions for the same user in the same call, each movie's share of them with the served
draw counted among them, q(a) = (1{a = pick} + #{redraws = a}) / (draws + 1), as training's logs
estimate it (src.agents.monte_carlo): the pick's is never 0, and its standard error is
sqrt(q (1 - q) / draws) (about 0.05 at q = 0.5 and 100 draws). With draws = 0 it is unknown,
and so is p under none and epsilon (NaN). Softmax ignores the pick and is exact whenever the
scores themselves are not drawn (dropout TS's are: NaN). A policy without scores (the random
agent) is served uniformly under softmax, p = 1/n.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np

MODES = ("none", "epsilon", "softmax")
MOST_DRAWS = 1000  # Monte-Carlo redraws a request may ask of a policy that draws its pick
# Users a policy decides for twice to see whether it draws its picks or scores.
PROBE_USERS = 200


def epsilon_probabilities(own: np.ndarray, epsilon: float) -> np.ndarray:
    """p(a) = (1 - epsilon) q(a) + epsilon / n, for the policy's own distribution q = `own`."""
    return (1 - epsilon) * own + epsilon / len(own)


def softmax_probabilities(scores: np.ndarray, temperature: float) -> np.ndarray:
    """exp(s_a / T) / sum_b exp(s_b / T), shifted by the best score so that no term overflows."""
    logits = (np.asarray(scores, np.float64) - np.max(scores)) / temperature
    weights = np.exp(logits)
    return weights / weights.sum()


@dataclass(frozen=True)
class OwnPick:
    """How a loaded policy's own pick is distributed (`q` above)."""

    deterministic: bool  # the pick is a function of the observation
    scores_drawn: bool  # its predicted rewards are themselves a random draw (dropout TS)
    # (pick, scores) -> q over the movies, for a policy that explores in a known way
    known: Callable[[int, np.ndarray | None], np.ndarray] | None = None

    @property
    def drawn(self) -> bool:
        """The pick is a draw whose distribution is not stated: Monte-Carlo redraws estimate it."""
        return not self.deterministic and self.known is None

    def probabilities(self, pick: int, scores: np.ndarray | None, n: int,
                      redraws: np.ndarray | None = None) -> np.ndarray | None:
        """q for this request (with `redraws` of a drawn pick, its Monte-Carlo estimate); None when unknown."""
        if self.known is not None:
            return self.known(pick, scores)
        if not self.deterministic:
            if redraws is None or not len(redraws):
                return None
            return np.bincount(np.append(redraws, pick), minlength=n)[:n] / (len(redraws) + 1)
        q = np.zeros(n)
        q[pick] = 1.0
        return q


def own_pick(agent_cfg, policy, catalogue) -> OwnPick:
    """`OwnPick` of a loaded `policy` trained as `agent_cfg` (the run's `agent` config), probed by
    deciding for the catalogue's first users twice: a policy that gives the same picks and scores
    both times is taken as deterministic (a draw with any real randomness differs on some of 200
    users)."""
    from src.agents import action_probabilities  # TensorFlow: loaded with the policy anyway

    users = catalogue.user_features[:PROBE_USERS]
    (picks, scores), (again, scores_again) = policy.decide(users, catalogue), policy.decide(users, catalogue)
    scores_drawn = scores is not None and not np.array_equal(scores, scores_again)
    # A pick made from drawn scores is a draw too, even where 200 users happened not to show it.
    deterministic = bool(np.array_equal(picks, again)) and not scores_drawn
    n = len(catalogue.movie_ids)
    # A per-arm policy serves the best predicted movie, whatever its agent does in training.
    stated = None if policy.per_arm else action_probabilities(agent_cfg, n)
    if stated is None or deterministic:
        return OwnPick(deterministic, scores_drawn)

    def known(pick: int, scores: np.ndarray | None) -> np.ndarray:
        step = SimpleNamespace(action=np.array([pick]),
                               info=SimpleNamespace(predicted_rewards_mean=None if scores is None else scores[None]))
        return np.asarray(stated(step), np.float64)[0]

    return OwnPick(False, scores_drawn, known)


@dataclass
class Explorer:
    """Chooses the served movie by `mode` (one of MODES) from a seeded generator; thread-safe."""

    mode: str
    epsilon: float
    temperature: float
    seed: int
    draws: int = 0  # Monte-Carlo redraws of a pick that is drawn (`OwnPick.drawn`), for its propensity
    _rng: np.random.Generator = field(init=False, repr=False)
    _lock: threading.Lock = field(init=False, repr=False, default_factory=threading.Lock)

    def __post_init__(self):
        self._rng = np.random.default_rng(self.seed)

    def redraws_for(self, own: OwnPick) -> int:
        """How many more decisions for the same user the request needs: `draws` where the pick is
        a draw of unstated distribution and the mode serves by it; else none."""
        return self.draws if own.drawn and self.mode != "softmax" else 0

    def choose(self, pick: int, scores: np.ndarray | None, own: OwnPick, n: int,
               redraws: np.ndarray | None = None) -> tuple[int, float]:
        """The served column of the catalogue and its propensity (NaN: unknown), the policy's own
        pick's distribution estimated from `redraws` where it draws (`redraws_for`)."""
        with self._lock:
            if self.mode == "softmax":
                return self._softmax(scores, own, n)
            explores = self.mode == "epsilon" and self._rng.random() < self.epsilon
            action = int(self._rng.integers(n)) if explores else int(pick)
        q = own.probabilities(pick, scores, n, redraws)
        if q is None:
            return action, float("nan")
        p = epsilon_probabilities(q, self.epsilon) if self.mode == "epsilon" else q
        return action, float(p[action])

    def _softmax(self, scores: np.ndarray | None, own: OwnPick, n: int) -> tuple[int, float]:
        p = np.full(n, 1 / n) if scores is None else softmax_probabilities(scores, self.temperature)
        action = int(self._rng.choice(n, p=p))
        return action, float("nan") if own.scores_drawn else float(p[action])

    def slate(self, action: int, scores: np.ndarray | None, k: int, n: int) -> tuple[int, ...]:
        """`k` columns best first: the served `action`, then the best predicted of the others (without
        scores, a uniform draw of them). Only the first movie's propensity is logged."""
        if scores is None:
            with self._lock:
                order = self._rng.permutation(n)
        else:
            order = np.argsort(-np.asarray(scores), kind="stable")
        others = [int(column) for column in order if column != action]
        return (int(action), *others[:k - 1])
