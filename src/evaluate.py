"""Off-policy evaluation: estimate a trained policy's value on another run's logged interactions.

    uv run python -m src.train agent=epsilon_greedy tracking.log_interactions=true
    uv run python -m src.evaluate target_run_id=<LinUCB run> logs_run_id=<epsilon-greedy run>

The target is the greedy policy a training run saved (`target_run_id=` or
`target_model_uri=`), or an agent config trained from scratch offline on the first
`train_share` of the logs (`target_agent=lints`; the estimates then use only the rounds after
them). The logs are a run's `interactions.parquet`. Each estimator of
`src.evaluation.estimators` gives its estimate with the interval `interval=` names; because the
simulator knows every reward, the target's true value (its mean reward over the
environment's users, who are drawn uniformly) is computed exactly beside them, with each
estimator's error. Logged slates (env=movielens_ranking) are scored by the slate estimators of
`src.evaluation.slates`, the target being the top slate by the saved policy's predicted rewards.
The result is an MLflow run tagged `bandits.role=evaluation` in the logs' experiment, linked to
both runs. Options are in `conf/evaluate.yaml`.
"""

from __future__ import annotations

import logging
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from omegaconf import DictConfig

from src import artifacts, config, data, plots, serving, tracking
from src.cli import exit_on_user_error, run_and_exit
from src.errors import UserError, require
from src.evaluation import estimators, interactions, intervals, real_logs, slates

log = logging.getLogger(__name__)

EFFECTIVE_SAMPLE_SIZE = f"{estimators.PREFIX}effective_sample_size"
USAGE = ("usage: python -m src.evaluate target_run_id=<id>|target_model_uri=<uri>|target_agent=<agent> logs_run_id=<id>, "
         "or data=obd data.dir=<folder> target_policy=<bts|random>|target_agent=<agent|ipw_learner>")


def parse(overrides: list[str]) -> DictConfig:
    """`conf/evaluate.yaml` with the command line's key=value overrides, checked."""
    cfg = config.compose_command(overrides, "evaluate", USAGE)
    on_obd = cfg.data.get("name") == "obd"
    if cfg.data.get("name") not in (None, "obd"):
        raise UserError(f"data={cfg.data.name}: src.evaluate reads MovieLens where the logs' run read it (data.dir= "
                        f"to move it); data=obd scores policies on the Open Bandit Dataset ({USAGE})")
    targets = ("target_policy", "target_agent") if on_obd else ("target_run_id", "target_model_uri", "target_agent")
    if sum(cfg[key] is not None for key in targets) != 1 or any(
            cfg[key] is not None for key in ("target_run_id", "target_model_uri", "target_policy") if key not in targets):
        named = [f"{key}=" for key in targets]
        raise UserError(f"give exactly one of {', '.join(named[:-1])} and {named[-1]}"
                        f"{' with data=obd' if on_obd else ''} ({USAGE})")
    require(0 < cfg.train_share < 1, "train_share", cfg.train_share, "in (0, 1)")
    if on_obd:
        if cfg.logs_run_id is not None:
            raise UserError(f"data=obd scores on the Open Bandit Dataset's logs, not on a run's: drop logs_run_id= "
                            f"({USAGE})")
        real_logs.check_folder(cfg.data.dir)
    if not on_obd and cfg.logs_run_id is None:
        raise UserError(f"give logs_run_id=, a run trained with tracking.log_interactions=true ({USAGE})")
    if isinstance(cfg.estimators, str):  # estimators=dm: one name, not its letters
        cfg.estimators = [cfg.estimators]
    if cfg.estimators is not None:  # else every estimator for the logs' kind, known once they are read
        unknown = [name for name in cfg.estimators if name not in estimators.ESTIMATORS | slates.SLATE_ESTIMATORS]
        require(len(cfg.estimators) > 0 and not unknown, "estimators", list(cfg.estimators),
                f"a non-empty list of {', '.join(estimators.ESTIMATORS)} (or over slates "
                f"{', '.join(slates.SLATE_ESTIMATORS)})")
    chosen(cfg, list(estimators.ESTIMATORS))  # a bad hyperparameter is refused before any run is read
    require(cfg.reward_model_ridge > 0, "reward_model_ridge", cfg.reward_model_ridge, "> 0")
    estimators.check_folds(cfg.reward_model_folds, "reward_model_folds")
    require(cfg.interval in intervals.INTERVALS, "interval", cfg.interval, f"one of {', '.join(intervals.INTERVALS)}")
    require(0 < cfg.confidence < 1, "confidence", cfg.confidence, "in (0, 1)")
    samples = cfg.bootstrap.samples
    require(isinstance(samples, int) and 2 <= samples <= 100_000, "bootstrap.samples", samples,
            "an integer in [2, 100000]")
    require(isinstance(cfg.bootstrap.seed, int) and cfg.bootstrap.seed >= 0, "bootstrap.seed", cfg.bootstrap.seed,
            "an integer >= 0")
    return cfg


def chosen(cfg: DictConfig, names: list[str]) -> list[estimators.Estimator]:
    """The estimators `names`, with the hyperparameters `cfg` gives them."""
    return estimators.configured(names, cfg.estimator_params, "estimator_params")


def names_for(cfg: DictConfig, registry: dict, kind: str) -> list[str]:
    """The estimators `cfg` asks for, every one of `registry` by default; those not of the logs'
    `kind` refused."""
    if cfg.estimators is None:
        return list(registry)
    require(all(name in registry for name in cfg.estimators), "estimators", list(cfg.estimators),
            f"among the estimators of {kind}: {', '.join(registry)}")
    return list(cfg.estimators)


@dataclass(frozen=True)
class Evaluation:
    table: pd.DataFrame  # estimator, estimate, interval, ci_low, ci_high, error, relative_error
    true_value: float
    rounds: int
    effective_sample_size: float  # Kish's: how many rounds the importance weights leave
    warnings: list[str]  # where the interval's guarantee does not hold for these logs
    run_id: str
    truth_label: str | None = None  # what the true value is, where not the simulator's exact one


@dataclass(frozen=True)
class Target:
    """The policy scored: what it is, and its movie for each of the environment's users (None for
    a slate policy, whose choice depends on the candidates)."""

    label: str  # e.g. "linucb (run <id>)"
    agent: str
    tags: dict[str, str]
    choices: np.ndarray | None


def evaluate(cfg: DictConfig) -> Evaluation:
    """Estimates with intervals and errors beside the target's true value, in a logged run."""
    if cfg.data.get("name") == "obd":
        return Evaluation(**real_logs.evaluate(cfg, chosen(cfg, names_for(cfg, estimators.ESTIMATORS, "logged items")))
                          ._asdict())
    tracking.open_to_read(cfg.tracking.uri)
    logs_run_id = str(cfg.logs_run_id)
    artifacts.check_run(logs_run_id)
    with tempfile.TemporaryDirectory() as scratch:
        logs_cfg = artifacts.logged_config(logs_run_id, Path(scratch))
    frame = interactions.load(logs_run_id)
    logs = f"the logs of run {logs_run_id}"
    if cfg.data.dir is not None:
        logs_cfg.data.dir = cfg.data.dir
    if interactions.is_slate_log(frame):
        return evaluate_slates(cfg, logs_cfg, frame)
    names = names_for(cfg, estimators.ESTIMATORS, "logged movies")
    dataset, reward_model = logs_environment(logs_cfg)
    feedback, user_rows = interactions.feedback_of(frame, reward_model, logs_run_id)
    interactions.check_propensities(feedback, names, logs_run_id, logs_cfg.agent.name)
    if cfg.target_agent is None:
        target = saved_policy(cfg, logs_cfg, logs, reward_model)
    else:
        from src import training  # TensorFlow, as in logs_environment
        from src.evaluation import offline

        target_cfg = agent_on(logs_cfg, str(cfg.target_agent), cfg)
        log.info("Training %s on the first %.0f%% of the logs", cfg.target_agent, 100 * cfg.train_share)
        engine, _ = training.fit(target_cfg, dataset)
        split = offline.split_point(len(feedback), cfg.train_share, engine.interactions_per_loop, logs_run_id)
        feedback, user_rows = feedback.take(np.arange(split, len(feedback))), user_rows[split:]
        target = Target(f"{cfg.target_agent} trained offline on the first {split} rounds", str(cfg.target_agent),
                        {"ope.target_agent": str(cfg.target_agent), "ope.train_rounds": str(split)},
                        offline.greedy_choices(engine.agent.policy, reward_model))

    num_actions = len(reward_model.movie_ids)
    true_value = reward_model.value_of(target.choices)
    terms = estimators.deterministic_target_terms(feedback, target.choices[user_rows], num_actions,
                                                  cfg.reward_model_ridge, cfg.reward_model_folds)
    log.info("Estimating the value of %s on %d rounds logged by %s (run %s), %s intervals",
             target.label, len(feedback), logs_cfg.agent.name, logs_run_id, cfg.interval)
    reward_range = (float(reward_model.rewards.min()), float(reward_model.rewards.max()))
    table = intervals.estimate_all([estimator.for_actions(num_actions) for estimator in chosen(cfg, names)], terms,
                                   cfg.interval, cfg.confidence, reward_range=reward_range,
                                   samples=cfg.bootstrap.samples, seed=cfg.bootstrap.seed)
    effective = intervals.effective_sample_size(terms)
    warnings = intervals.caveats(cfg.interval, table.estimator, terms, logs_cfg.agent.name,
                                 logs_cfg.agent.get("propensity_draws", 0))
    return finish(cfg, table, true_value, target, logs_cfg.agent.name, logs_run_id, frame, len(feedback), effective,
                  warnings)


def logs_environment(logs_cfg: DictConfig):
    """The logs' data and their environment's reward model. TensorFlow loads here, where it is
    needed, and not before `parse` has checked the options."""
    from src.envs import build_environment

    log.info("Reading MovieLens and building the logs' environment")
    dataset = data.load(logs_cfg.data)
    return dataset, build_environment(logs_cfg, dataset).reward_model


def finish(cfg, table, true_value, target: Target, logs_agent: str, logs_run_id: str, frame, rounds: int,
           effective: float, warnings: list[str]) -> Evaluation:
    """The errors beside the true value, the warnings said, the evaluation logged."""
    table["error"] = table.estimate - true_value
    table["relative_error"] = table.error / abs(true_value)
    for warning in warnings:
        log.warning("%s", warning)
    run_id = log_evaluation(cfg, table, true_value, target, logs_agent, logs_run_id, frame, effective)
    return Evaluation(table, true_value, rounds, effective, warnings, run_id)


def evaluate_slates(cfg: DictConfig, logs_cfg: DictConfig, frame: pd.DataFrame) -> Evaluation:
    """The slate estimators on logged slates; the target, the top slate by a saved policy's
    predicted rewards among each round's candidates, and its exact value under the logs' feedback."""
    logs_run_id = str(cfg.logs_run_id)
    names = names_for(cfg, slates.SLATE_ESTIMATORS, "logged slates")
    if cfg.target_agent is not None:
        raise UserError(f"the logs of run {logs_run_id} are slates: give the policy to score as target_run_id= or "
                        f"target_model_uri= (an agent is trained offline from logged movies only)")
    require(cfg.interval in intervals.ASYMPTOTIC, "interval", cfg.interval,
            "t or bootstrap on logged slates (a slate's weight has no useful range known beforehand)")
    dataset, reward_model = logs_environment(logs_cfg)
    logged, user_rows, candidates = interactions.slate_log_of(frame, reward_model, logs_run_id)
    with tempfile.TemporaryDirectory() as scratch:
        run_id, policy_path = artifacts.fetch_policy(cfg.target_run_id, cfg.target_model_uri, Path(scratch))
        target_cfg = artifacts.logged_config(run_id, Path(scratch) / "target")
        interactions.check_same_environment(logs_cfg, target_cfg, f"the logs of run {logs_run_id}",
                                            f"the target policy of run {run_id}")
        catalogue = serving.Catalogue.of(reward_model, dataset.movies, logs_cfg.env)
        _, scores = serving.Policy(policy_path).decide(catalogue.user_features, catalogue)
    target = Target(f"{target_cfg.agent.name}'s policy (run {run_id})", target_cfg.agent.name,
                    {"ope.target_run_id": run_id}, None)
    env = logs_cfg.env
    looks = (np.arange(env.slate_size) + 1.0) ** -env.position_bias
    true_value = slates.exact_values(reward_model.rewards, env.num_actions, env.slate_size, scores, looks,
                                     env.click_threshold)[env.feedback]
    target_probabilities = slates.top_k(scores[user_rows[:, None], candidates], logged.slates)
    q = slates.cascade_q(logged, target_probabilities, cfg.reward_model_ridge, cfg.reward_model_folds)
    log.info("Estimating the value of %s on %d slates logged by %s (run %s), %s intervals",
             target.label, len(logged), logs_cfg.agent.name, logs_run_id, cfg.interval)
    terms = {name: slates.SLATE_ESTIMATORS[name]().per_round(logged, target_probabilities, q) for name in names}
    table = intervals.of_means(terms, cfg.interval, cfg.confidence, cfg.bootstrap.samples, cfg.bootstrap.seed)
    weights = target_probabilities.slate / logged.logging.slate
    effective = float(weights.sum() ** 2 / np.sum(weights ** 2)) if weights.any() else 0.0
    heaviest_part = float(max(np.max(target_probabilities.position / logged.logging.position),
                              np.max(target_probabilities.prefix / logged.logging.prefix)))
    warnings = slate_caveats(cfg.interval, logs_cfg.agent.name, weights, effective, heaviest_part)
    return finish(cfg, table, true_value, target, logs_cfg.agent.name, logs_run_id, frame, len(logged), effective,
                  warnings)


def slate_caveats(interval: str, logging_agent: str, weights: np.ndarray, effective: float,
                  heaviest_part: float) -> list[str]:
    """Why the estimates or the interval may not hold on these slates: a logger that learnt,
    whole-slate `weights` too few or too far from their expectation of 1 for a normal
    approximation (the thresholds of src.evaluation.intervals), or a position's or prefix's weight
    (`heaviest_part`, the largest) above the number of rounds: one round then outweighs the whole
    log in the estimators that weigh parts of slates (a logger far greedier than the target)."""
    parts_hold = heaviest_part <= len(weights)
    on_parts = ("; iips, rips and cascade_dr weigh positions or prefixes, with more rounds behind them"
                if parts_hold else "")
    lines = []
    if logging_agent != intervals.FIXED_LOGGER:
        lines.append(f"the slates were logged by {logging_agent}, which learnt while it logged; the {interval} "
                     f"interval assumes one fixed logging policy and may not cover the true value")
    spread = weights.std(ddof=1) / np.sqrt(len(weights))
    gap = abs(weights.mean() - 1) / spread if spread > 0 else np.inf
    if not weights.any():
        lines.append(f"no logged slate is one the target would show: sips sees none of its value (0){on_parts}")
    elif effective < intervals.MIN_EFFECTIVE_SAMPLE or gap > intervals.MAX_WEIGHT_MEAN_GAP:
        lines.append(f"the whole-slate weights average {weights.mean():.3f} ({gap:.1f} standard errors from "
                     f"the 1 they average in expectation) and leave an effective sample of {effective:.0f} rounds: "
                     f"the log lacks the rare slates that carry sips's estimate, and its {interval} interval cannot "
                     f"count them{on_parts}")
    if not parts_hold:
        lines.append(f"a position's or prefix's weight reaches {heaviest_part:.3g}: the logger almost never showed the "
                     f"target's movies where the target shows them, so one round outweighs all {len(weights):,}, and "
                     f"iips, rips, cascade_dr and pi say nothing on this log (log with a less greedy policy)")
    return lines


def saved_policy(cfg: DictConfig, logs_cfg: DictConfig, logs: str, reward_model) -> Target:
    """The greedy policy a training run saved. Greedy, so deterministic: its choice for each user
    settles both the true value and the target's probabilities on the logged rounds."""
    with tempfile.TemporaryDirectory() as scratch:
        run_id, policy_path = artifacts.fetch_policy(cfg.target_run_id, cfg.target_model_uri, Path(scratch))
        target_cfg = artifacts.logged_config(run_id, Path(scratch) / "target")
        interactions.check_same_environment(logs_cfg, target_cfg, logs, f"the target policy of run {run_id}")
        choices, _ = serving.Policy(policy_path).decide(reward_model.user_features)
    return Target(f"{target_cfg.agent.name}'s policy (run {run_id})", target_cfg.agent.name,
                  {"ope.target_run_id": run_id}, choices)


def agent_on(logs_cfg: DictConfig, agent: str, cfg: DictConfig) -> DictConfig:
    """A fresh `agent` on the logs' environment, data and training batches, learning offline
    from the first `cfg.train_share` of the logs (as `objective=ope/dm` does)."""
    config.check_group_choices([f"agent={agent}"])
    target_cfg = config.compose([f"agent={agent}", "objective=ope/dm"])
    for key in ("data", "env", "training"):
        target_cfg[key] = logs_cfg[key]
    target_cfg.tracking.log_interactions = False
    target_cfg.offline.logs_run_id = str(cfg.logs_run_id)
    target_cfg.offline.train_share = cfg.train_share
    target_cfg.offline.reward_model_ridge = cfg.reward_model_ridge
    return target_cfg


def log_evaluation(cfg, table, true_value, target: Target, logs_agent: str, logs_run_id: str, frame,
                   effective: float) -> str:
    experiment_id = mlflow.MlflowClient().get_run(logs_run_id).info.experiment_id
    tags = {tracking.ROLE_TAG: "evaluation", "ope.logs_run_id": logs_run_id, **target.tags,
            "mlflow.note.content": f"Off-policy evaluation of {target.label} on the {len(frame)} "
                                   f"interactions logged by {logs_agent} (run {logs_run_id})."}
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"ope__{target.agent}__on__{logs_agent}",
                          tags=tags) as active:
        mlflow.log_params({**tracking.flatten(cfg), "rounds": len(frame)})
        mlflow.log_input(interactions.as_dataset(frame), context="evaluation")
        mlflow.log_metrics({estimators.TRUE_VALUE: true_value, EFFECTIVE_SAMPLE_SIZE: effective})
        for row in table.itertuples():
            name = estimators.metric_name(row.estimator)
            mlflow.log_metrics({name: row.estimate, f"{name}_ci_low": row.ci_low, f"{name}_ci_high": row.ci_high,
                                f"{name}_error": row.error})
        mlflow.log_table(table, "estimates.json")
        figure = plots.estimates_figure(table, true_value, f"{target.agent} scored on {logs_agent}'s logs",
                                        cfg.confidence)
        mlflow.log_figure(figure, "estimates.png")
    log.info("Logged to MLflow: %s", tracking.where_to_see(active.info.run_id, experiment_id))
    return active.info.run_id


def report(result: Evaluation) -> str:
    shown = result.table.assign(relative_error=result.table.relative_error.map("{:+.1%}".format))
    if np.isnan(result.true_value):
        shown = shown.drop(columns=["error", "relative_error"])
    return "\n".join([*(f"warning: {warning}" for warning in result.warnings),
                      result.truth_label or f"true value (exact, from the simulator): {result.true_value:.4f}",
                      f"effective sample size (sum w)^2 / sum w^2: {result.effective_sample_size:,.0f} "
                      f"of {result.rounds:,} logged rounds",
                      shown.to_string(index=False, float_format="{:.5g}".format),
                      f"MLflow run {result.run_id}"])


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    with exit_on_user_error():
        print(report(evaluate(parse(argv))))


if __name__ == "__main__":
    run_and_exit(lambda: main(sys.argv[1:]))
