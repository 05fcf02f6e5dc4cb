"""Off-policy evaluation of slates: how well each estimator of src.evaluation.slates recovers a
slate policy's exact value on `env=movielens_ranking`, by logger, log size and feedback.

    uv run python -m benchmarks.ope_slates --data-dir /path/to/ml-100k

The environment's reward model, built as src.envs.movielens_ranking.build builds it from
conf/env/movielens_ranking.yaml: a visit is a uniformly drawn user offered 20 candidates (a
uniform subset of the 100-movie pool, in random order) and shown a slate of 5. Its feedback:
`scores` (each slot's reward: the movie's rating) or `cascade` (1 at the first position looked
at, position i with probability (i + 1)^-position_bias, whose movie is rated at least
click_threshold; 0 elsewhere). Drawn here in NumPy, as the engine does not log slates yet.

Each policy ranks by a score: the rating plus Gaussian noise fixed per (user, movie), one draw
for the loggers (sd LOGGER_NOISE) and another for the target (sd TARGET_NOISE).
  loggers   epsilon-greedy (a uniform slate with probability EPSILON, else the logger's top 5)
            and Plackett-Luce on the logger's score / TEMPERATURE (the ranking agent's
            `no_penalty` sampling), with exact probabilities (src.evaluation.slates)
  target    the top 5 by its score: deterministic
The target's value is exact (`src.evaluation.slates.exact_values`: a recursion over the pool in the target's order,
no sampling), and checked here against a Monte Carlo over MONTE_CARLO_VISITS visits. Cascade-DR's
q is a ridge per position (src.evaluation.slates.cascade_q) with conf/evaluate.yaml's ridge and
cross-fitting folds. The tables: relative RMSE, sqrt(mean (estimate - truth)^2) / truth, and
relative bias, mean (estimate - truth) / truth, with its standard error, over the seeds. Where
the weights are heavy-tailed, a few seeds' mean sits below an unbiased estimator's value (the
rare large weights carry it) and its standard error understates: `--sizes 1000 --seeds 300`
tells a bias from that.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

from src import tf_runtime  # noqa: F401,I001  (first: a quiet TensorFlow start-up)

import numpy as np
import pandas as pd

from src import config, data
from src.envs.movielens import build_reward_model, fields_of
from src.envs.movielens_ranking import SlateRewardModel
from src.evaluation import slates

log = logging.getLogger("benchmarks.ope_slates")

EVALUATE = config.compose([], config_name="evaluate")
RIDGE, FOLDS = EVALUATE.reward_model_ridge, EVALUATE.reward_model_folds
LOGGER_NOISE, TARGET_NOISE = 1.0, 1.0  # the ratings' sd over users and movies is ~1.5
EPSILON, TEMPERATURE = 0.2, 0.5
MONTE_CARLO_VISITS = 200_000
SLATES_PER_BLOCK = 200_000  # of the exhaustive sums: ~1 GB of probabilities at once
FEEDBACKS = ("scores", "cascade")


@dataclass(frozen=True)
class Setting:
    """The environment's reward model and feedback, and the policies' scores [users, pool]."""

    model: SlateRewardModel
    looks: np.ndarray  # [K] the chance each position is looked at
    click_threshold: float
    logger_scores: np.ndarray
    target_scores: np.ndarray


def setting(data_dir: Path) -> Setting:
    env = config.compose(["env=movielens_ranking", f"data.dir={data_dir.resolve()}"])
    dataset = data.load(env.data)
    env = env.env
    model = build_reward_model(dataset.ratings_matrix(), env.num_movies, env.rank_k, env.reward_rank,
                               env.movie_selection)
    model = SlateRewardModel(**fields_of(model), num_actions=env.num_actions, slate_size=env.slate_size)
    rng = np.random.default_rng(1234)
    return Setting(model, (np.arange(env.slate_size) + 1.0) ** -env.position_bias, env.click_threshold,
                   model.rewards + LOGGER_NOISE * rng.standard_normal(model.rewards.shape),
                   model.rewards + TARGET_NOISE * rng.standard_normal(model.rewards.shape))


def draw_visits(s: Setting, rounds: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """Users [n] and their candidates [n, N] (pool columns), as the environment draws them."""
    users = rng.integers(len(s.model.rewards), size=rounds)
    movies = np.argsort(rng.random((rounds, s.model.rewards.shape[1])), axis=1)[:, :s.model.num_actions]
    return users, movies


def expected_clicks(s: Setting, ratings: np.ndarray) -> np.ndarray:
    """[n, K] each position's chance of the click, given the slates' ratings [n, K]."""
    clicks = s.looks * (ratings >= s.click_threshold)
    return clicks * np.cumprod(np.hstack([np.ones((len(ratings), 1)), 1 - clicks[:, :-1]]), axis=1)


def monte_carlo_values(s: Setting, rng) -> dict[str, tuple[float, float]]:
    """The target's value over sampled visits (the exact expected clicks of each slate): mean and
    standard error, a check on `exact_values`."""
    users, movies = draw_visits(s, MONTE_CARLO_VISITS, rng)
    shown = np.argsort(-s.target_scores[users[:, None], movies], axis=1, kind="stable")[:, :s.model.slate_size]
    ratings = s.model.rewards[users[:, None], np.take_along_axis(movies, shown, axis=1)]
    per_visit = {"scores": ratings.sum(axis=1), "cascade": expected_clicks(s, ratings).sum(axis=1)}
    return {feedback: (float(v.mean()), float(v.std() / np.sqrt(len(v)))) for feedback, v in per_visit.items()}


def epsilon_greedy_probabilities(scores: np.ndarray, shown: np.ndarray) -> slates.SlateProbabilities:
    return slates.mixture(slates.uniform(scores.shape[1], shown), slates.top_k(scores, shown), EPSILON)


def epsilon_greedy(scores: np.ndarray, size: int, rng) -> tuple[np.ndarray, slates.SlateProbabilities]:
    greedy = np.argsort(-scores, axis=1, kind="stable")[:, :size]
    random = np.argsort(rng.random(scores.shape), axis=1)[:, :size]
    shown = np.where(rng.random((len(scores), 1)) < EPSILON, random, greedy)
    return shown, epsilon_greedy_probabilities(scores, shown)


def plackett_luce(scores: np.ndarray, size: int, rng) -> tuple[np.ndarray, slates.SlateProbabilities]:
    logits = scores / TEMPERATURE
    # The Gumbel-max trick: the top K of logits plus Gumbel noise is a Plackett-Luce draw.
    shown = np.argsort(-(logits + rng.gumbel(size=logits.shape)), axis=1)[:, :size]
    return shown, slates.plackett_luce(logits, shown)


LOGGERS = {f"epsilon-greedy {EPSILON}": epsilon_greedy, f"Plackett-Luce {TEMPERATURE}": plackett_luce}


def estimates(s: Setting, logger: str, rounds: int, seed: int) -> dict[str, dict[str, float]]:
    """Every estimator's estimate of the target's value on one log, per feedback."""
    rng = np.random.default_rng([seed, rounds, list(LOGGERS).index(logger)])
    users, movies = draw_visits(s, rounds, rng)
    shown, logging = LOGGERS[logger](s.logger_scores[users[:, None], movies], s.model.slate_size, rng)
    target = slates.top_k(s.target_scores[users[:, None], movies], shown)
    ratings = s.model.rewards[users[:, None], np.take_along_axis(movies, shown, axis=1)]
    looked = rng.random(ratings.shape) < s.looks
    clicks = looked & (ratings >= s.click_threshold)
    first_click = clicks & (np.cumsum(clicks, axis=1) == 1)
    base = slates.SlateLog(s.model.user_features[users], s.model.movie_features[movies], shown, ratings, logging)
    results = {}
    for feedback, rewards in (("scores", ratings), ("cascade", first_click.astype(float))):
        logged = replace(base, rewards=rewards)
        q = slates.cascade_q(logged, target, RIDGE, FOLDS)
        results[feedback] = {name: estimator().estimate(logged, target, q)
                             for name, estimator in slates.SLATE_ESTIMATORS.items()}
    return results


def exhaustive_expectations(s: Setting, visits: int, rng) -> pd.DataFrame:
    """Each estimator's exact expectation under the epsilon-greedy logger at single visits: the
    sum over every ordered slate (1,860,480 of 5 of 20) of the logger's probability times the
    estimator's term at the slate's expected slot rewards (each estimator is linear in the
    rewards; Cascade-DR's q random and fixed), beside the target's value at the visit."""
    users, movies = draw_visits(s, visits, rng)
    size, candidates = s.model.slate_size, s.model.num_actions
    every = np.array(list(itertools.permutations(range(candidates), size)), dtype=np.intp)
    rows = []
    for visit, (user, offered) in enumerate(zip(users, movies)):
        ratings = s.model.rewards[user, offered]
        best = np.argsort(-s.target_scores[user, offered], kind="stable")[:size]
        expected = {"scores": ratings[every], "cascade": expected_clicks(s, ratings[every])}
        truth = {"scores": ratings[best].sum(), "cascade": expected_clicks(s, ratings[best][None]).sum()}
        q = rng.normal(size=(size, candidates))
        sums = {feedback: dict.fromkeys(slates.SLATE_ESTIMATORS, 0.0) for feedback in FEEDBACKS}
        for start in range(0, len(every), SLATES_PER_BLOCK):
            shown = every[start:start + SLATES_PER_BLOCK]
            logging = epsilon_greedy_probabilities(np.tile(s.logger_scores[user, offered], (len(shown), 1)), shown)
            target = slates.top_k(np.tile(s.target_scores[user, offered], (len(shown), 1)), shown)
            for feedback in FEEDBACKS:
                log = slates.SlateLog(np.empty((len(shown), 0)), np.empty((len(shown), candidates, 0)), shown,
                                      expected[feedback][start:start + len(shown)], logging)
                for name, estimator in slates.SLATE_ESTIMATORS.items():
                    sums[feedback][name] += logging.slate @ estimator().per_round(
                        log, target, np.broadcast_to(q, (len(shown), size, candidates)))
        rows.extend({"visit": visit, "feedback": feedback, "truth": truth[feedback], **sums[feedback]}
                    for feedback in FEEDBACKS)
    return pd.DataFrame(rows)


def study(s: Setting, truth: dict[str, float], sizes: list[int], seeds: int) -> pd.DataFrame:
    rows = []
    for logger in LOGGERS:
        for rounds in sizes:
            started = time.perf_counter()
            runs = [estimates(s, logger, rounds, seed) for seed in range(seeds)]
            for feedback in FEEDBACKS:
                for name in slates.SLATE_ESTIMATORS:
                    errors = np.array([run[feedback][name] for run in runs]) - truth[feedback]
                    rows.append({"feedback": feedback, "logger": logger, "rounds": rounds, "estimator": name,
                                 "rmse": np.sqrt(np.mean(errors**2)) / truth[feedback],
                                 "bias": errors.mean() / truth[feedback],
                                 "bias_error": errors.std(ddof=1) / np.sqrt(seeds) / truth[feedback]})
            log.info("%s, %d rounds: %d seeds in %.0f s", logger, rounds, seeds, time.perf_counter() - started)
    return pd.DataFrame(rows)


def markdown(table: pd.DataFrame, column: str) -> str:
    """One row per feedback, logger and size, one column per estimator: the relative RMSE (the
    least in bold), or the relative bias and its standard error over the seeds."""
    names = list(slates.SLATE_ESTIMATORS)
    lines = ["| feedback | logger | rounds | " + " | ".join(names) + " |", "|---|---|---:|" + "---:|" * len(names)]
    for feedback, logger, rounds in itertools.product(FEEDBACKS, LOGGERS, table["rounds"].unique()):
        group = table[(table.feedback == feedback) & (table.logger == logger) & (table.rounds == rounds)]
        group = group.set_index("estimator").loc[names]
        if column == "rmse":
            cells = [f"{value:.3f}" for value in group.rmse]
            least = int(np.argmin(group.rmse))
            cells[least] = f"**{cells[least]}**"
        else:
            cells = [f"{bias:+.3f} ± {error:.3f}" for bias, error in zip(group.bias, group.bias_error)]
        lines.append(f"| {feedback} | {logger} | {rounds:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True, help="MovieLens 100K directory")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--exhaustive-visits", type=int, default=1,
                        help="visits at which to sum every slate for the estimators' exact expectations (~1 min each)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    s = setting(args.data_dir)
    truth = slates.exact_values(s.model.rewards, s.model.num_actions, s.model.slate_size, s.target_scores, s.looks,
                                s.click_threshold)
    checks = monte_carlo_values(s, np.random.default_rng(99))
    table = study(s, truth, args.sizes, args.seeds)
    exhaustive = exhaustive_expectations(s, args.exhaustive_visits, np.random.default_rng(7))
    print(f"\nTarget: top {s.model.slate_size} of {s.model.num_actions} by the rating plus N(0, {TARGET_NOISE}^2) "
          f"noise; loggers' score: the rating plus N(0, {LOGGER_NOISE}^2) noise; {args.seeds} seeds\n")
    for feedback in FEEDBACKS:
        mean, error = checks[feedback]
        print(f"true value, {feedback}: {truth[feedback]:.4f} exact; Monte Carlo over {MONTE_CARLO_VISITS:,} "
              f"visits {mean:.4f} ± {error:.4f}")
    print("\nRelative RMSE, sqrt(mean (estimate - truth)^2) / truth\n")
    print(markdown(table, "rmse"))
    print("\nRelative bias, mean (estimate - truth) / truth ± its standard error over the seeds\n")
    print(markdown(table, "bias"))
    if len(exhaustive):
        print(f"\nExact expectations under epsilon-greedy {EPSILON}, summed over every slate, at single visits\n")
        names = list(slates.SLATE_ESTIMATORS)
        print("| visit | feedback | true value | " + " | ".join(names) + " |\n|---:|---|---:|" + "---:|" * len(names))
        for row in exhaustive.to_dict("records"):
            print(f"| {row['visit']} | {row['feedback']} | {row['truth']:.9f} | "
                  + " | ".join(f"{row[name]:.9f}" for name in names) + " |")


if __name__ == "__main__":
    main()
