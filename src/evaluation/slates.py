"""Off-policy estimators of a slate policy's value from logged slates with a reward per slot.

With n logged rounds (x_i, s_i, r_i): a context, a slate s_i = (s_i1, ..., s_iK) of K distinct
candidates out of N, and a reward r_ik for each position k; for a policy p three probabilities
of the logged slate: the whole slate p(s_i | x_i), the position marginal p_k(s_ik | x_i) (the
chance s_ik is shown at k, whatever else is shown) and the prefix p(s_i1, ..., s_ik | x_i).
With mu the logging policy, pi the target, w_i = pi(s_i | x_i) / mu(s_i | x_i), w_ik the ratio
of the position marginals and w_i,1:k that of the prefixes (w_i,1:0 = 1), the value of pi,
E_pi[sum_k r_k], is estimated as the mean over rounds of

  sips        w_i sum_k r_ik                                  (standard IPS)
  iips        sum_k w_ik r_ik                                 (independent IPS; Li et al., WSDM 2018)
  rips        sum_k w_i,1:k r_ik                              (reward-interaction IPS; McInerney et
                                                               al., KDD 2020)
  cascade_dr  sum_k w_i,1:k (r_ik - q_k(x_i, s_i,1:k))        (Cascade-DR; Kiyohara, Saito, Matsuhiro,
              + w_i,1:k-1 sum_a pi(a | x_i, s_i,1:k-1)         Narita, Shimizu, Yamamoto, WSDM 2022)
                q_k(x_i, s_i,1:k-1, a)
  pi          (sum_k w_ik - K + 1) sum_k r_ik                 (pseudo-inverse; Swaminathan et al.,
                                                               NeurIPS 2017, for a factorised logger)

sips, iips, rips and cascade_dr as Open Bandit Pipeline 0.5.7's `obp.ope.estimators_slate`
(benchmarks/obp_slate_crosscheck.py checks them against it); obp has no pi. Given the logging
policy's true probabilities and a target that shows nothing the logger cannot, each is unbiased
when E[r_k | x, s], the expected reward at position k, is
  sips        anything;
  iips        a function of (x, k, s_k) alone (the item-position model: no position sees another);
  rips, cascade_dr   a function of (x, s_1..s_k) alone (the cascade: a position sees those above
              it); cascade_dr whatever the model q (a control variate whose expectations cancel),
              the nearer q to E_pi[sum_{l >= k} r_l | x, s_1..s_k] the lower its variance;
  pi          additive, E[sum_k r_k | x, s] = sum_k f(x, k, s_k), AND the logger drawing its
              positions independently, mu(s | x) = prod_k mu_k(s_k | x) (a repeat allowed). A
              logger without repeats, as every slate the environment accepts, is not factorised:
              there the pseudo-inverse q^T Gamma^+ 1_s has other weights (even for a uniform one),
              and this form is biased.
For the environment's feedback (src.envs.movielens_ranking): `scores` is additive and
item-position; `cascade` (a click on the first movie looked at that is good enough) is a cascade.

NumPy only, like src.evaluation.estimators: no TensorFlow or MLflow. docs/ope_slates.md: the
estimators against the environment's exact values.
"""

from __future__ import annotations

import functools
import itertools
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

# Subset probabilities of a Plackett-Luce log held at once, per array (three are): 40 MB, e.g.
# the 4,845 subsets of 4 out of 20 candidates for 1,032 rows.
ELEMENTS_PER_BLOCK = 5_000_000
# Sets of candidates a Plackett-Luce position marginal sums over, at most: beyond, the sums take
# minutes per 10,000 rows.
MOST_PLACKETT_LUCE_SUBSETS = 100_000


@dataclass(frozen=True)
class SlateProbabilities:
    """A policy's probabilities of n logged slates of K positions out of N candidates."""

    position: np.ndarray  # [n, K] p_k(s_ik | x_i): the marginal chance s_ik is shown at position k
    prefix: np.ndarray  # [n, K] p(s_i1, ..., s_ik | x_i)
    # [n, K, N] p(a at position k | x_i, s_i1, ..., s_i,k-1) for every candidate a: Cascade-DR's
    # expectation of q under the policy, after the logged positions above
    conditional: np.ndarray

    @property
    def slate(self) -> np.ndarray:
        """[n] p(s_i | x_i), the whole slate's probability: its longest prefix's."""
        return self.prefix[:, -1]

    def take(self, rows: np.ndarray) -> SlateProbabilities:
        return SlateProbabilities(self.position[rows], self.prefix[rows], self.conditional[rows])


@dataclass(frozen=True)
class SlateLog:
    """n logged rounds: the user's features [n, d], the N candidates' [n, N, d], the slates
    (candidate indices) [n, K], the slot rewards [n, K] and the logging policy's probabilities."""

    contexts: np.ndarray
    candidates: np.ndarray
    slates: np.ndarray
    rewards: np.ndarray
    logging: SlateProbabilities

    def __len__(self) -> int:
        return len(self.slates)

    def take(self, rows: np.ndarray) -> SlateLog:
        return SlateLog(self.contexts[rows], self.candidates[rows], self.slates[rows], self.rewards[rows],
                        self.logging.take(rows))


def _prefix_of(conditional: np.ndarray, slates: np.ndarray) -> np.ndarray:
    """[n, K] the logged prefixes' probabilities: the products of the conditionals down the slate."""
    shown = np.take_along_axis(conditional, slates[:, :, None], axis=2)[:, :, 0]
    return np.cumprod(shown, axis=1)


def _shown_above(slates: np.ndarray, num_candidates: int) -> np.ndarray:
    """[n, K, N] whether each candidate is shown above position k."""
    n, size = slates.shape
    shown = np.zeros((n, size, num_candidates), bool)
    for position in range(1, size):
        shown[:, position] = shown[:, position - 1]
        shown[np.arange(n), position, slates[:, position - 1]] = True
    return shown


def uniform(num_candidates: int, slates: np.ndarray) -> SlateProbabilities:
    """A uniformly random slate: an ordered sample without replacement."""
    n, size = slates.shape
    available = ~_shown_above(slates, num_candidates)
    conditional = available / (num_candidates - np.arange(size))[None, :, None]
    return SlateProbabilities(np.full((n, size), 1 / num_candidates), _prefix_of(conditional, slates), conditional)


def top_k(scores: np.ndarray, slates: np.ndarray) -> SlateProbabilities:
    """The deterministic slate of the K best candidates by `scores` [n, N], best first (ties to
    the lower index): after any prefix, the best candidate not shown yet."""
    n, size = slates.shape
    order = np.argsort(-scores, axis=1, kind="stable")[:, :size]
    available = np.where(_shown_above(slates, scores.shape[1]), -np.inf, scores[:, None, :])
    conditional = np.zeros(available.shape)
    np.put_along_axis(conditional, available.argmax(axis=2)[:, :, None], 1.0, axis=2)
    return SlateProbabilities((slates == order).astype(float), _prefix_of(conditional, slates), conditional)


@functools.cache
def _subset_levels(num_candidates: int, largest: int) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], ...]:
    """For each size 0..largest, the subsets of the candidates of that size: their members
    [C, size]; for each member, the index of the subset without it among the smaller ones
    [C, size]; and 1.0 where a candidate is not a member [C, N]."""
    levels, index_of = [], {(): 0}
    for size in range(largest + 1):
        subsets = list(itertools.combinations(range(num_candidates), size))
        members = np.array(subsets, dtype=np.intp).reshape(len(subsets), size)
        without = np.array([[index_of[subset[:j] + subset[j + 1:]] for j in range(size)] for subset in subsets],
                           dtype=np.intp).reshape(len(subsets), size)
        outside = np.ones((len(subsets), num_candidates))
        outside[np.arange(len(subsets))[:, None], members] = 0.0
        levels.append((members, without, outside))
        index_of = {subset: i for i, subset in enumerate(subsets)}
    return tuple(levels)


def plackett_luce_subsets(num_candidates: int, slate_size: int) -> int:
    """How many sets of candidates shown above a position the marginals sum over."""
    return sum(math.comb(num_candidates, size) for size in range(slate_size))


def _plackett_luce_positions(weights: np.ndarray, slates: np.ndarray) -> np.ndarray:
    """[n, K] the chance of each logged candidate at its position: a sum over the unordered sets
    S of candidates shown above it of P(S above) w_a / w(not S), P(S above) built up one member
    at a time (a dynamic programme over subsets: sum_k C(N, k) sets for K positions, 6,196 for
    4 of 20). Every sum is of non-negative terms, so nothing cancels."""
    n, size = slates.shape
    levels = _subset_levels(weights.shape[1], size - 1)
    by_candidate = np.ascontiguousarray(weights.T)  # [N, n]: gathering whole rows is what is fast
    rows = np.arange(n)
    probability = np.ones((1, n))  # [C, n] the chance of each set being the ones shown above
    position = np.empty((n, size))
    for k in range(size):
        outside = levels[k][2]
        ratio = probability / (outside @ by_candidate)
        position[:, k] = by_candidate[slates[:, k], rows] * (outside.T @ ratio)[slates[:, k], rows]
        if k + 1 < size:
            members, without, _ = levels[k + 1]
            probability, term, weight = np.zeros((3, len(members), n))  # in place: these are the big ones
            for j in range(k + 1):
                np.multiply(np.take(ratio, without[:, j], axis=0, out=term),
                            np.take(by_candidate, members[:, j], axis=0, out=weight), out=term)
                probability += term
    return position


def plackett_luce(logits: np.ndarray, slates: np.ndarray) -> SlateProbabilities:
    """Plackett-Luce over candidates with `logits` [n, N] (softmax sampling without replacement,
    TF-Agents' ranking `no_penalty` policy on scores / temperature): each position's pick is a
    softmax over the candidates not shown above it. The prefix is a product of those choices;
    the position marginal sums over the sets shown above, exactly, at a cost that grows as
    C(N, K - 1): 6,196 sets for the environment's 5 of 20, too many for 5 of hundreds."""
    weights = np.exp(logits - logits.max(axis=1, keepdims=True))
    available = np.where(_shown_above(slates, logits.shape[1]), 0.0, weights[:, None, :])
    conditional = available / available.sum(axis=2, keepdims=True)
    largest_level = max(math.comb(logits.shape[1], size) for size in range(slates.shape[1]))
    rows = max(1, ELEMENTS_PER_BLOCK // largest_level)
    position = np.concatenate([_plackett_luce_positions(weights[start:start + rows], slates[start:start + rows])
                               for start in range(0, len(slates), rows)])
    return SlateProbabilities(position, _prefix_of(conditional, slates), conditional)


def mixture(first: SlateProbabilities, second: SlateProbabilities, weight: float) -> SlateProbabilities:
    """Draw the slate from `first` with probability `weight`, else from `second` (epsilon-greedy:
    uniform with epsilon, else the top K). Marginals and prefixes mix linearly; a conditional
    mixes by how likely each branch is to have shown the prefix above (0 after a prefix neither
    shows, where every estimator weighs it by 0)."""
    size = first.prefix.shape[1]
    before_first = np.hstack([np.ones((len(first.prefix), 1)), first.prefix[:, :size - 1]])
    before_second = np.hstack([np.ones((len(second.prefix), 1)), second.prefix[:, :size - 1]])
    before = weight * before_first + (1 - weight) * before_second
    joint = (weight * before_first[:, :, None] * first.conditional
             + (1 - weight) * before_second[:, :, None] * second.conditional)
    conditional = np.divide(joint, before[:, :, None], out=np.zeros_like(joint), where=before[:, :, None] > 0)
    return SlateProbabilities(weight * first.position + (1 - weight) * second.position,
                              weight * first.prefix + (1 - weight) * second.prefix, conditional)


def exact_values(rewards: np.ndarray, num_candidates: int, slate_size: int, target_scores: np.ndarray,
                 looks: np.ndarray, click_threshold: float) -> dict[str, float]:
    """The exact value of the deterministic target that shows the top `slate_size` of the
    `num_candidates` offered by `target_scores` [users, pool] (ties to the lower pool column), to
    users drawn uniformly offered a uniform subset of the pool, under each feedback
    (src.envs.movielens_ranking): "scores", the slate's summed `rewards` [users, pool], and
    "cascade", its expected clicks, position k looked at with chance `looks[k]`. Its slate is the
    first K candidates met scanning the pool in its order; with j of the t movies before it
    offered, movie t is offered with chance (N - j) / (P - t) (a uniform N-subset of P, drawn one
    movie at a time). The recursion carries, per number j of positions filled, the chance of that
    state and, for the cascade, the chance of it with no click yet; position j clicks with chance
    looks_j 1{rating >= threshold}."""
    pool = rewards.shape[1]
    ranked = np.take_along_axis(rewards, np.argsort(-target_scores, axis=1, kind="stable"), axis=1)
    filled = np.arange(slate_size)
    state = np.zeros((len(rewards), slate_size))
    state[:, 0] = 1.0
    unclicked = state.copy()
    values = {"scores": np.zeros(len(rewards)), "cascade": np.zeros(len(rewards))}
    for t in range(pool):
        # Above 1 only in states that hold no chance: more left to offer than movies left.
        offered = (num_candidates - filled) / (pool - t)
        rating = ranked[:, t:t + 1]
        click = looks * (rating >= click_threshold)
        values["scores"] += np.sum(state * offered * rating, axis=1)
        values["cascade"] += np.sum(unclicked * offered * click, axis=1)
        shown, shown_unclicked = state * offered, unclicked * offered * (1 - click)
        state, unclicked = state * (1 - offered), unclicked * (1 - offered)
        state[:, 1:] += shown[:, :-1]
        unclicked[:, 1:] += shown_unclicked[:, :-1]
    return {feedback: float(value.mean()) for feedback, value in values.items()}


def hybrid_features(contexts: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """[n, N, 3d + 1] each candidate's features in its round: the user's and the movie's, their
    elementwise product (Li et al.'s hybrid features, WWW 2010), in which the simulator's rating
    u . m is linear, and an intercept."""
    users = np.broadcast_to(contexts[:, None, :], candidates.shape)
    return np.concatenate([users * candidates, users, candidates, np.ones(candidates.shape[:2] + (1,))], axis=2)


def _cascade_coefficients(features: np.ndarray, log: SlateLog, target: SlateProbabilities,
                          ridge: float) -> np.ndarray:
    """[K, f] one ridge per position, fitted from the bottom up (fitted Q evaluation, Kiyohara et
    al. 2022's Sec. 3.1, as obp's SlateRegressionModel): position k's regression target is r_k
    plus the next position's model averaged over the target's pick after the logged prefix."""
    n, size = log.slates.shape
    rows = np.arange(n)
    coefficients = np.empty((size, features.shape[2]))
    following = np.zeros(n)
    for k in reversed(range(size)):
        target_values = log.rewards[:, k] + following
        design = features[rows, log.slates[:, k]]
        # Ridge towards the mean rather than 0, as src.evaluation.estimators.fit_reward_model.
        prior = np.zeros(design.shape[1])
        prior[-1] = target_values.mean()
        coefficients[k] = np.linalg.solve(design.T @ design + ridge * np.eye(design.shape[1]),
                                          design.T @ target_values + ridge * prior)
        following = np.sum(target.conditional[:, k] * (features @ coefficients[k]), axis=1)
    return coefficients


def cascade_q(log: SlateLog, target: SlateProbabilities, ridge: float, folds: int) -> np.ndarray:
    """[n, K, N] Cascade-DR's q_k(x_i, s_i,1:k-1, a) for every candidate a: a ridge per position
    on the candidate's hybrid features (not the prefix above it: an approximation, which costs
    Cascade-DR variance, not bias), cross-fitted on `folds` folds (rounds i mod folds) as
    src.evaluation.estimators.cross_fitted_rewards; `folds=1`: in-sample."""
    features = hybrid_features(log.contexts, log.candidates)
    if folds == 1:
        return np.einsum("inf,kf->ikn", features, _cascade_coefficients(features, log, target, ridge))
    fold_of = np.arange(len(log)) % folds
    q = np.empty((len(log), log.slates.shape[1], features.shape[1]))
    for fold in range(folds):
        held, kept = np.flatnonzero(fold_of == fold), np.flatnonzero(fold_of != fold)
        coefficients = _cascade_coefficients(features[kept], log.take(kept), target.take(kept), ridge)
        q[held] = np.einsum("inf,kf->ikn", features[held], coefficients)
    return q


class SlateEstimator(ABC):
    """An estimator of a slate policy's value, E_pi[sum_k r_k]."""

    name: ClassVar[str]

    @abstractmethod
    def per_round(self, log: SlateLog, target: SlateProbabilities, q: np.ndarray | None = None) -> np.ndarray:
        """[n] per-round terms whose mean is the estimate; `target`: the target's probabilities
        of the logged slates; `q`: [n, K, N], the reward model of those that take one (cascade_dr)."""

    def estimate(self, log: SlateLog, target: SlateProbabilities, q: np.ndarray | None = None) -> float:
        return float(np.mean(self.per_round(log, target, q)))


SLATE_ESTIMATORS: dict[str, type[SlateEstimator]] = {}


def register(estimator: type[SlateEstimator]) -> type[SlateEstimator]:
    SLATE_ESTIMATORS[estimator.name] = estimator
    return estimator


@register
@dataclass(frozen=True)
class SlateStandardIPS(SlateEstimator):
    name: ClassVar[str] = "sips"

    def per_round(self, log, target, q=None):
        return target.slate / log.logging.slate * log.rewards.sum(axis=1)


@register
@dataclass(frozen=True)
class SlateIndependentIPS(SlateEstimator):
    name: ClassVar[str] = "iips"

    def per_round(self, log, target, q=None):
        return np.sum(target.position / log.logging.position * log.rewards, axis=1)


@register
@dataclass(frozen=True)
class SlateRewardInteractionIPS(SlateEstimator):
    name: ClassVar[str] = "rips"

    def per_round(self, log, target, q=None):
        return np.sum(target.prefix / log.logging.prefix * log.rewards, axis=1)


@register
@dataclass(frozen=True)
class SlateCascadeDoublyRobust(SlateEstimator):
    name: ClassVar[str] = "cascade_dr"

    def per_round(self, log, target, q=None):
        if q is None:
            raise ValueError("cascade_dr needs the reward model q, [n, K, N]: see cascade_q")
        weights = target.prefix / log.logging.prefix
        weights_above = np.hstack([np.ones((len(weights), 1)), weights[:, :-1]])
        logged_q = np.take_along_axis(q, log.slates[:, :, None], axis=2)[:, :, 0]
        expected_q = np.sum(target.conditional * q, axis=2)
        return np.sum(weights * (log.rewards - logged_q) + weights_above * expected_q, axis=1)


@register
@dataclass(frozen=True)
class SlatePseudoInverse(SlateEstimator):
    name: ClassVar[str] = "pi"

    def per_round(self, log, target, q=None):
        size = log.slates.shape[1]
        weights = np.sum(target.position / log.logging.position, axis=1) - (size - 1)
        return weights * log.rewards.sum(axis=1)
