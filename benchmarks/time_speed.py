"""What time costs the compiled engine: interactions/s with drift, delayed feedback and arriving
movies on, against the stationary environment, in interleaved rounds of one process.

    uv run python -m benchmarks.time_speed --data-dir /path/to/ml-100k

Each setting is `env=movielens` (20 movies, or `--movies`) with overrides (arrivals: an action mask), or `env=movielens_per_arm` (20
candidates from 1,682 movies) with and without arrivals; each agent is built from its YAML.
After a warm-up chunk (tracing), every round times `--loops` loops of every setting in turn, so
a busy machine slows them alike, in an order shuffled each round; the table gives the median rate
over rounds, and the median and range over rounds of its ratio to the stationary rate of the same
environment in the same round. Target (issue: time): at least 0.8x.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from src import tf_runtime  # noqa: F401,I001  (first: a quiet TensorFlow start-up)

import numpy as np
import pandas as pd

from benchmarks.throughput import interleaved_rates, warmed_up
from src import config, data
from src.engine import configure_threads


SETTINGS = {
    "stationary": [],
    "drift=switch": ["env.drift=switch", "env.drift_period=20000"],
    "drift=rotate": ["env.drift=rotate", "env.drift_period=80000"],
    "arrivals": ["env.arrivals=first_rating"],  # from 5 movies, one more every 2,000 interactions: a mask
    "delay geometric 3": ["env.delay=geometric", "env.delay_loops=3"],
    "switch + delay + drop": ["env.drift=switch", "env.drift_period=20000", "env.delay=geometric",
                              "env.delay_loops=3", "env.feedback_drop=0.1"],
}
# Per-arm, against its own stationary run: the pool grows from 100 movies by one every 20
# interactions, or the tastes turn.
PER_ARM = {"per-arm stationary": ["env=movielens_per_arm"],
           "per-arm arrivals": ["env=movielens_per_arm", "env.arrivals=first_rating", "env.arrivals_start=100",
                                "env.arrivals_every=20"],
           "per-arm drift=rotate": ["env=movielens_per_arm", "env.drift=rotate", "env.drift_period=80000"]}
# The agents that can forget, and what forgetting costs them on the stationary environment.
FORGETTING = {"linucb": ["agent.discount=0.98"], "lints": ["agent.discount=0.98"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True, help="MovieLens 100K directory")
    parser.add_argument("--agents", nargs="+", default=["linucb", "epsilon_greedy"])
    parser.add_argument("--loops", type=int, default=2000, help="loops timed per setting and round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--movies", type=int, default=20,
                        help="env=movielens's catalogue (env.num_movies; the per-arm settings keep theirs)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    catalogue = [f"env.num_movies={args.movies}"]
    rows = []
    for agent in args.agents:
        settings = {**SETTINGS, **({"discount 0.98": FORGETTING[agent]} if agent in FORGETTING else {}), **PER_ARM}
        configs = {name: config.compose([f"agent={agent}", f"data.dir={args.data_dir.resolve()}",
                                         *([] if name in PER_ARM else catalogue), *overrides])
                   for name, overrides in settings.items()}
        first = next(iter(configs.values()))
        configure_threads(first.training.threads.intra_op, first.training.threads.inter_op)
        dataset = data.load(first.data)
        engines = {name: warmed_up(cfg, dataset)[0] for name, cfg in configs.items()}
        rates = interleaved_rates(engines, args.loops, args.rounds, first.training.chunk_loops, agent)
        for name, per_round in rates.items():
            baseline = rates["per-arm stationary" if name in PER_ARM else "stationary"]
            ratios = np.divide(per_round, baseline)  # each round's against the same round's stationary rate
            rows.append({"agent": agent, "setting": name, "rate": np.median(per_round), "ratio": np.median(ratios),
                         "lowest": ratios.min(), "highest": ratios.max()})
    print(f"\nInteractions/s, median of {args.rounds} interleaved rounds of {args.loops:,} loops; ratio to the "
          f"stationary rate of the same round, median and range over rounds (target >= 0.8)\n")
    print(pd.DataFrame(rows).to_string(index=False, formatters={"rate": "{:,.0f}".format, **dict.fromkeys(
        ("ratio", "lowest", "highest"), "{:.2f}".format)}))
    print("\nThe table above is the result (nothing is written); rerun to reproduce.")


if __name__ == "__main__":
    main()
