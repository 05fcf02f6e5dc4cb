"""Tracked against raw training speed: the share of the engine's speed a tracked run keeps.

    uv run python -m benchmarks.tracking_overhead --data-dir /path/to/ml-100k [overrides...]

For each agent, at TF-Agents' example size (20,000 loops x 16 interactions), in this one
process and alternating so that both sides see the same machine:
  raw      the compiled engine alone, end to end (tracing included), nothing recorded
  tracked  `src.training.train`, as `python -m src.train` runs it: every loop's metrics kept,
           logged to a fresh SQLite store at the default `tracking.log_every`, system metrics
           sampled; its `train/interactions_per_s` (the same span: first loop to last)
Best of `--repeats` each; `tracked / raw` is the share kept (the target is at least 0.8).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

from src import tf_runtime  # noqa: F401,I001  (first: a quiet TensorFlow start-up)

import mlflow

from src import config, data, experiment, metrics, training
from src.data.synthetic import checksum_override, write_movielens
from src.engine import configure_threads

log = logging.getLogger("benchmarks.tracking_overhead")

AGENTS = ("linucb", "epsilon_greedy", "random")


def raw_rate(cfg, dataset) -> float:
    configure_threads(cfg.training.threads.intra_op, cfg.training.threads.inter_op)  # as train() does
    engine = experiment.assemble(cfg, dataset)
    started = time.perf_counter()
    for _ in engine.run(cfg.training.loops, cfg.training.chunk_loops):
        pass
    return cfg.training.loops * engine.interactions_per_loop / (time.perf_counter() - started)


def tracked_rate(cfg) -> float:
    _, run_id = training.train(cfg)
    return mlflow.MlflowClient(cfg.tracking.uri).get_run(run_id).data.metrics[metrics.INTERACTIONS_PER_S]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", help="a local ml-100k directory (default: synthetic MovieLens-format files)")
    parser.add_argument("--agents", default=",".join(AGENTS), help="comma-separated (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--loops", type=int, default=20_000, help="training loops (default: TF-Agents' example)")
    parser.add_argument("overrides", nargs="*", help="more config overrides, e.g. tracking.log_every=100")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("src").setLevel(logging.WARNING)  # one line per measurement, not per run
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        if args.data_dir:
            data_overrides = [f"data.dir={args.data_dir}"]
        else:
            data_overrides = [f"data.dir={scratch}", checksum_override(write_movielens(scratch))]
        rows = []
        for agent in args.agents.split(","):
            raw, tracked = [], []
            for repeat in range(args.repeats):
                cfg = config.compose([f"agent={agent}", *data_overrides, f"training.loops={args.loops}",
                                      f"tracking.uri=sqlite:///{scratch / f'{agent}{repeat}.db'}",
                                      "tracking.save_policy=false", *args.overrides])
                raw.append(raw_rate(cfg, data.load(cfg.data)))
                tracked.append(tracked_rate(cfg))
                log.info("%s, repeat %d: raw %.0f/s, tracked %.0f/s", agent, repeat + 1, raw[-1], tracked[-1])
            rows.append((agent, max(raw), max(tracked)))
    print(f"\n{args.loops} loops x 16 interactions, best of {args.repeats}\n")
    print("| agent | raw (interactions/s) | tracked (interactions/s) | tracked / raw |")
    print("|---|---:|---:|---:|")
    for agent, raw, tracked in rows:
        print(f"| {agent} | {raw:,.0f} | {tracked:,.0f} | {tracked / raw:.2f} |")


if __name__ == "__main__":
    main()
