"""Is the promotion gate right? Retraining rounds on simulated decision logs, many seeds.

    uv run python -m benchmarks.gate --data-dir /path/to/ml-100k --seeds 10
    uv run python -m benchmarks.gate --data-dir /path/to/ml-100k --seeds 50 --scenarios even

Each round is what `src.retrain` does after the HTTP and MLflow parts: a champion serves with
epsilon-greedy exploration (as `src.serve` does, exact propensities), its decisions are drawn in
NumPy from the environment (users uniform, rewards from the reward model), the challenger
learns offline on all but the latest `holdout_share` of them (`src.retrain.challenge`, the
same code) and the gate decides on the rest. Scenarios, on the default environment (20 movies,
rank 20), on real MovieLens 100K and on synthetic data:

  worse       champion LinUCB trained online, challenger the random agent: must be refused, every seed
  better      champion a random policy (a fixed random movie per user), challenger LinUCB: promoted in
              >= 9 of 10
  peer        champion LinUCB trained online, challenger LinUCB (alpha 0.1) learnt from its logs: small
              true differences, where a loose gate would promote a worse policy
  optimistic  the same with LinUCB's default alpha (10): learnt from logs that rarely show most movies,
              its bonus sends it to exactly those, far worse than the champion; the gate must refuse it
  even        the peer scenario against a champion trained 10 times longer, about as good as the
              challenger: the true differences straddle 0, and the gate must promote a challenger that
              is not better in at most about 1 - confidence of the rounds
  coin        (not run unless named) the random agent against a random champion: either is better by
              chance, by a few hundredths; on small logs (--rounds 100 --min-holdout 0) this is where an
              asymptotic bound's coverage fails, and what retrain's min_holdout is set from

Every round also checks the bound itself: the true difference (exact, from the simulator) lies
above the gate's lower bound in about `confidence` of all rounds, and a truly worse challenger
is promoted in at most about 1 - confidence of the rounds that have one.
"""

from __future__ import annotations

import argparse
import logging
import time

from src import tf_runtime  # noqa: F401,I001  (first: a quiet TensorFlow start-up)

import numpy as np
import pandas as pd

from src import config, data, experiment, retrain, training
from src.engine import configure_threads
from src.evaluation import estimators, offline

log = logging.getLogger("benchmarks.gate")

SCENARIOS = {  # name: (champion, its online loops in units of --champion-loops, the challenger's overrides)
    "worse": ("linucb", 1, ["agent=random"]),
    "better": ("random", 0, ["agent=linucb"]),
    "peer": ("linucb", 1, ["agent=linucb", "agent.alpha=0.1"]),
    "optimistic": ("linucb", 1, ["agent=linucb"]),
    "even": ("linucb", 10, ["agent=linucb", "agent.alpha=0.1"]),
    "coin": ("random", 0, ["agent=random"]),
}
DEFAULT_SCENARIOS = "worse,better,peer,optimistic,even"


def champion_choices(kind: str, data_overrides: list[str], dataset, reward_model, seed: int,
                     loops: int) -> np.ndarray:
    """Each user's movie under the champion: LinUCB trained online for `loops` loops, or a random
    movie per user (what a served random agent's single draw is)."""
    if kind == "random":
        return np.random.default_rng(seed).integers(len(reward_model.movie_ids), size=len(reward_model.user_ids))
    cfg = config.compose([*data_overrides, "agent=linucb", f"training.seed={seed}", f"training.loops={loops}"])
    engine, _ = training.fit(cfg, dataset)
    return offline.greedy_choices(engine.agent.policy, engine.environment.reward_model)


def decision_log(reward_model, champion: np.ndarray, rounds: int, epsilon: float,
                 rng: np.random.Generator) -> tuple[estimators.Feedback, np.ndarray]:
    """`rounds` decisions of the champion exploring uniformly with probability `epsilon`, and each
    round's user row: the service's epsilon exploration, its propensities exact."""
    users, movies = reward_model.rewards.shape
    rows = rng.integers(users, size=rounds)
    actions = np.where(rng.random(rounds) < epsilon, rng.integers(movies, size=rounds), champion[rows])
    propensities = epsilon / movies + (1 - epsilon) * (actions == champion[rows])
    feedback = estimators.Feedback(reward_model.user_features[rows].astype(np.float32), actions,
                                   reward_model.rewards[rows, actions], propensities)
    return feedback, rows


def round_of(scenario: str, data_overrides: list[str], dataset, seed: int, args) -> dict:
    """One retraining round of `scenario`: the gate's verdict beside the truth."""
    kind, loops, challenger = SCENARIOS[scenario]
    cfg = config.compose([*challenger, f"bootstrap.seed={seed}", f"bootstrap.samples={args.samples}",
                          f"interval={args.interval}",
                          *([] if args.min_holdout is None else [f"min_holdout={args.min_holdout}"])],
                         config_name="retrain")
    engine = experiment.assemble(config.compose([*data_overrides, *challenger, f"training.seed={seed}"]), dataset)
    reward_model = engine.environment.reward_model
    champion = champion_choices(kind, data_overrides, dataset, reward_model, seed, loops * args.champion_loops)
    feedback, rows = decision_log(reward_model, champion, args.rounds, args.epsilon, np.random.default_rng(seed))
    held = round(args.rounds * cfg.holdout_share)
    train, holdout = np.arange(args.rounds - held), np.arange(args.rounds - held, args.rounds)
    choices, verdict = retrain.challenge(engine, feedback.take(train), feedback.take(holdout), rows[holdout],
                                         champion, cfg)
    truth = reward_model.value_of(choices) - reward_model.value_of(champion)
    return {"scenario": scenario, "seed": seed, "promoted": verdict.promote, "estimate": verdict.difference,
            "lower_bound": verdict.lower_bound, "true_difference": truth,
            "bound_held": verdict.lower_bound <= truth}


def table(rounds: pd.DataFrame) -> pd.DataFrame:
    return rounds.groupby(["data", "scenario"], sort=False).agg(
        seeds=("seed", "size"), promoted=("promoted", "sum"), true_difference=("true_difference", "mean"),
        estimate=("estimate", "mean"), lower_bound=("lower_bound", "mean"), bound_held=("bound_held", "sum"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", help="MovieLens 100K directory; omitted: synthetic data only")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=10_000, help="decisions logged by the champion")
    parser.add_argument("--epsilon", type=float, default=0.1, help="the service's exploration")
    parser.add_argument("--champion-loops", type=int, default=500, help="online loops of the LinUCB champion")
    parser.add_argument("--samples", type=int, default=2000, help="bootstrap resamples")
    parser.add_argument("--interval", default="bootstrap", help="the gate's bound (conf/retrain.yaml): %(default)s")
    parser.add_argument("--min-holdout", type=int, help="retrain's min_holdout (default: conf/retrain.yaml's)")
    parser.add_argument("--scenarios", default=DEFAULT_SCENARIOS,
                        help=f"comma-separated, of: {', '.join(SCENARIOS)} (default: %(default)s)")
    parser.add_argument("--out", help="CSV of every round")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    configure_threads(1, 2)
    datasets = {"synthetic": ["data=synthetic"]}
    if args.data_dir:
        datasets = {"movielens": [f"data.dir={args.data_dir}"], **datasets}
    rows = []
    started = time.perf_counter()
    for name, overrides in datasets.items():
        dataset = data.load(config.compose(overrides).data)
        for scenario in args.scenarios.split(","):
            for seed in range(args.seeds):
                rows.append({"data": name, **round_of(scenario, overrides, dataset, seed, args)})
                log.info("%s", rows[-1])
    rounds = pd.DataFrame(rows)
    if args.out:
        rounds.to_csv(args.out, index=False)
    print(f"{args.rounds:,} decisions a round (epsilon {args.epsilon}), the latest 30% held out; the gate's bound: "
          f"{args.interval} ({args.samples} resamples if bootstrap); {time.perf_counter() - started:.0f} s")
    print(table(rounds).to_string(float_format="{:+.4f}".format))
    not_better = rounds.true_difference <= 0
    print(f"the true difference was above the 95% lower bound in {rounds.bound_held.sum()} of {len(rounds)} "
          f"rounds ({rounds.bound_held.mean():.1%}); a challenger that was not better was promoted in "
          f"{(rounds.promoted & not_better).sum()} of the {not_better.sum()} rounds that had one")
    for name in datasets if {"worse", "better"} <= set(rounds.scenario) else ():
        of = rounds[rounds.data == name]
        worse, better = of[of.scenario == "worse"], of[of.scenario == "better"]
        print(f"{name}: worse challenger refused in {(~worse.promoted).sum()} of {len(worse)} (target: all); "
              f"better promoted in {better.promoted.sum()} of {len(better)} (target: >= 90%)")


if __name__ == "__main__":
    main()
