"""Interactions per second: TF-Agents' stock eager pattern against our compiled engine.

    uv run python -m benchmarks.throughput --data-dir /path/to/ml-100k --out bench.json
    uv run python -m benchmarks.throughput --data-dir /path/to/ml-100k --agents linucb --movies 20 100 500 1682

Both sides run in this one process on the same MovieLens environment (synthetic data in a
temporary directory when `--data-dir` is not given), with the agent built from the same
`conf/agent/*.yaml`, so each row compares the training pattern, not the agent:
  linucb                   our vectorised LinUCB (the default agent)
  linucb_tf_agents         TF-Agents' LinearUCBAgent; its stock row is TF-Agents' own example
  lints                    our vectorised linear Thompson sampling
  lints_tf_agents          TF-Agents' LinearThompsonSamplingAgent
  neural_linucb            our vectorised NeuralLinUCB
  neural_linucb_tf_agents  TF-Agents' NeuralLinUCBAgent
  epsilon_greedy, neural_boltzmann, dropout_ts   TF-Agents' neural agents
  random                   the uniform baseline
A second table sets each vectorised agent against TF-Agents' class it replaces
(`<agent>_tf_agents`), in our engine and in the stock pattern.
Rates are measured after a warm-up (tracing, first-call allocations); the stock side runs
far fewer loops because it is ~500x slower. Regret is the mean per interaction over the
loops both sides ran, one seed each, so it agrees only within seed-to-seed noise (see
tests/test_engine.py for the multi-seed check). Peak RSS is `ru_maxrss`, the process's
high-water mark so far: each row shows the peak reached by the end of that measurement,
and the first measurement, TF-Agents' example size (320,000 interactions) with our LinUCB,
is taken first so its figure is that of a training run alone.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import tempfile
import time
from pathlib import Path

from src import tf_runtime  # noqa: F401,I001  (first: a quiet TensorFlow start-up)

import numpy as np
import tensorflow as tf
from omegaconf import DictConfig

from src import config, data, experiment
from src.data.synthetic import checksum_override, write_movielens
from src.engine import configure_threads
from src.stock_pattern import TimedRun, run_stock

log = logging.getLogger("benchmarks.throughput")

AGENTS = ("linucb", "linucb_tf_agents", "lints", "lints_tf_agents", "neural_linucb", "neural_linucb_tf_agents",
          "epsilon_greedy", "neural_boltzmann", "dropout_ts", "random")
REFERENCE_SUFFIX = "_tf_agents"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def compose_config(agent: str, data_overrides: list[str]) -> DictConfig:
    return config.compose([f"agent={agent}", *data_overrides])


def warmed_up(cfg: DictConfig, dataset):
    """The engine for `cfg` after one warm-up chunk that traces the compiled loop, and the
    chunk's regrets."""
    engine = experiment.assemble(cfg, dataset)
    return engine, [m.regret for m in engine.run(cfg.training.chunk_loops, cfg.training.chunk_loops)]


def timed(engine, loops: int, chunk: int) -> tuple[list[np.ndarray], float]:
    """Per-chunk regrets of `loops` more loops, and the seconds they took."""
    traced = engine.traces
    started = time.perf_counter()
    regret = [m.regret for m in engine.run(loops, chunk)]
    seconds = time.perf_counter() - started
    if engine.traces != traced:
        log.warning("%s retraced during the timed loops: the rate includes tracing", engine.agent.name)
    return regret, seconds


def interleaved_rates(engines: dict, loops: int, rounds: int, chunk: int, label: str) -> dict[object, list[float]]:
    """Each engine's interactions/s in each of `rounds` rounds, a round timing `loops` loops of
    every engine in turn, so that a busy machine slows them alike; in an order shuffled each round
    (seeded), as four copies of one engine timed in a fixed order ran 52-63 thousand a second by
    their place in the round."""
    rates = {name: [] for name in engines}
    names, rng = list(engines), np.random.default_rng(0)
    for round_ in range(rounds):
        for name in (names[index] for index in rng.permutation(len(names))):
            _, seconds = timed(engines[name], loops, chunk)
            rates[name].append(loops * engines[name].interactions_per_loop / seconds)
        log.info("%s: round %d of %d done", label, round_ + 1, rounds)
    return rates


def run_ours(cfg: DictConfig, dataset, loops: int) -> TimedRun:
    """`loops` timed loops after one warm-up chunk that traces the compiled loop."""
    engine, warm_up_regret = warmed_up(cfg, dataset)
    regret, seconds = timed(engine, loops, cfg.training.chunk_loops)
    return TimedRun(np.concatenate(warm_up_regret + regret), seconds, loops, engine.interactions_per_loop)


def run_example_size(cfg: DictConfig, dataset) -> dict:
    """TF-Agents' example, 20,000 loops x 2 steps x batch 8, end to end as `src.train` times it."""
    engine = experiment.assemble(cfg, dataset)
    started = time.perf_counter()
    regret = np.concatenate([m.regret for m in engine.run(cfg.training.loops, cfg.training.chunk_loops)])
    seconds = time.perf_counter() - started
    interactions = cfg.training.loops * engine.interactions_per_loop
    return {"interactions": interactions, "seconds": seconds, "per_s": interactions / seconds,
            "final_regret": float(regret[-100:].mean() / engine.interactions_per_loop)}


def measure(agent: str, data_overrides: list[str], dataset, data_file: Path,
            stock_loops: int, stock_warmup: int, ours_loops: int) -> dict:
    cfg = compose_config(agent, data_overrides)
    training = cfg.training
    log.info("%s: ours, %d loops after a %d-loop warm-up", agent, ours_loops, training.chunk_loops)
    ours = run_ours(cfg, dataset, ours_loops)
    log.info("%s: ours %.0f interactions/s; stock, %d loops (%d warm-up)",
             agent, ours.interactions_per_s, stock_loops, stock_warmup)
    stock = run_stock(cfg.agent, data_file, num_movies=cfg.env.num_movies, rank_k=cfg.env.rank_k,
                      batch_size=training.batch_size, steps_per_loop=training.steps_per_loop,
                      loops=stock_loops, seed=training.seed, warmup_loops=stock_warmup)
    log.info("%s: stock %.1f interactions/s", agent, stock.interactions_per_s)
    per_loop = stock.interactions_per_loop
    return {
        "agent": agent,
        "stock_per_s": stock.interactions_per_s,
        "ours_per_s": ours.interactions_per_s,
        "speedup": ours.interactions_per_s / stock.interactions_per_s,
        "stock_regret": float(stock.regret.mean() / per_loop),
        "ours_regret": float(ours.regret[:stock_loops].mean() / per_loop),
        "ours_final_regret": float(ours.regret[-100:].mean() / per_loop),
        "regret_interactions": stock_loops * per_loop,
        "stock_loops": stock_loops,
        "ours_loops": len(ours.regret),
        "peak_rss_mb": peak_rss_mb(),
    }


def table(rows: list[dict], example: dict) -> str:
    compared = rows[0]["regret_interactions"]
    lines = [
        "| agent | stock (interactions/s) | ours (interactions/s) | speedup | "
        f"regret stock / ours (first {compared:,} interactions) | ours, last 100 loops | peak RSS (MB) |",
        "|---|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['agent']} | {r['stock_per_s']:,.0f} | {r['ours_per_s']:,.0f} | "
                     f"{r['speedup']:,.0f}x | {r['stock_regret']:.3f} / {r['ours_regret']:.3f} | "
                     f"{r['ours_final_regret']:.3f} | {r['peak_rss_mb']:,.0f} |")
    lines.append(f"| linucb, {example['interactions']:,} interactions (TF-Agents' example size) | | "
                 f"{example['per_s']:,.0f} | | | {example['final_regret']:.3f} | {example['peak_rss_mb']:,.0f} |")
    return "\n".join(lines)


def against_tf_agents(by_agent: dict[str, dict]) -> list[dict]:
    """Each vectorised agent's rate against its TF-Agents class (`<agent>_tf_agents`), where
    both were measured: in our engine (what vectorising buys) and in the stock pattern (all of it)."""
    return [{"agent": agent, "ours_per_s": row["ours_per_s"], "reference": agent + REFERENCE_SUFFIX,
             "reference_engine_per_s": by_agent[agent + REFERENCE_SUFFIX]["ours_per_s"],
             "reference_stock_per_s": by_agent[agent + REFERENCE_SUFFIX]["stock_per_s"]}
            for agent, row in by_agent.items() if agent + REFERENCE_SUFFIX in by_agent]


def reference_table(pairs: list[dict]) -> str:
    lines = [
        "| agent | ours (interactions/s) | TF-Agents' class | in our engine | ratio | in the stock pattern | ratio |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for p in pairs:
        lines.append(f"| {p['agent']} | {p['ours_per_s']:,.0f} | {p['reference']} | {p['reference_engine_per_s']:,.0f} | "
                     f"{p['ours_per_s'] / p['reference_engine_per_s']:,.1f}x | {p['reference_stock_per_s']:,.0f} | "
                     f"{p['ours_per_s'] / p['reference_stock_per_s']:,.0f}x |")
    return "\n".join(lines)


def catalogue(agents: list[str], sizes: list[int], data_overrides: list[str], dataset, loops: int,
              repeats: int) -> list[dict]:
    """Our engine's rate for each agent with `env.num_movies` at each size (no stock side: at
    1,682 movies TF-Agents' pattern would take hours): the best of `repeats` timings of
    `loops` loops on one engine after its warm-up, since this machine's speed varies by tens
    of percent from one minute to the next. The timings follow each other on one engine that
    keeps learning, so a later one may differ also because the agent does (LinUCB's first
    loops, when few movies are tried, are its fastest)."""
    rows = []
    for movies in sizes:
        for agent in agents:
            cfg = compose_config(agent, [*data_overrides, f"env.num_movies={movies}"])
            log.info("%s with %d movies: best of %d x %d loops", agent, movies, repeats, loops)
            engine, _ = warmed_up(cfg, dataset)
            rates = [loops * engine.interactions_per_loop / timed(engine, loops, cfg.training.chunk_loops)[1]
                     for _ in range(repeats)]
            rows.append({"agent": agent, "movies": movies, "per_s": max(rates), "all_per_s": rates,
                         "peak_rss_mb": peak_rss_mb()})
    return rows


def catalogue_table(rows: list[dict]) -> str:
    """Interactions/s per agent and catalogue size, and the cost per interaction at the largest
    size against the smallest."""
    sizes = sorted({r["movies"] for r in rows})
    rate = {(r["agent"], r["movies"]): r["per_s"] for r in rows}
    lines = ["| agent | " + " | ".join(f"{size:,} movies (/s)" for size in sizes) +
             f" | cost per interaction, {sizes[-1]:,} against {sizes[0]:,} |",
             "|---|" + "---:|" * (len(sizes) + 1)]
    for agent in dict.fromkeys(r["agent"] for r in rows):
        lines.append(f"| {agent} | " + " | ".join(f"{rate[agent, size]:,.0f}" for size in sizes) +
                     f" | {rate[agent, sizes[0]] / rate[agent, sizes[-1]]:,.1f}x |")
    return "\n".join(lines) + f"\n\nProcess peak RSS after the last size: {rows[-1]['peak_rss_mb']:,.0f} MB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, help="MovieLens 100K directory; synthetic data when omitted")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    parser.add_argument("--agents", nargs="+", default=list(AGENTS), choices=AGENTS)
    parser.add_argument("--stock-loops", type=int, default=100, help="stock loops, warm-up included")
    parser.add_argument("--stock-warmup", type=int, default=10)
    parser.add_argument("--ours-loops", type=int, default=3000, help="timed loops of our engine")
    parser.add_argument("--movies", nargs="+", type=int, default=[],
                        help="also time our engine at these catalogue sizes (env.num_movies), e.g. 20 100 500 1682")
    parser.add_argument("--catalogue-agents", nargs="+", default=["linucb", "epsilon_greedy", "random"],
                        choices=AGENTS, help="agents of the catalogue table (default: %(default)s)")
    parser.add_argument("--catalogue-loops", type=int, default=1000, help="loops per timing at each catalogue size")
    parser.add_argument("--catalogue-repeats", type=int, default=3, help="timings per catalogue size; the best counts")
    args = parser.parse_args()
    if not 0 <= args.stock_warmup < args.stock_loops or args.ours_loops < 100:
        parser.error("need 0 <= --stock-warmup < --stock-loops and --ours-loops >= 100")
    if args.catalogue_repeats < 1 or args.catalogue_loops < 1:
        parser.error("need --catalogue-repeats >= 1 and --catalogue-loops >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    # The stock trainer logs every metric every loop through absl, and TF-Agents' eager
    # metrics retrace by design; both would bury the progress lines.
    logging.getLogger("absl").setLevel(logging.WARNING)
    tf.get_logger().setLevel(logging.ERROR)

    with tempfile.TemporaryDirectory() as scratch:
        if args.data_dir:
            data_dir, data_overrides = args.data_dir.resolve(), [f"data.dir={args.data_dir.resolve()}"]
        else:
            data_dir = Path(scratch) / "ml-100k"
            data_overrides = [f"data.dir={data_dir}", checksum_override(write_movielens(data_dir))]
            log.info("No --data-dir: synthetic MovieLens-format data in %s", data_dir)
        base = compose_config("linucb", data_overrides)
        # The pools must be sized before TensorFlow's first op; both sides share them.
        configure_threads(base.training.threads.intra_op, base.training.threads.inter_op)
        dataset = data.load(base.data)
        log.info("Our LinUCB at TF-Agents' example size: %d loops", base.training.loops)
        example = run_example_size(base, dataset)
        example["peak_rss_mb"] = peak_rss_mb()
        log.info("%d interactions in %.1f s (%.0f/s), peak RSS %.0f MB", example["interactions"],
                 example["seconds"], example["per_s"], example["peak_rss_mb"])
        rows = [measure(agent, data_overrides, dataset, data_dir / "u.data", args.stock_loops,
                        args.stock_warmup, args.ours_loops) for agent in args.agents]
        sizes = catalogue(args.catalogue_agents, args.movies, data_overrides, dataset, args.catalogue_loops,
                          args.catalogue_repeats)

    by_agent = {r["agent"]: r for r in rows}
    if "linucb" in by_agent:
        by_agent["linucb"].update(example_seconds=example["seconds"], example_interactions=example["interactions"],
                                  example_per_s=example["per_s"], example_peak_rss_mb=example["peak_rss_mb"])
    pairs = against_tf_agents(by_agent)
    for pair in pairs:
        by_agent[pair["agent"]].update(speedup_vs_tf_agents_engine=pair["ours_per_s"] / pair["reference_engine_per_s"],
                                       speedup_vs_tf_agents_stock=pair["ours_per_s"] / pair["reference_stock_per_s"])
    print(f"\nMachine: {os.cpu_count()} CPU cores, GPUs: {len(tf.config.list_physical_devices('GPU'))}; "
          f"TensorFlow {tf.__version__}; data: {args.data_dir or 'synthetic'}\n")
    print(table(rows, example))
    if pairs:
        print(f"\nVectorised agents against TF-Agents' classes:\n\n{reference_table(pairs)}")
    print(f"\nTF-Agents' example size, our LinUCB: {example['interactions']:,} interactions in "
          f"{example['seconds']:.1f} s including tracing (target < 30 s); "
          f"process peak RSS {peak_rss_mb():,.0f} MB (target < 1,500)")
    if sizes:
        print(f"\nThe catalogue, our engine:\n\n{catalogue_table(sizes)}")
    if args.out:
        args.out.write_text(json.dumps({"agents": rows, "catalogue": sizes}, indent=2) + "\n")
        log.info("Wrote %s", args.out)


if __name__ == "__main__":
    main()
