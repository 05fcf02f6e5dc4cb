"""What `training.jit_compile=true` buys: each agent XLA can compile, with and without XLA, on
`env=movielens` and `env=movielens_per_arm`, in interleaved rounds of one process.

    uv run python -m benchmarks.xla --data-dir /path/to/ml-100k
    uv run python -m benchmarks.xla --data-dir /path/to/ml-100k --agents epsilon_greedy --envs movielens_per_arm

After a warm-up chunk (tracing, and XLA's compilation), every round times `--loops` loops of both
engines in an order shuffled each round; the table gives each side's median rate and the median
and range over rounds of the ratio (XLA over plain, same round). "repeats" says whether a second
compiled engine of the same seed trained the same warm-up to the digit, as a run must.
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
from src.cli import exit_on_user_error
from src.engine import configure_threads

AGENTS = ("epsilon_greedy", "neural_boltzmann", "dropout_ts", "random")
ENVIRONMENTS = ("movielens", "movielens_per_arm")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True, help="MovieLens 100K directory")
    parser.add_argument("--agents", nargs="+", default=list(AGENTS))
    parser.add_argument("--envs", nargs="+", default=list(ENVIRONMENTS))
    parser.add_argument("--loops", type=int, default=2000, help="loops timed per engine and round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    rows = []
    for agent in args.agents:
        for env in args.envs:
            base = [f"agent={agent}", f"env={env}", f"data.dir={args.data_dir.resolve()}"]
            plain, compiled = (config.compose([*base, f"training.jit_compile={jit}"]) for jit in ("false", "true"))
            if env == "movielens_per_arm" and not plain.agent.get("per_arm"):
                continue
            with exit_on_user_error():  # an agent XLA cannot compile: one line, not TensorFlow's page
                config.check_run(compiled)
            configure_threads(plain.training.threads.intra_op, plain.training.threads.inter_op)
            dataset = data.load(plain.data)
            engines, warm_ups = {}, {}
            for name, cfg in (("plain", plain), ("xla", compiled), ("xla again", compiled)):
                engines[name], warm_ups[name] = warmed_up(cfg, dataset)
            repeats = np.array_equal(np.concatenate(warm_ups["xla"]), np.concatenate(warm_ups["xla again"]))
            del engines["xla again"]
            rates = interleaved_rates(engines, args.loops, args.rounds, plain.training.chunk_loops, f"{agent} on {env}")
            ratios = np.divide(rates["xla"], rates["plain"])
            rows.append({"agent": agent, "env": env, "plain": np.median(rates["plain"]), "xla": np.median(rates["xla"]),
                         "ratio": np.median(ratios), "lowest": ratios.min(), "highest": ratios.max(),
                         "repeats": "yes" if repeats else "NO"})
    print(f"\nInteractions/s, median of {args.rounds} interleaved rounds of {args.loops:,} loops; ratio XLA / plain "
          f"of the same round, median and range over rounds\n")
    print(pd.DataFrame(rows).to_string(index=False, formatters={**dict.fromkeys(("plain", "xla"), "{:,.0f}".format),
                                                                 **dict.fromkeys(("ratio", "lowest", "highest"),
                                                                                 "{:.2f}x".format)}))
    print("\nThe table above is the result (nothing is written); rerun to reproduce.")


if __name__ == "__main__":
    main()
