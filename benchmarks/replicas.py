"""Replica groups against the same runs one after another: aggregate interactions/s, exactness,
memory, and the wall time of the commands a user types.

    uv run python -m benchmarks.replicas --data-dir /path/to/ml-100k
    uv run python -m benchmarks.replicas --data-dir /path/to/ml-100k --cli   # also 10 src.train runs vs 1 group

In one process: for each agent and catalogue, a group of `--replicas` runs (seeds 0..R-1) and
the R runs alone, each warmed up (traced) first; every round times `--loops` loops of the R runs
one after another, then of the group, so a busy machine slows both alike. The table gives the
median aggregate rate over rounds and the ratio. Exactness: after the rounds every run alone and
its replica have run the same loops, and their cumulative regrets must be equal to the digit.
Peak memory is the process's high-water mark after the first group alone has trained its
320,000 interactions per replica (TF-Agents' example size), before anything else is built.
Targets (issue: replicas): LinUCB >= 4x, every agent >= 2x, a group of 10 <= 2 GB.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from src import tf_runtime  # noqa: F401,I001  (first: a quiet TensorFlow start-up)

import numpy as np
import pandas as pd

from benchmarks.throughput import peak_rss_mb
from src import config, data, experiment
from src.engine import configure_threads
from src.replicas import Alone, Group, each_dataset
from src.paths import PROJECT_ROOT

log = logging.getLogger("benchmarks.replicas")

CATALOGUES = {"20 movies": [], "1,682 movies": ["env=movielens_catalogue"],
              "per-arm, 20 of 1,682": ["env=movielens_per_arm"]}


def cumulative(engine, loops: int, chunk: int, totals: np.ndarray) -> float:
    """Run `loops` loops, adding each replica's regret to `totals`; the seconds it took."""
    started = time.perf_counter()
    for chunks in engine.run_replicas(loops, chunk):
        totals += [chunk_metrics.regret.sum() for chunk_metrics in chunks]
    return time.perf_counter() - started


def measure(agent: str, catalogue: list[str], data_dir: Path, replicas: int, loops: int, rounds: int) -> dict:
    base = [f"agent={agent}", f"data.dir={data_dir}", *catalogue]
    chunk = config.compose(base).training.chunk_loops
    members = [config.compose([*base, f"training.seed={seed}", f"training.loops={chunk + rounds * loops}"])
               for seed in range(replicas)]
    datasets = each_dataset(members)
    group = Group(members, datasets)
    group_rounds = group.run()
    alone = [Alone(member, datasets[0]).engine for member in members]  # traced under its seed, as a run alone
    group_regret, alone_regret = np.zeros(replicas), np.zeros(replicas)

    def grouped(chunks: int) -> float:
        started = time.perf_counter()
        for _ in range(chunks):
            for index, chunk_metrics in next(group_rounds).items():
                group_regret[index] += chunk_metrics.regret.sum()
        return time.perf_counter() - started

    grouped(1)  # the warm-up: tracing
    for seed, engine in enumerate(alone):
        cumulative(engine, chunk, chunk, alone_regret[seed:seed + 1])
    sequential, together = [], []
    interactions = replicas * loops * group.interactions_per_loop(0)
    for round_ in range(rounds):
        seconds = sum(cumulative(engine, loops, chunk, alone_regret[seed:seed + 1])
                      for seed, engine in enumerate(alone))
        sequential.append(interactions / seconds)
        together.append(interactions / grouped(loops // chunk))
        log.info("%s, %s: round %d of %d: sequential %.0f/s, grouped (%s) %.0f/s", agent, catalogue or "20 movies",
                 round_ + 1, rounds, sequential[-1], group.describe(), together[-1])
    return {"sequential": float(np.median(sequential)), "grouped": float(np.median(together)),
            "exact": bool(np.array_equal(group_regret, alone_regret))}


def example_size_memory(agent: str, data_dir: Path, replicas: int) -> tuple[float, float]:
    """Seconds and peak RSS (MB) of a group training TF-Agents' example size (20,000 loops)."""
    cfg = config.compose([f"agent={agent}", f"data.dir={data_dir}", f"training.replicas={replicas}"])
    engine = experiment.assemble(cfg, data.load(cfg.data))
    totals = np.zeros(replicas)
    seconds = cumulative(engine, cfg.training.loops, cfg.training.chunk_loops, totals)
    return seconds, peak_rss_mb()


def cli_wall_times(agent: str, data_dir: Path, replicas: int) -> tuple[float, float]:
    """Wall seconds of `replicas` tracked `src.train agent=<agent>` runs (default size) one after
    another, and of one `src.train training.replicas=<replicas>`, each on a store of its own."""
    def train(store: Path, *overrides: str) -> float:
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "src.train", f"agent={agent}", f"data.dir={data_dir}",
                        f"tracking.uri=sqlite:///{store}",
                        f"hydra.run.dir={store.parent / 'hydra'}", *overrides], check=True, cwd=PROJECT_ROOT,
                       capture_output=True, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})
        return time.perf_counter() - started

    with tempfile.TemporaryDirectory() as scratch:
        log.info("%d src.train agent=%s runs one after another", replicas, agent)
        one_by_one = sum(train(Path(scratch) / "alone.db", f"training.seed={seed}") for seed in range(replicas))
        log.info("one src.train training.replicas=%d", replicas)
        grouped = train(Path(scratch) / "group.db", f"training.replicas={replicas}")
    return one_by_one, grouped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True, help="MovieLens 100K directory")
    parser.add_argument("--agents", nargs="+", default=list(config.REPLICATED_AGENTS),
                        help="agents to time (others than LinUCB and LinTS train a chunk each in turn, in threads)")
    parser.add_argument("--catalogues", nargs="+", default=list(CATALOGUES), choices=list(CATALOGUES))
    parser.add_argument("--replicas", type=int, default=10)
    parser.add_argument("--loops", type=int, default=1000, help="loops timed per run and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cli", nargs="*", metavar="AGENT",
                        help="also time the commands end to end for these agents (default: linucb epsilon_greedy; "
                             "a few minutes each)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    data_dir = args.data_dir.resolve()
    first = config.compose([f"data.dir={data_dir}"])
    if args.loops % first.training.chunk_loops:
        parser.error(f"--loops must be a multiple of training.chunk_loops={first.training.chunk_loops}")
    configure_threads(first.training.threads.intra_op, first.training.threads.inter_op)
    log.info("A group of %d LinUCB runs at TF-Agents' example size, first, for its peak memory", args.replicas)
    seconds, peak = example_size_memory("linucb", data_dir, args.replicas)
    rows = [{"agent": agent, "catalogue": name,
             **measure(agent, overrides, data_dir, args.replicas, args.loops, args.rounds)}
            for agent in args.agents for name, overrides in CATALOGUES.items() if name in args.catalogues]
    table = pd.DataFrame(rows)
    table["ratio"] = table.grouped / table.sequential
    print(f"\nAggregate interactions/s of {args.replicas} runs, one after another and as one group: median of "
          f"{args.rounds} interleaved rounds of {args.loops:,} loops each (2 steps x batch 8)\n")
    print(table[["agent", "catalogue", "sequential", "grouped", "ratio", "exact"]].to_string(
        index=False, formatters={"sequential": "{:,.0f}".format, "grouped": "{:,.0f}".format,
                                 "ratio": "{:.2f}x".format}))
    print(f"\nA group of {args.replicas} LinUCB runs x 320,000 interactions: {seconds:.1f} s of training, "
          f"peak RSS {peak:,.0f} MB (target <= 2,048)")
    if args.cli is not None:
        print()
        for agent in args.cli or ["linucb", "epsilon_greedy"]:
            one_by_one, grouped = cli_wall_times(agent, data_dir, args.replicas)
            print(f"{args.replicas} tracked `src.train agent={agent}` runs (default size, policies saved): "
                  f"{one_by_one:.0f} s one after another, {grouped:.0f} s as one "
                  f"`training.replicas={args.replicas}` ({one_by_one / grouped:.1f}x)")
    print("\nThe tables above are the result (nothing is kept); rerun to reproduce.")


if __name__ == "__main__":
    main()
