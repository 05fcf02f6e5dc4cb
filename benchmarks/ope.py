"""Off-policy evaluation: what logging costs the engine, and how well each estimator recovers
a policy's true value, by logging policy and log size.

    uv run python -m benchmarks.ope --data-dir /path/to/ml-100k --figure docs/ope_study.png

1. Logging overhead. The compiled engine's interactions/s with `tracking.log_interactions`
   off and on, for the agents with exact propensities, measured alike in this process
   (the target: on is at most 20% slower), each the best of 3 timings taken alternately.
2. Estimator study. The target is our LinUCB trained for `--target-loops` loops on the
   default environment; its true value is exact (mean reward of its greedy pick over the
   environment's users). Logs are drawn from that environment by fixed logging policies
   built on an imperfect reward model (a ridge fit on a 500-round uniform pilot log):
   uniform, epsilon-greedy and Boltzmann at several settings. For each policy, log size and
   seed, every estimator of `src.evaluation.estimators` scores the target, its reward model
   fitted on the log as `src.evaluate` fits it; the table is the relative RMSE over seeds,
   sqrt(mean((estimate - truth)^2)) / truth. It runs for each `--rank-k`: at 20 (the
   default) the agent's features are the reward model's whole embedding, so the rewards are
   linear in them and the direct method's model is well specified; at 5 the rewards depend
   on 15 components nobody observes, as a real recommender's do.
3. Selection. On the same logs, switch_dr's tau and dr_os's lambda chosen per log (the tuned
   estimators, by SLOPE and by the MSE bound) against the fixed default and against every
   fixed value they choose among, the best of which is known only in hindsight.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

from src import tf_runtime  # noqa: F401,I001  (first: a quiet TensorFlow start-up)

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from tf_agents.trajectories import time_step as ts

from benchmarks.throughput import compose_config
from src import config, data, experiment
from src.data.synthetic import checksum_override, write_movielens
from src.engine import configure_threads
from src.evaluation import estimators

log = logging.getLogger("benchmarks.ope")

LOGGING_AGENTS = ("epsilon_greedy", "neural_boltzmann", "random")
EPSILONS = (0.05, 0.1, 0.3)
TEMPERATURES = (0.1, 0.3, 1.0)
EVALUATE = config.compose([], config_name="evaluate")
RIDGE, FOLDS = EVALUATE.reward_model_ridge, EVALUATE.reward_model_folds


def logging_overhead(data_overrides: list[str], dataset, loops: int, repeats: int = 3) -> pd.DataFrame:
    """Best-of-`repeats` rates with logging off and on, measured alternately so that a busy
    spell of the machine hits both alike."""
    rows = []
    for agent in LOGGING_AGENTS:
        engines = {}
        for recording in (False, True):
            cfg = compose_config(agent, [*data_overrides, f"tracking.log_interactions={recording}"])
            engines[recording] = experiment.assemble(cfg, dataset)
            for _ in engines[recording].run(cfg.training.chunk_loops, cfg.training.chunk_loops):
                pass  # the warm-up: tracing and first-call allocations
        rates = {False: 0.0, True: 0.0}
        for _ in range(repeats):
            for recording, engine in engines.items():
                started = time.perf_counter()
                for _ in engine.run(loops, cfg.training.chunk_loops):
                    pass
                rate = loops * engine.interactions_per_loop / (time.perf_counter() - started)
                rates[recording] = max(rates[recording], rate)
        rows.append({"agent": agent, "off_per_s": rates[False], "on_per_s": rates[True],
                     "slowdown": 1 - rates[True] / rates[False]})
        log.info("%s: %.0f interactions/s without logging, %.0f with", agent, rates[False], rates[True])
    return pd.DataFrame(rows)


def trained_target(data_overrides: list[str], dataset, loops: int, rank_k: int):
    """The environment's reward model and our LinUCB's greedy movie for each of its users."""
    cfg = compose_config("linucb", [*data_overrides, f"training.loops={loops}", f"env.rank_k={rank_k}",
                                    "env.reward_rank=20"])
    engine = experiment.assemble(cfg, dataset)
    for _ in engine.run(loops, cfg.training.chunk_loops):
        pass
    model = engine.environment.reward_model
    users = model.user_features.astype(np.float32)
    choices = engine.agent.policy.action(ts.restart(users, batch_size=len(users))).action.numpy()
    return model, choices


def logging_policies(model, rng) -> dict[str, np.ndarray]:
    """Each logging policy's action probabilities for every user, [users, movies]."""
    num_users, num_actions = model.rewards.shape
    pilot_users = rng.integers(num_users, size=500)
    pilot_actions = rng.integers(num_actions, size=500)
    pilot = estimators.Feedback(model.user_features[pilot_users], pilot_actions,
                                model.rewards[pilot_users, pilot_actions], np.full(500, 1 / num_actions))
    scores = estimators.predict_rewards(estimators.fit_reward_model(pilot, num_actions, RIDGE), model.user_features)
    greedy = np.eye(num_actions)[scores.argmax(axis=1)]
    policies = {"uniform": np.full((num_users, num_actions), 1 / num_actions)}
    policies.update({f"epsilon-greedy {e}": e / num_actions + (1 - e) * greedy for e in EPSILONS})
    for temperature in TEMPERATURES:
        logits = scores / temperature
        weights = np.exp(logits - logits.max(axis=1, keepdims=True))
        policies[f"Boltzmann {temperature}"] = weights / weights.sum(axis=1, keepdims=True)
    return policies


def draw_log(model, probabilities: np.ndarray, rounds: int, rng) -> tuple[estimators.Feedback, np.ndarray]:
    users = rng.integers(len(probabilities), size=rounds)
    actions = (rng.random((rounds, 1)) > probabilities[users].cumsum(axis=1)).sum(axis=1)
    actions = np.minimum(actions, probabilities.shape[1] - 1)  # a cumulative sum a hair below 1
    return estimators.Feedback(model.user_features[users], actions, model.rewards[users, actions],
                               probabilities[users, actions]), users


# Data-driven selection against every fixed value it chooses among: (family, tuned estimator, hyperparameter).
SELECTIONS = (("switch_dr", "switch_dr_tuned", "tau"), ("dr_os", "dr_os_tuned", "lambda_"))


def scorers_of(num_actions: int) -> dict[str, estimators.Estimator]:
    """Every registered estimator at its defaults, the tuned ones by either rule, and each fixed
    value the tuned ones choose among, labelled `<family> <hyperparameter>=<value>`."""
    scorers = {name: estimator().for_actions(num_actions) for name, estimator in estimators.ESTIMATORS.items()}
    for family, tuned, hyperparameter in SELECTIONS:
        scorers[f"{tuned} mse"] = estimators.ESTIMATORS[tuned](rule="mse")
        for value in estimators.ESTIMATORS[tuned]().candidates:
            scorers[f"{family} {hyperparameter}={value:g}"] = estimators.ESTIMATORS[family](**{hyperparameter: value})
    return scorers


def study(model, choices, sizes: list[int], seeds: int) -> pd.DataFrame:
    num_actions = model.rewards.shape[1]
    truth = model.value_of(choices)
    scorers = scorers_of(num_actions)
    rows = []
    for name, probabilities in logging_policies(model, np.random.default_rng(1234)).items():
        for rounds in sizes:
            estimates = {label: [] for label in scorers}
            for seed in range(seeds):
                feedback, users = draw_log(model, probabilities, rounds, np.random.default_rng(seed))
                terms = estimators.deterministic_target_terms(feedback, choices[users], num_actions, RIDGE, FOLDS)
                for label, scorer in scorers.items():
                    estimates[label].append(scorer.estimate(terms))
            row = {"logging policy": name, "rounds": rounds}
            row.update({label: np.sqrt(np.mean((np.array(values) - truth) ** 2)) / truth
                        for label, values in estimates.items()})
            rows.append(row)
            log.info("%s, %d rounds: %s", name, rounds,
                     ", ".join(f"{e} {row[e]:.3f}" for e in estimators.ESTIMATORS))
    return pd.DataFrame(rows)


def selection_markdown(table: pd.DataFrame) -> str:
    """Per row and family: the relative RMSE of the value chosen per log (SLOPE, the MSE bound)
    beside the fixed default's and the best fixed value's in hindsight."""
    lines = ["| logging policy | rounds | estimator | default | SLOPE | MSE bound | best fixed (value) |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for row in table.to_dict("records"):
        for family, tuned, hyperparameter in SELECTIONS:
            fixed = {label: row[label] for label in row if label.startswith(f"{family} {hyperparameter}=")}
            best = min(fixed, key=fixed.get)
            lines.append(f"| {row['logging policy']} | {row['rounds']:,} | {family} | {row[family]:.3f} | "
                         f"{row[tuned]:.3f} | {row[f'{tuned} mse']:.3f} | {fixed[best]:.3f} ({best.split('=')[1]}) |")
    return "\n".join(lines)


def study_figure(table: pd.DataFrame) -> Figure:
    policies = list(dict.fromkeys(table["logging policy"]))
    figure = Figure(figsize=(12, 6), layout="constrained")
    axes = figure.subplots(2, (len(policies) + 1) // 2, sharex=True, sharey=True).ravel()
    for axis, policy in zip(axes, policies):
        rows = table[table["logging policy"] == policy]
        for estimator in estimators.ESTIMATORS:
            axis.plot(rows.rounds, rows[estimator], marker="o", label=estimator)
        axis.set(title=policy, xscale="log", yscale="log")
        axis.grid(alpha=0.3)
    for axis in axes[len(policies):]:
        axis.set_visible(False)
    figure.supxlabel("logged rounds")
    figure.supylabel("relative RMSE against the true value")
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside right center")
    return figure


def markdown(table: pd.DataFrame) -> str:
    lines = ["| logging policy | rounds | " + " | ".join(estimators.ESTIMATORS) + " |",
             "|---|---:|" + "---:|" * len(estimators.ESTIMATORS)]
    for row in table.itertuples(index=False):
        values = [getattr(row, estimator) for estimator in estimators.ESTIMATORS]
        best = int(np.argmin(values))
        cells = [f"**{v:.3f}**" if i == best else f"{v:.3f}" for i, v in enumerate(values)]
        lines.append(f"| {row[0]} | {row[1]:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, help="MovieLens 100K directory; synthetic data when omitted")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--target-loops", type=int, default=2_000, help="LinUCB's training loops")
    parser.add_argument("--overhead-loops", type=int, default=2_000, help="timed engine loops per measurement")
    parser.add_argument("--rank-k", type=int, nargs="+", default=[20, 5], help="observed feature ranks to study")
    parser.add_argument("--figure", type=Path, help="save the study's plot here, one file per rank (_k<rank>)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    with tempfile.TemporaryDirectory() as scratch:
        if args.data_dir:
            data_overrides = [f"data.dir={args.data_dir.resolve()}"]
        else:
            directory = Path(scratch) / "ml-100k"
            data_overrides = [f"data.dir={directory}", checksum_override(write_movielens(directory))]
        base = compose_config("linucb", data_overrides)
        configure_threads(base.training.threads.intra_op, base.training.threads.inter_op)
        dataset = data.load(base.data)
        overhead = logging_overhead(data_overrides, dataset, args.overhead_loops)
        targets = {k: trained_target(data_overrides, dataset, args.target_loops, k) for k in args.rank_k}
    tables = {k: study(*targets[k], args.sizes, args.seeds) for k in args.rank_k}
    print("\nLogging overhead (compiled engine, interactions/s; target: at most 20% slower)\n")
    print("| agent | logging off | logging on | slowdown |\n|---|---:|---:|---:|")
    for row in overhead.itertuples(index=False):
        print(f"| {row.agent} | {row.off_per_s:,.0f} | {row.on_per_s:,.0f} | {row.slowdown:.1%} |")
    for k, table in tables.items():
        print(f"\nEstimator study, rank_k={k} of a rank-20 reward: relative RMSE over {args.seeds} seeds; "
              f"target LinUCB after {args.target_loops} loops; data: {args.data_dir or 'synthetic'}\n")
        print(markdown(table))
        print(f"\nSelection of switch_dr's tau and dr_os's lambda per log, rank_k={k}: relative RMSE\n")
        print(selection_markdown(table))
        if args.figure:
            path = args.figure.with_stem(f"{args.figure.stem}_k{k}")
            study_figure(table).savefig(path, dpi=110)
            log.info("Wrote %s", path)


if __name__ == "__main__":
    main()
