"""Off-policy evaluation on real logged feedback, the Open Bandit Dataset (`src.evaluate data=obd`).

    uv run python -m src.evaluate data=obd data.dir=/path/to/obd target_policy=bts
    uv run python -m src.evaluate data=obd data.dir=/path/to/obd target_agent=lints train_share=0.5

A round is one impression (`src.data.obd`): the user's context, the item shown at one of three
positions, the click. Two targets:
- `target_policy=random|bts`: the other logging policy of the same traffic (Open Bandit
  Pipeline's protocol). Its chance of each item at each position is uniform, or for `bts` the
  share of `data.bts_draws` samples of its Beta priors ranking the item there. Its value is known
  on-policy, the mean click of its own log: itself an estimate, stated with its t-interval.
- `target_agent=<agent>|ipw_learner`: a policy learnt from the first `train_share` of the logs,
  scored on the rest; no truth is known. An agent (LinUCB, LinTS, ...) learns in its own
  training batches, one pass, from each logged (context, item, click); the IPW learner regresses
  every item's importance-weighted click 1[a_i = a] r_i / p_i on the context (ridge, one solve),
  an unbiased estimate of the item's click rate for that context under any logger. Either ranks
  the items by its predicted click rate and shows its top three in positions 1-3, so at a round
  of position k its item is its k-th: a deterministic target.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import mlflow
import numpy as np
import pandas as pd
from omegaconf import DictConfig
from scipy import stats

from src import config, plots, tracking
from src.data import obd
from src.errors import UserError, require
from src.evaluation import estimators, intervals
from src.paths import resolve

log = logging.getLogger(__name__)

EXPERIMENT = "open_bandit_dataset"
IPW_LEARNER = "ipw_learner"
# The Beta samples' seed: the bts target's probabilities are the same in every evaluation.
BTS_SEED = 12345


@dataclass(frozen=True)
class Scored:
    """A target's probabilities on the rounds it is scored on, and what is known of its value."""

    label: str
    agent: str
    feedback: estimators.Feedback
    probabilities: np.ndarray  # [n, items] the target's chance of each item at the round's position
    truth: float | None  # the on-policy value, where another log gives it
    truth_interval: tuple[float, float] | None
    tags: dict[str, str]


class Result(NamedTuple):
    """What `src.evaluate` reports of an evaluation (its `Evaluation`'s fields)."""

    table: pd.DataFrame
    true_value: float
    rounds: int
    effective_sample_size: float
    warnings: list[str]
    run_id: str
    truth_label: str


def evaluate(cfg: DictConfig, chosen: list[estimators.Estimator]) -> Result:
    """The `chosen` estimators with their intervals on an OBD log; the errors against the
    on-policy value where the target is the other logging policy. An MLflow run in experiment
    `open_bandit_dataset`."""
    params = cfg.data
    directory = check_folder(params.dir)
    experiment_id = tracking.connect(cfg.tracking.uri, EXPERIMENT)
    logs = obd.load(directory, params.campaign, params.behavior)
    feedback = estimators.Feedback(logs.contexts, logs.actions, logs.rewards, logs.propensities)
    if cfg.target_policy is not None:
        scored = other_policy(cfg, directory, logs, feedback)
    else:
        scored = learnt_policy(cfg, logs, feedback)
    q = estimators.cross_fitted_rewards(scored.feedback, logs.num_items, cfg.reward_model_ridge,
                                        cfg.reward_model_folds)
    terms = estimators.terms(scored.feedback, scored.probabilities, q)
    log.info("Estimating the value of %s on %d rounds logged by %s (campaign %s), %s intervals", scored.label,
             len(scored.feedback), params.behavior, params.campaign, cfg.interval)
    table = intervals.estimate_all([estimator.for_actions(logs.num_items) for estimator in chosen], terms,
                                   cfg.interval, cfg.confidence, reward_range=(0.0, 1.0),
                                   samples=cfg.bootstrap.samples, seed=cfg.bootstrap.seed)
    # Both OBD loggers are fixed policies over the logging period (their propensities say so), as
    # Open Bandit Pipeline's protocol takes them.
    warnings = intervals.caveats(cfg.interval, table.estimator, terms, intervals.FIXED_LOGGER)
    truth = np.nan if scored.truth is None else scored.truth
    table["error"] = table.estimate - truth
    table["relative_error"] = table.error / abs(truth)
    for warning in warnings:
        log.warning("%s", warning)
    effective = intervals.effective_sample_size(terms)
    run_id = log_evaluation(cfg, experiment_id, table, scored, effective)
    return Result(table, truth, len(scored.feedback), effective, warnings, run_id, truth_label(scored))


def check_folder(folder) -> Path:
    require(folder is not None and str(folder).strip() != "", "data.dir", folder,
            "the Open Bandit Dataset folder (<behavior>/<campaign>/<campaign>.csv, prior_bts.yaml)")
    directory = resolve(folder)
    if not directory.is_dir():
        raise UserError(f"data.dir={folder} is not a directory")
    return directory


def truth_label(scored: Scored) -> str:
    if scored.truth is None:
        return "true value: unknown (real logs; no log of this policy)"
    low, high = scored.truth_interval
    return (f"on-policy value (mean click of its own {scored.tags['ope.truth_rounds']} rounds): "
            f"{scored.truth:.5f}, 95% t-interval [{low:.5f}, {high:.5f}]")


def other_policy(cfg: DictConfig, directory, logs: obd.LoggedFeedback, feedback: estimators.Feedback) -> Scored:
    params = cfg.data
    require(cfg.target_policy in obd.BEHAVIORS and cfg.target_policy != params.behavior, "target_policy",
            cfg.target_policy, f"the other logging policy than data.behavior={params.behavior}: "
            f"{', '.join(b for b in obd.BEHAVIORS if b != params.behavior)}")
    own = obd.load(directory, params.campaign, cfg.target_policy)
    if own.num_items != logs.num_items:
        raise UserError(f"the {cfg.target_policy} log of campaign {params.campaign} has {own.num_items} items, the "
                        f"{params.behavior} log {logs.num_items}")
    if cfg.target_policy == "random":
        by_position = np.full((logs.num_items, obd.POSITIONS), 1 / logs.num_items)
    else:
        require(isinstance(params.bts_draws, int) and 1_000 <= params.bts_draws <= 10_000_000, "data.bts_draws",
                params.bts_draws, "an integer in [1000, 10000000]")
        log.info("Drawing %s samples of the bts policy's Beta priors for its position probabilities",
                 f"{params.bts_draws:,}")
        alpha, beta = obd.bts_priors(directory, params.campaign)
        by_position = obd.bernoulli_ts_positions(alpha, beta, params.bts_draws, BTS_SEED)
    clicks = own.rewards
    spread = stats.t.ppf(0.975, len(clicks) - 1) * clicks.std(ddof=1) / np.sqrt(len(clicks))
    return Scored(label=f"the {cfg.target_policy} logging policy", agent=cfg.target_policy, feedback=feedback,
                  probabilities=by_position[:, logs.positions].T, truth=float(clicks.mean()),
                  truth_interval=(clicks.mean() - spread, clicks.mean() + spread),
                  tags={"ope.target_policy": cfg.target_policy, "ope.truth_rounds": str(len(clicks))})


def learnt_policy(cfg: DictConfig, logs: obd.LoggedFeedback, feedback: estimators.Feedback) -> Scored:
    split = int(len(feedback) * cfg.train_share)
    if split < 1 or split >= len(feedback):
        raise UserError(f"train_share={cfg.train_share} of {len(feedback)} rounds leaves nothing to learn from or "
                        f"to score on")
    learning, scoring = feedback.take(np.arange(split)), feedback.take(np.arange(split, len(feedback)))
    agent = str(cfg.target_agent)
    log.info("Learning %s from the first %d rounds; scoring it on the %d after them", agent, split, len(scoring))
    if agent == IPW_LEARNER:
        scores = ipw_scores(learning, logs.num_items, cfg.reward_model_ridge, scoring.contexts)
    else:
        scores = agent_scores(agent, learning, logs.num_items, scoring.contexts)
    ranked = np.argsort(-scores, axis=1, kind="stable")
    shown = ranked[np.arange(len(scoring)), logs.positions[split:]]
    return Scored(label=f"{agent} learnt from the first {split} rounds", agent=agent, feedback=scoring,
                  probabilities=np.eye(logs.num_items)[shown], truth=None, truth_interval=None,
                  tags={"ope.target_agent": agent, "ope.train_rounds": str(split)})


def ipw_scores(learning: estimators.Feedback, num_items: int, ridge: float, contexts: np.ndarray) -> np.ndarray:
    """[n, items] each item's predicted click rate: ridge regression of 1[a_i = a] r_i / p_i on the
    contexts, every item at once (one Gram matrix)."""
    pseudo = np.zeros((len(learning), num_items))
    pseudo[np.arange(len(learning)), learning.actions] = learning.rewards / learning.propensities
    design = learning.contexts
    coefficients = np.linalg.solve(design.T @ design + ridge * np.eye(design.shape[1]), design.T @ pseudo)
    return contexts @ coefficients


def agent_scores(agent: str, learning: estimators.Feedback, num_items: int, contexts: np.ndarray) -> np.ndarray:
    """[n, items] the predicted rewards of `agent` (a conf/agent choice) after one pass over the
    logged rounds in its training batches."""
    import tensorflow as tf
    from tf_agents.specs import tensor_spec
    from tf_agents.trajectories import time_step as ts

    from src.agents import build_agent
    from src.evaluation.offline import train_agent_on

    config.check_group_choices([f"agent={agent}"])
    agent_cfg = config.compose([f"agent={agent}"])
    observation = tf.TensorSpec([contexts.shape[1]], tf.float32, name="observation")
    actions = tensor_spec.BoundedTensorSpec((), tf.int32, minimum=0, maximum=num_items - 1, name="action")
    learner = build_agent(agent_cfg.agent, ts.time_step_spec(observation), actions, agent_cfg.training.seed)
    per_batch = agent_cfg.training.batch_size * agent_cfg.training.steps_per_loop
    if len(learning) < per_batch:
        raise UserError(f"{len(learning)} rounds to learn from are fewer than one training batch of {agent} "
                        f"({per_batch}): raise train_share")
    train_agent_on(learner, learning, agent_cfg.training.batch_size, agent_cfg.training.steps_per_loop)
    step = learner.policy.action(ts.restart(tf.constant(contexts, tf.float32), batch_size=len(contexts)))
    predicted = getattr(step.info, "predicted_rewards_mean", None)
    if predicted is None or not isinstance(predicted, tf.Tensor):
        raise UserError(f"agent={agent} does not report predicted rewards to rank the items by; use linucb, lints, "
                        f"neural_linucb or {IPW_LEARNER}")
    return predicted.numpy()


def log_evaluation(cfg: DictConfig, experiment_id: str, table: pd.DataFrame, scored: Scored, effective: float) -> str:
    params = cfg.data
    note = (f"Off-policy evaluation of {scored.label} on {len(scored.feedback):,} rounds of the Open Bandit "
            f"Dataset logged by {params.behavior} (campaign {params.campaign}).")
    tags = {tracking.ROLE_TAG: "evaluation", "ope.logs": f"obd/{params.behavior}/{params.campaign}", **scored.tags,
            "mlflow.note.content": note}
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"ope__{scored.agent}__on__obd_{params.behavior}",
                          tags=tags) as active:
        mlflow.log_params({**tracking.flatten(cfg), "rounds": len(scored.feedback)})
        mlflow.log_metrics({estimators.PREFIX + "effective_sample_size": effective})
        if scored.truth is not None:
            mlflow.log_metrics({estimators.TRUE_VALUE: scored.truth, f"{estimators.TRUE_VALUE}_ci_low":
                                scored.truth_interval[0], f"{estimators.TRUE_VALUE}_ci_high": scored.truth_interval[1]})
        for row in table.itertuples():
            name = estimators.metric_name(row.estimator)
            values = {name: row.estimate, f"{name}_ci_low": row.ci_low, f"{name}_ci_high": row.ci_high}
            if scored.truth is not None:
                values[f"{name}_error"] = row.error
            mlflow.log_metrics({key: value for key, value in values.items() if np.isfinite(value)})
        mlflow.log_table(table, "estimates.json")
        figure = plots.estimates_figure(table, scored.truth, f"{scored.label} on {params.behavior}'s OBD logs",
                                        cfg.confidence, truth_name="on-policy value")
        mlflow.log_figure(figure, "estimates.png")
    log.info("Logged to MLflow: %s", tracking.where_to_see(active.info.run_id, experiment_id))
    return active.info.run_id
