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
from datetime import datetime, timezone

import optuna
from omegaconf import OmegaConf

from src import comparison, config
from src.cli import exit_on_user_error
from src.errors import UserError
from src.paths import PROJECT_ROOT

log = logging.getLogger("benchmarks.tune")

TUNED = config.CONFIG_DIR / "tuned"
SWEEPS = config.CONFIG_DIR / "hparams_search"


def pairs(agents: list[str] | None, envs: list[str] | None) -> list[tuple[str, str]]:
    """(agent, environment) for every line-up entry with a search of its own, on each
    environment of the line-up it can take."""
    lineup = OmegaConf.load(config.CONFIG_DIR / "leaderboard.yaml")
    tunable = list(dict.fromkeys(entry.agent for entry in lineup.entries if (SWEEPS / f"{entry.agent}.yaml").is_file()))
    for name, given, known in (("--agents", agents, tunable), ("--envs", envs, list(lineup.environments))):
        unknown = sorted(set(given or []) - set(known))
        if unknown:
            raise UserError(f"{name}: nothing to tune for {', '.join(unknown)}; choose from {', '.join(known)}")
    return [(agent, env) for agent in tunable if not agents or agent in agents
            for env in lineup.environments if not envs or env in envs
            if env not in lineup.per_arm_environments or config.compose([f"agent={agent}"]).agent.per_arm]


def study_name(agent: str, env: str) -> str:
    return f"tune-{agent}-{env}"


def tune(agent: str, env: str, args: argparse.Namespace) -> optuna.Study:
    name = study_name(agent, env)
    done = [trial for trial in load(name, args.storage).trials if trial.state == optuna.trial.TrialState.COMPLETE] \
        if exists(name, args.storage) else []
    if len(done) < args.trials:
        log.info("Tuning %s on %s: %d trials of %d loops (%d complete so far)", agent, env, args.trials, args.loops,
                 len(done))
        command = [str(PROJECT_ROOT / "multirun.sh"), agent, "--workers", str(args.workers), "--trials",
                   str(args.trials), "--storage", args.storage, f"hydra.sweeper.study_name={name}", f"env={env}",
                   f"training.loops={args.loops}", "training.seed=0", f"tracking.experiment={args.experiment}",
                   *args.overrides]
        if subprocess.run(command, cwd=PROJECT_ROOT).returncode != 0:
            raise UserError(f"the study {name} did not complete; run the same command again to resume it")
    return load(name, args.storage)


def exists(name: str, storage: str) -> bool:
    return name in {summary.study_name for summary in optuna.get_all_study_summaries(storage)}


def load(name: str, storage: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=storage)


def write_tuned(agent: str, env: str, study: optuna.Study, args: argparse.Namespace) -> None:
    """conf/tuned/<agent>-<env>.yaml: the study's best values over the agent's and environment's
    defaults, with the ground truth the study held fixed."""
    best = study.best_trial
    sweep = config.compose([f"hparams_search={agent}", f"env={env}"], with_hydra=True)
    values: dict = {"tuned_for": {"agent": agent, "env": env, "study": study.study_name},
                    "env": {"reward_rank": sweep.env.reward_rank}}
    for key, value in best.params.items():
        group, name = key.split(".", 1)
        values.setdefault(group, {})[name] = value
    when = best.datetime_complete.astimezone(timezone.utc).strftime("%Y-%m-%d")
    header = [
        "# @package _global_",
        f"# Tuned by `uv run python -m benchmarks.tune` ({datetime.now(timezone.utc):%Y-%m-%d}): Optuna study",
        f"# '{study.study_name}', {len(study.trials)} trials (TPE, {args.workers} workers, {args.loops} loops, seed 0);",
        f"# best trial {best.number} ({when}), train/cumulative_regret {best.value:,.1f}.",
        f"#   uv run python -m src.train tuned={agent}-{env}",
        "defaults:", f"  - override /agent: {agent}", f"  - override /env: {env}", "", ""]
    TUNED.mkdir(exist_ok=True)
    path = TUNED / f"{agent}-{env}.yaml"
    path.write_text("\n".join(header) + OmegaConf.to_yaml(OmegaConf.create(values)))
    log.info("Wrote %s: %s", path,
             ", ".join(f"{key}={comparison.shown(str(value), 4)}" for key, value in best.params.items()))


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
        for agent, env in pairs(args.agents, args.envs):
            write_tuned(agent, env, tune(agent, env, args), args)


if __name__ == "__main__":
    main()
