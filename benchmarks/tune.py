"""Fair tuning: every learning agent of the leaderboard's line-up tuned with the same budget on
every environment it runs in, each best configuration written to conf/tuned/<agent>-<env>.yaml.

    uv run python -m benchmarks.tune --data-dir /path/to/ml-100k
    uv run python -m benchmarks.tune --data-dir /path/to/ml-100k --agents lints --envs movielens

Each study is `./multirun.sh <agent> --workers W --trials N` on the agent's own search
(conf/hparams_search/<agent>.yaml: TPE, sampler seed 0, the rank-20 ground truth fixed), with
the same loops and seed for every trial of every agent. A study already complete is only read
again, so an interrupted tuning resumes. A tuned configuration is picked with
`python -m src.train tuned=<agent>-<env>`; the leaderboard lists it as its own entry.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess

import optuna

from src.campaigns import tuned
from src.cli import exit_on_user_error
from src.errors import UserError
from src.paths import PROJECT_ROOT

log = logging.getLogger("benchmarks.tune")


def study_name(agent: str, env: str) -> str:
    return f"tune-{agent}-{env}"


def tune(agent: str, env: str, args: argparse.Namespace) -> optuna.Study:
    name = study_name(agent, env)
    done = tuned.completed_trials(name, args.storage)
    if done < args.trials:
        log.info("Tuning %s on %s: %d trials of %d loops (%d complete so far)", agent, env, args.trials, args.loops,
                 done)
        command = [str(PROJECT_ROOT / "multirun.sh"), agent, "--workers", str(args.workers), "--trials",
                   str(args.trials), "--storage", args.storage, f"hydra.sweeper.study_name={name}", f"env={env}",
                   f"training.loops={args.loops}", "training.seed=0", f"tracking.experiment={args.experiment}",
                   *args.overrides]
        if subprocess.run(command, cwd=PROJECT_ROOT).returncode != 0:
            raise UserError(f"the study {name} did not complete; run the same command again to resume it")
    return optuna.load_study(study_name=name, storage=args.storage)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", help="a local ml-100k directory (default: download into data/ on first use)")
    parser.add_argument("--trials", type=int, default=40, help="complete trials per study (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="workers per study (default: %(default)s)")
    parser.add_argument("--loops", type=int, default=5000, help="training loops per trial (default: %(default)s)")
    parser.add_argument("--agents", type=lambda text: text.split(","), help="comma-separated agents to tune")
    parser.add_argument("--envs", type=lambda text: text.split(","), help="comma-separated environments")
    parser.add_argument("--experiment", default="tuning", help="MLflow experiment (default: %(default)s)")
    parser.add_argument("--storage", default=os.environ.get("OPTUNA_STORAGE", f"sqlite:///{PROJECT_ROOT / 'optuna.db'}"),
                        help="Optuna storage (default: $OPTUNA_STORAGE, else sqlite:///optuna.db in the project)")
    parser.add_argument("overrides", nargs="*", help="more config overrides for every trial")
    args = parser.parse_args()
    if args.data_dir:
        args.overrides.insert(0, f"data.dir={args.data_dir}")
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    with exit_on_user_error():
        for agent, env in tuned.pairs(args.agents, args.envs):
            tuned.write_tuned(agent, env, tune(agent, env, args), args.workers, args.loops)


if __name__ == "__main__":
    main()
