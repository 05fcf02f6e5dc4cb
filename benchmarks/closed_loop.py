"""Does the closed loop learn as well as training online? `src.pipeline` for some rounds from a
random champion, then its challenger trained online on as many interactions, in one run.

    uv run python -m benchmarks.closed_loop --data-dir /path/to/ml-100k --rounds 5

The loop (service, traffic, retraining rounds, as `src.pipeline` runs them with its defaults:
epsilon 0.1 exploration, 10% of the feedback dropped) serves `rounds` x `decisions_per_round`
recommendations; the same agent config as its challenger is then trained online in the
compiled loop for the same number of interactions, on the same environment, over `--seeds`
seeds. Both regrets are exact, from the simulator's reward model. The issue's target: the served
policy's regret per interaction in the last round within 1.5x of the online agent's over its
last round's worth of interactions.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from src import tf_runtime  # noqa: F401,I001  (first: a quiet TensorFlow start-up)

import numpy as np
import pandas as pd

from src import config, data, experiment, metrics, training
from src.engine import configure_threads
from src.evaluation import offline
from src.paths import PROJECT_ROOT

log = logging.getLogger("benchmarks.closed_loop")

TARGET_RATIO = 1.5


def run_pipeline(args, out: Path) -> pd.DataFrame:
    """The loop's rounds table, from a tracking store of its own (so its first champion is new)."""
    command = [sys.executable, "-m", "src.pipeline", f"rounds={args.rounds}",
               f"decisions_per_round={args.decisions_per_round}", f"data.dir={args.data_dir}",
               f"tracking.uri=sqlite:///{out / 'mlflow.db'}", f"out={out / 'pipeline'}"]
    log.info("Running %s", " ".join(command))
    subprocess.run(command, cwd=PROJECT_ROOT, check=True)
    return pd.read_csv(out / "pipeline" / "rounds.csv")


def online_regret(args, interactions: int, seed: int) -> dict[str, float]:
    """The challenger's agent trained online for `interactions`: its regret per interaction over
    the last round's worth of them and over all of them, its greedy policy's at the end, and the
    random policy's (for the cost of exploring)."""
    overrides = [f"data.dir={args.data_dir}", *args.challenger, f"training.seed={seed}"]
    dataset = data.load(config.compose(overrides).data)
    per_loop = experiment.assemble(config.compose(overrides), dataset).interactions_per_loop
    loops = -(-interactions // per_loop)
    fitting = training.Fitting.of(config.compose([*overrides, f"training.loops={loops}"]), dataset)
    fitting.run()
    frame = fitting.history.frame()
    last = frame[frame.step > loops * per_loop - args.decisions_per_round]
    reward_model = fitting.engine.environment.reward_model
    greedy = offline.greedy_choices(fitting.engine.agent.policy, reward_model)
    return {"seed": seed, "interactions": loops * per_loop, "last_round_regret": float(last[metrics.REGRET].mean()),
            "mean_regret": float(frame[metrics.CUMULATIVE_REGRET].iloc[-1] / (loops * per_loop)),
            "greedy_regret": float(reward_model.optimal_reward.mean()) - reward_model.value_of(greedy),
            "random_regret": reward_model.random_policy_regret}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="MovieLens 100K directory")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--decisions-per-round", type=int, default=3000)
    parser.add_argument("--seeds", type=int, default=5, help="seeds of the online agent")
    parser.add_argument("--epsilon", type=float, default=0.1, help="the service's exploration (conf/serve.yaml)")
    parser.add_argument("--challenger", nargs="*", default=["agent=linucb", "agent.alpha=0.01"],
                        help="the loop's challenger overrides (conf/pipeline.yaml's default)")
    parser.add_argument("--out", type=Path, help="folder for the loop's store and tables (default: a temporary one)")
    parser.add_argument("--loop-done", action="store_true",
                        help="the loop already ran into --out: compare its rounds.csv, do not run it again")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    out = args.out or Path(tempfile.mkdtemp(prefix="closed-loop-"))
    started = time.perf_counter()
    rounds = pd.read_csv(out / "pipeline" / "rounds.csv") if args.loop_done else run_pipeline(args, out)
    loop_seconds = time.perf_counter() - started
    interactions = int(rounds.decisions.sum())
    configure_threads(1, 2)
    online = pd.DataFrame([online_regret(args, interactions, seed) for seed in range(args.seeds)])
    print(rounds[["round", "served_versions", "decisions", "true_regret_served", "champion/true_regret",
                  "challenger/true_regret", "gate/difference", "gate/lower_bound", "gate/true_difference",
                  "decision"]].to_string(index=False, float_format="{:.4f}".format))
    served_last = float(rounds.true_regret_served.iloc[-1])
    greedy_last = float(rounds["challenger/true_regret"].where(rounds.decision == "promoted",
                                                                rounds["champion/true_regret"]).iloc[-1])
    online_last, online_mean = online.last_round_regret.mean(), online.mean_regret.mean()
    online_greedy, random_regret = online.greedy_regret.mean(), online.random_regret.iloc[0]
    loop_mean = float((rounds.true_regret_served * rounds.decisions).sum() / interactions)
    explored = args.epsilon * random_regret  # what serving with epsilon costs any policy, on top of (1 - epsilon) x its own
    online_explored = explored + (1 - args.epsilon) * online_greedy
    ran = "" if args.loop_done else f" in {loop_seconds:.0f} s"
    print(f"\nthe loop: {interactions:,} recommendations served{ran}; the online agent ({' '.join(args.challenger)}), "
          f"{args.seeds} seeds, {online.interactions.iloc[0]:,} interactions each; the random policy's regret "
          f"{random_regret:.4f}, so epsilon {args.epsilon} exploration costs {explored:.4f} a recommendation")
    print(f"regret per interaction, last {args.decisions_per_round:,}: loop served {served_last:.4f}; online agent "
          f"{online_last:.4f} ± {online.last_round_regret.std(ddof=1):.4f} (sd over seeds), not exploring by then")
    print(f"greedy policies at the end: the loop's champion {greedy_last:.4f}, the online agent's {online_greedy:.4f}")
    print(f"both served with the service's epsilon {args.epsilon}: loop {served_last:.4f} (measured), online "
          f"{online_explored:.4f} (exact): ratio {served_last / online_explored:.2f} (target <= {TARGET_RATIO})")
    print(f"regret per interaction over all {interactions:,}: loop {loop_mean:.4f} (its first round served the random "
          f"champion), online {online_mean:.4f}: ratio {loop_mean / online_mean:.2f}")
    promoted = rounds.decision == "promoted"
    falls = all(np.diff(rounds.true_regret_served.to_numpy())[promoted.to_numpy()[:-1]] < 0)
    print(f"served regret fell after every promotion: {falls}; tables in {out / 'pipeline'}")


if __name__ == "__main__":
    main()
