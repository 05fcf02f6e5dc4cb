"""A catalogue of 62,423 movies at MovieLens 25M's size: the per-arm environment's build time and
peak memory, and LinUCB's and LinTS's interactions/s against the same agents on a 1,682-movie
pool of the same data, in interleaved rounds of one process.

    uv run python -m benchmarks.large_catalogue
    uv run python -m benchmarks.large_catalogue --users 20000 --movies 8000 --ratings 2000000  # a quick look

The data is `data=synthetic` at the size asked (default MovieLens 25M's: 162,541 users, 62,423
movies, 25 million ratings), the environment `env=movielens_per_arm` with interaction features
(a candidate shows its 20 factors and their product with the user's) over every movie: ARPACK's
rank-20 SVD of the sparse ratings, rewards from the factors. Build time is the data's generation
and the environment's (the SVD), timed apart; peak memory is the process's high-water mark
(`ru_maxrss`) after the build, before any agent. Each agent then runs on both pools; after a
warm-up chunk (tracing), every round times `--loops` loops of each in turn, in an order shuffled
each round, so a busy machine slows them alike; the table gives the median rate over rounds and
its ratio to the small pool.
Targets (issue: more data): build <= 3 minutes and <= 8 GB peak on 2 cores; ratio >= 0.8.
"""

from __future__ import annotations

import argparse
import logging
import resource
import time

from src import tf_runtime  # noqa: F401,I001  (first: a quiet TensorFlow start-up)

import numpy as np
import pandas as pd

from benchmarks.throughput import interleaved_rates
from src import config, data
from src.agents import build_agent
from src.engine import Engine, configure_threads
from src.envs import build_environment
from src.envs.movielens_per_arm import CandidateSetRewardModel, MovieLensPerArmEnvironment
from src.envs.movielens import build_reward_model, fields_of

log = logging.getLogger("benchmarks.large_catalogue")


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=162_541)
    parser.add_argument("--movies", type=int, default=62_423)
    parser.add_argument("--ratings", type=int, default=25_000_000, help="pairs drawn (repeats merge)")
    parser.add_argument("--small-pool", type=int, default=1_682, help="the pool compared against")
    parser.add_argument("--agents", nargs="+", default=["linucb", "lints"])
    parser.add_argument("--loops", type=int, default=2000, help="loops timed per pool and round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    size = [f"data.num_users={args.users}", f"data.num_movies={args.movies}",
            f"data.density={args.ratings / (args.users * args.movies)}"]
    base = ["data=synthetic", *size, "env=movielens_per_arm", "env.arm_features=interaction"]
    first = config.compose(base)
    configure_threads(first.training.threads.intra_op, first.training.threads.inter_op)

    started = time.perf_counter()
    dataset = data.load(first.data)
    generated = time.perf_counter()
    log.info("%s ratings generated in %.0f s; building the environment (sparse SVD)", f"{len(dataset.ratings):,}",
             generated - started)
    large = build_environment(first, dataset).reward_model
    built = time.perf_counter()
    build = {"ratings": len(dataset.ratings), "data_s": generated - started, "environment_s": built - generated,
             "peak_gib": peak_gib()}
    log.info("environment of %d movies built in %.0f s; peak %.2f GiB", len(large.movie_ids), built - generated,
             build["peak_gib"])
    small = CandidateSetRewardModel(**fields_of(build_reward_model(
        dataset.ratings_matrix(), args.small_pool, first.env.rank_k, first.env.reward_rank)),
        num_actions=first.env.num_actions)
    pools = {len(large.movie_ids): large, args.small_pool: small}
    del dataset

    rows = []
    for agent in args.agents:
        cfg = config.compose([*base, f"agent={agent}"])
        engines = {}
        for pool, model in pools.items():
            environment = MovieLensPerArmEnvironment(model, cfg.training.batch_size, cfg.training.seed, "interaction")
            engine = Engine(environment, build_agent(cfg.agent, environment.time_step_spec(),
                                                     environment.action_spec(), cfg.training.seed),
                            cfg.training.steps_per_loop, seed=cfg.training.seed)
            list(engine.run(cfg.training.chunk_loops, cfg.training.chunk_loops))  # traces the compiled loop
            engines[pool] = engine
        rates = interleaved_rates(engines, args.loops, args.rounds, cfg.training.chunk_loops, agent)
        rows += [{"agent": agent, "pool": pool, "rate": np.median(rate)} for pool, rate in rates.items()]
    table = pd.DataFrame(rows).set_index(["agent", "pool"]).rate.unstack("pool").reindex(args.agents)
    table = table[[args.small_pool, len(large.movie_ids)]]
    table["ratio"] = table[len(large.movie_ids)] / table[args.small_pool]

    print(f"\nBuild at {args.users:,} users x {args.movies:,} movies, {build['ratings']:,} ratings (2 threads): "
          f"data {build['data_s']:.0f} s, environment (sparse SVD, rank {first.env.reward_rank}) "
          f"{build['environment_s']:.0f} s, total {build['data_s'] + build['environment_s']:.0f} s "
          f"(target <= 180); peak memory {build['peak_gib']:.2f} GiB (target <= 8)")
    print(f"\nInteractions/s per pool, median of {args.rounds} interleaved rounds of {args.loops:,} loops; ratio of "
          f"the {len(large.movie_ids):,}-movie pool to the {args.small_pool:,} (target >= 0.8)\n")
    print(table.to_string(float_format="{:,.2f}".format))
    print(f"\nPeak memory at the end: {peak_gib():.2f} GiB. The tables above are the result (nothing is written); "
          f"rerun to reproduce.")


if __name__ == "__main__":
    main()
