"""Tuned configurations, conf/tuned/<agent>-<env>.yaml: which agent and environment pairs the
leaderboard's line-up tunes, how far a study has come, and the file its best trial becomes
(benchmarks/tune.py runs the studies)."""

from __future__ import annotations

import logging
from datetime import datetime, timezone

import optuna
from omegaconf import OmegaConf

from src import comparison, config
from src.leaderboard import LINEUP, runs_on
from src.errors import UserError

log = logging.getLogger(__name__)

TUNED = config.CONFIG_DIR / "tuned"
SWEEPS = config.CONFIG_DIR / "hparams_search"


def pairs(agents: list[str] | None, envs: list[str] | None) -> list[tuple[str, str]]:
    """(agent, environment) for every line-up entry with a search of its own, on each
    environment of the line-up it can take."""
    lineup = OmegaConf.load(LINEUP)
    tunable = list(dict.fromkeys(entry.agent for entry in lineup.entries if (SWEEPS / f"{entry.agent}.yaml").is_file()))
    for name, given, known in (("--agents", agents, tunable), ("--envs", envs, list(lineup.environments))):
        unknown = sorted(set(given or []) - set(known))
        if unknown:
            raise UserError(f"{name}: nothing to tune for {', '.join(unknown)}; choose from {', '.join(known)}")
    return [(agent, env) for agent in tunable if not agents or agent in agents
            for env in lineup.environments if not envs or env in envs
            if runs_on(agent, env, lineup)]


def completed_trials(study_name: str, storage: str) -> int:
    """How many trials of the study are complete (0 before it exists), to resume it."""
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:  # what Optuna raises for a study not in the storage
        return 0
    return len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))


def write_tuned(agent: str, env: str, study: optuna.Study, workers: int, loops: int) -> None:
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
        f"# '{study.study_name}', {len(study.trials)} trials (TPE, {workers} workers, {loops} loops, seed 0);",
        f"# best trial {best.number} ({when}), train/cumulative_regret {best.value:,.1f}.",
        f"#   uv run python -m src.train tuned={agent}-{env}",
        "defaults:", f"  - override /agent: {agent}", f"  - override /env: {env}", "", ""]
    TUNED.mkdir(exist_ok=True)
    path = TUNED / f"{agent}-{env}.yaml"
    path.write_text("\n".join(header) + OmegaConf.to_yaml(OmegaConf.create(values)))
    log.info("Wrote %s: %s", path,
             ", ".join(f"{key}={comparison.shown(str(value), 4)}" for key, value in best.params.items()))
