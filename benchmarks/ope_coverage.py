"""Do the off-policy intervals cover? Each estimator x interval x logging policy x log size over
many seeds, against the simulator's exact value.

    uv run python -m benchmarks.ope_coverage --data-dir /path/to/ml-100k --seeds 100 --out docs/ope_coverage

The target is our LinUCB's greedy policy after `--target-loops` loops on the default environment
(20 movies, the rewards linear in the users' features), its true value exact. Logs are drawn in
NumPy from the same environment (users uniform, rewards from the reward model) by:

  uniform             every movie alike
  epsilon-greedy 0.1  greedy on a reward model fitted to a 500-round uniform pilot log, a tenth uniform
  Boltzmann 0.3       softmax of that model's scores at temperature 0.3
  learning eps 0.1    epsilon-greedy 0.1 on a reward model refitted every 200 rounds to its own log so
                      far: the logging policy changes as it logs, its propensities those of the time
  LinTS, 100 draws    linear Thompson sampling (alpha 1, ridge 1) on the posterior of the same uniform
                      pilot log, each propensity estimated from 100 fresh draws of its sampling as
                      `agent.propensity_draws=100` estimates it (the pick's draw counted): Monte-Carlo
                      propensities, which no interval counts the error of

Every estimator of `src.evaluation.estimators` (its reward model cross-fitted, `reward_model_folds`
of conf/evaluate.yaml) gets every interval of `src.evaluation.intervals` at 95%; a cell's
coverage is the share of seeds whose interval holds the true value, beside its mean width. The
goal: at least 93% in every cell for an interval called valid there.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from src import tf_runtime  # noqa: F401,I001  (first: a quiet TensorFlow start-up)

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from benchmarks.ope import draw_log, logging_policies, trained_target
from benchmarks.throughput import compose_config
from src import config, data
from src.engine import configure_threads
from src.evaluation import estimators, intervals

log = logging.getLogger("benchmarks.ope_coverage")

EVALUATE = config.compose([], config_name="evaluate")
CONFIDENCE, GOAL = 0.95, 0.93
LOGGERS = ("uniform", "epsilon-greedy 0.1", "Boltzmann 0.3")
LEARNING = "learning eps 0.1"
REFIT_EVERY = 200
LINTS_DRAWS, PILOT_ROUNDS = 100, 500
LINTS = f"LinTS, {LINTS_DRAWS} draws"


def learning_log(model, rounds: int, epsilon: float, rng) -> tuple[estimators.Feedback, np.ndarray]:
    """Epsilon-greedy on a per-movie ridge refitted to its own log every REFIT_EVERY rounds (uniform
    until its first fit)."""
    num_users, num_actions = model.rewards.shape
    users = rng.integers(num_users, size=rounds)
    actions, propensities = np.empty(rounds, dtype=int), np.empty(rounds)
    greedy = None
    for start in range(0, rounds, REFIT_EVERY):
        block = slice(start, min(start + REFIT_EVERY, rounds))
        size = block.stop - start
        if greedy is None:
            actions[block], propensities[block] = rng.integers(num_actions, size=size), 1 / num_actions
        else:
            chosen = greedy[users[block]]
            actions[block] = np.where(rng.random(size) < epsilon, rng.integers(num_actions, size=size), chosen)
            propensities[block] = epsilon / num_actions + (1 - epsilon) * (actions[block] == chosen)
        so_far = estimators.Feedback(model.user_features[users[:block.stop]], actions[:block.stop],
                                     model.rewards[users[:block.stop], actions[:block.stop]],
                                     propensities[:block.stop])
        coefficients = estimators.fit_reward_model(so_far, num_actions, EVALUATE.reward_model_ridge)
        greedy = estimators.predict_rewards(coefficients, model.user_features).argmax(axis=1)
    return estimators.Feedback(model.user_features[users], actions, model.rewards[users, actions],
                               propensities), users


def lints_log(model, rounds: int, rng) -> tuple[estimators.Feedback, np.ndarray]:
    """LinTS on a per-movie posterior from a uniform pilot log, fixed while it logs: each pick is
    the best of one draw of x.theta_a ~ N(x.mean_a, x'A_a^-1 x) per movie; its propensity the
    share of LINTS_DRAWS more draws it wins, its own draw counted."""
    num_users, num_actions = model.rewards.shape
    features = model.user_features
    pilot = np.random.default_rng(1234)
    pilot_users = pilot.integers(num_users, size=PILOT_ROUNDS)
    pilot_actions = pilot.integers(num_actions, size=PILOT_ROUNDS)
    covariances, means = [], []
    for movie in range(num_actions):
        x = features[pilot_users[pilot_actions == movie]]
        covariance = np.linalg.inv(np.eye(features.shape[1]) + x.T @ x)
        covariances.append(covariance)
        means.append(covariance @ x.T @ model.rewards[pilot_users[pilot_actions == movie], movie])
    mean = features @ np.array(means).T  # [users, movies]
    width = np.sqrt(np.einsum("ud,mde,ue->um", features, np.array(covariances), features))
    users = rng.integers(num_users, size=rounds)
    actions = (mean[users] + width[users] * rng.standard_normal((rounds, num_actions))).argmax(axis=1)
    wins = np.zeros(rounds)
    for _ in range(LINTS_DRAWS):
        wins += (mean[users] + width[users] * rng.standard_normal((rounds, num_actions))).argmax(axis=1) == actions
    return estimators.Feedback(features[users], actions, model.rewards[users, actions],
                               (1 + wins) / (LINTS_DRAWS + 1)), users


def draw(model, policies, logger: str, rounds: int, rng) -> tuple[estimators.Feedback, np.ndarray]:
    if logger == LEARNING:
        return learning_log(model, rounds, 0.1, rng)
    if logger == LINTS:
        return lints_log(model, rounds, rng)
    return draw_log(model, policies[logger], rounds, rng)


def cells(model, choices, sizes: list[int], seeds: int, samples: int) -> pd.DataFrame:
    """One row per logger x size x seed x estimator x interval."""
    num_actions = model.rewards.shape[1]
    truth = model.value_of(choices)
    reward_range = (float(model.rewards.min()), float(model.rewards.max()))
    scorers = [estimator().for_actions(num_actions) for estimator in estimators.ESTIMATORS.values()]
    policies = logging_policies(model, np.random.default_rng(1234))
    rows = []
    for logger in (*LOGGERS, LEARNING, LINTS):
        for rounds in sizes:
            started = time.perf_counter()
            for seed in range(seeds):
                rng = np.random.default_rng(seed)
                feedback, users = draw(model, policies, logger, rounds, rng)
                t = estimators.deterministic_target_terms(feedback, choices[users], num_actions,
                                                          EVALUATE.reward_model_ridge, EVALUATE.reward_model_folds)
                effective = intervals.effective_sample_size(t)
                agent = "epsilon_greedy" if logger == LEARNING else intervals.FIXED_LOGGER
                draws = LINTS_DRAWS if logger == LINTS else 0
                for interval in intervals.INTERVALS:
                    warned = bool(intervals.caveats(interval, [], t, agent, draws))
                    table = intervals.estimate_all(scorers, t, interval, CONFIDENCE, reward_range=reward_range,
                                                   samples=samples, seed=seed)
                    rows += [{"logger": logger, "rounds": rounds, "seed": seed, "estimator": row.estimator,
                              "interval": interval, "covered": row.ci_low <= truth <= row.ci_high,
                              "width": row.ci_high - row.ci_low, "defined": np.isfinite(row.ci_low),
                              "effective_sample_size": effective, "warned": warned}
                             for row in table.itertuples()]
            log.info("%s, %d rounds: %d seeds in %.0f s", logger, rounds, seeds, time.perf_counter() - started)
    return pd.DataFrame(rows)


def summary(rows: pd.DataFrame) -> pd.DataFrame:
    keys = ["estimator", "interval", "logger", "rounds"]
    defined = rows[rows.defined]
    table = defined.groupby(keys, sort=False).agg(
        coverage=("covered", "mean"), width=("width", "mean"), seeds=("seed", "size"),
        effective_sample_size=("effective_sample_size", "median"), warned=("warned", "mean"))
    table["coverage_unwarned"] = defined[~defined.warned].groupby(keys, sort=False).covered.mean()
    return table.reset_index()


def headline(rows: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """Per interval: the cells meeting the goal, of those where it is defined; the share of
    intervals the product warns of, and the coverage of those it does not."""
    defined = rows[rows.defined]
    quiet = defined[~defined.warned].groupby("interval", sort=False).covered.mean()
    return table.assign(met=table.coverage >= GOAL).groupby("interval", sort=False).agg(
        cells=("met", "size"), met=("met", "sum"), worst=("coverage", "min")).assign(
        share=lambda frame: frame.met / frame.cells,
        warned=defined.groupby("interval", sort=False).warned.mean(), coverage_unwarned=quiet)


def markdown(table: pd.DataFrame, value: str, fmt: str) -> str:
    wide = table.pivot_table(index=["estimator", "interval"], columns=["logger", "rounds"], values=value, sort=False)
    header = [f"{logger} {rounds:,}" for logger, rounds in wide.columns]
    lines = ["| estimator | interval | " + " | ".join(header) + " |", "|---|---|" + "---:|" * len(header)]
    for (estimator, interval), values in wide.iterrows():
        cells_ = [("**" + format(v, fmt) + "**" if value == "coverage" and v < GOAL else format(v, fmt))
                  if np.isfinite(v) else "—" for v in values]
        lines.append(f"| {estimator} | {interval} | " + " | ".join(cells_) + " |")
    return "\n".join(lines)


def figure(table: pd.DataFrame) -> Figure:
    wide = table.pivot_table(index=["estimator", "interval"], columns=["logger", "rounds"], values="coverage",
                             sort=False)
    chart = Figure(figsize=(11, 0.28 * len(wide) + 2), layout="constrained")
    axis = chart.subplots()
    image = axis.imshow(wide.to_numpy(), vmin=0.5, vmax=1.0, cmap="RdYlGn", aspect="auto")
    axis.set_xticks(range(len(wide.columns)), [f"{logger}\n{rounds:,}" for logger, rounds in wide.columns], fontsize=8)
    axis.set_yticks(range(len(wide)), [f"{estimator} · {interval}" for estimator, interval in wide.index], fontsize=8)
    for (row, column), value in np.ndenumerate(wide.to_numpy()):
        if np.isfinite(value):
            axis.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=6)
    chart.colorbar(image, label=f"coverage of the true value at nominal {CONFIDENCE:.0%}")
    axis.set_title(f"Off-policy intervals: coverage by logger and log size (goal >= {GOAL:.0%})")
    return chart


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True, help="MovieLens 100K directory")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000])
    parser.add_argument("--seeds", type=int, default=100)
    parser.add_argument("--samples", type=int, default=200, help="bootstrap resamples")
    parser.add_argument("--target-loops", type=int, default=2_000, help="LinUCB's training loops")
    parser.add_argument("--out", type=Path, required=True, help="folder for rows.csv, coverage.csv and coverage.png")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    data_overrides = [f"data.dir={args.data_dir.resolve()}"]
    base = compose_config("linucb", data_overrides)
    configure_threads(base.training.threads.intra_op, base.training.threads.inter_op)
    model, choices = trained_target(data_overrides, data.load(base.data), args.target_loops, 20)
    rows = cells(model, choices, args.sizes, args.seeds, args.samples)
    table = summary(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    rows.to_csv(args.out / "rows.csv", index=False)
    table.to_csv(args.out / "coverage.csv", index=False)
    figure(table).savefig(args.out / "coverage.png", dpi=110)
    print(f"\nCoverage at nominal {CONFIDENCE:.0%} over {args.seeds} seeds (bold: below {GOAL:.0%}); "
          f"true value {model.value_of(choices):.4f}\n")
    print(markdown(table, "coverage", ".2f"))
    print("\nMean width\n")
    print(markdown(table, "width", ".3f"))
    print("\nMedian effective sample size of the target's weights\n")
    print(table.groupby(["logger", "rounds"], sort=False).effective_sample_size.first().to_string(
        float_format="{:,.0f}".format))
    print("\nCells meeting the goal, per interval\n")
    print(headline(rows, table).to_string(float_format="{:.2f}".format))
    print("\nCoverage where the product does not warn (src.evaluation.intervals.caveats), share warned\n")
    print(markdown(table, "coverage_unwarned", ".2f"))
    print()
    print(markdown(table, "warned", ".2f"))
    print(f"\nTables and figure in {args.out}")


if __name__ == "__main__":
    main()
