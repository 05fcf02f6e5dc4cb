"""Off-policy evaluation: estimate a trained policy's value on another run's logged interactions.

    uv run python -m src.train agent=epsilon_greedy tracking.log_interactions=true
    uv run python -m src.evaluate target_run_id=<LinUCB run> logs_run_id=<epsilon-greedy run>

The target is the greedy policy a training run saved (`target_run_id=` or
`target_model_uri=`); the logs are a run's `interactions.parquet`. Each estimator of
`src.ope` gives its estimate with a bootstrap interval; because the simulator knows every
reward, the target's true value (its mean reward over the environment's users, who are
drawn uniformly) is computed exactly beside them, with each estimator's error. The result
is an MLflow run tagged `bandits.role=evaluation` in the logs' experiment, linked to both
runs. Options are in `conf/evaluate.yaml`.
"""

from __future__ import annotations

import logging
import sys
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from src import artifacts, config, data, interactions, ope, plots, serving, tracking
from src.cli import exit_on_user_error
from src.envs import build_environment
from src.errors import UserError, require

log = logging.getLogger(__name__)

USAGE = "usage: python -m src.evaluate target_run_id=<id>|target_model_uri=<uri> logs_run_id=<id>"
ROLE_TAG = "bandits.role"


def parse(overrides: list[str]) -> DictConfig:
    """`conf/evaluate.yaml` with the command line's key=value overrides, checked."""
    try:
        cfg = config.compose(overrides, config_name="evaluate")
    except (HydraException, OmegaConfBaseException) as error:
        raise UserError(f"{str(error).splitlines()[0]} ({USAGE})") from None
    if (cfg.target_run_id is None) == (cfg.target_model_uri is None):
        raise UserError(f"give exactly one of target_run_id= and target_model_uri= ({USAGE})")
    if cfg.logs_run_id is None:
        raise UserError(f"give logs_run_id=, a run trained with tracking.log_interactions=true ({USAGE})")
    unknown = [name for name in cfg.estimators if name not in ope.ESTIMATORS]
    require(len(cfg.estimators) > 0 and not unknown, "estimators", list(cfg.estimators),
            f"a non-empty list of {', '.join(ope.ESTIMATORS)}")
    require(cfg.reward_model_ridge > 0, "reward_model_ridge", cfg.reward_model_ridge, "> 0")
    require(cfg.switch_tau is None or cfg.switch_tau > 0, "switch_tau", cfg.switch_tau, "> 0 or null")
    samples = cfg.bootstrap.samples
    require(isinstance(samples, int) and 2 <= samples <= 100_000, "bootstrap.samples", samples,
            "an integer in [2, 100000]")
    require(0 < cfg.bootstrap.confidence < 1, "bootstrap.confidence", cfg.bootstrap.confidence, "in (0, 1)")
    return cfg


def evaluate(cfg: DictConfig) -> tuple[pd.DataFrame, float, str]:
    """Estimates with intervals and errors, the target's true value, and the evaluation run's id."""
    mlflow.set_tracking_uri(tracking.tracking_uri(cfg.tracking.uri))
    logs_run_id = str(cfg.logs_run_id)
    with tempfile.TemporaryDirectory() as scratch:
        artifacts.check_run(logs_run_id)
        logs_cfg = artifacts.logged_config(logs_run_id, Path(scratch) / "logs")
        frame = interactions.load(logs_run_id)
        target_run_id, policy_path = artifacts.fetch_policy(cfg.target_run_id, cfg.target_model_uri, Path(scratch))
        target_cfg = artifacts.logged_config(target_run_id, Path(scratch) / "target")
        interactions.check_same_environment(logs_cfg, target_cfg, f"the logs of run {logs_run_id}",
                                            f"the target policy of run {target_run_id}")
        policy = serving.Policy(policy_path)
    if cfg.data.dir is not None:
        logs_cfg.data.dir = cfg.data.dir
    reward_model = build_environment(logs_cfg, data.load(logs_cfg.data)).reward_model
    feedback, user_rows = interactions.feedback_of(frame, reward_model, logs_run_id)
    interactions.check_propensities(feedback, cfg.estimators, logs_run_id, logs_cfg.agent.name)

    # The saved policy is greedy, so deterministic: its choice for each user settles both the
    # true value and the target's probabilities on the logged rounds.
    choices, _ = policy.decide(reward_model.user_features)
    num_users, num_actions = reward_model.rewards.shape
    true_value = float(reward_model.rewards[np.arange(num_users), choices].mean())
    target_probabilities = np.eye(num_actions)[choices[user_rows]]
    coefficients = ope.fit_reward_model(feedback, num_actions, cfg.reward_model_ridge)
    terms = ope.terms(feedback, target_probabilities, ope.predict_rewards(coefficients, feedback.contexts))
    switch_tau = cfg.switch_tau if cfg.switch_tau is not None else num_actions
    log.info("Estimating the value of %s's policy (run %s) on %d rounds logged by %s (run %s), "
             "%d bootstrap resamples", target_cfg.agent.name, target_run_id, len(feedback),
             logs_cfg.agent.name, logs_run_id, cfg.bootstrap.samples)
    table = ope.estimate_all(list(cfg.estimators), terms, switch_tau, cfg.bootstrap.samples,
                             cfg.bootstrap.confidence, cfg.bootstrap.seed)
    table["error"] = table.estimate - true_value
    table["relative_error"] = table.error / abs(true_value)
    run_id = log_evaluation(cfg, table, true_value, logs_cfg, target_cfg, logs_run_id, target_run_id, frame)
    return table, true_value, run_id


def log_evaluation(cfg, table, true_value, logs_cfg, target_cfg, logs_run_id, target_run_id, frame) -> str:
    experiment_id = mlflow.MlflowClient().get_run(logs_run_id).info.experiment_id
    title = f"{target_cfg.agent.name} scored on {logs_cfg.agent.name}'s logs"
    tags = {ROLE_TAG: "evaluation", "ope.logs_run_id": logs_run_id, "ope.target_run_id": target_run_id,
            "mlflow.note.content": f"Off-policy evaluation of run {target_run_id}'s policy on the "
                                   f"{len(frame)} interactions logged by run {logs_run_id}."}
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"ope__{target_cfg.agent.name}__on__"
                          f"{logs_cfg.agent.name}", tags=tags) as active:
        mlflow.log_params({**tracking.flatten(cfg), "rounds": len(frame)})
        mlflow.log_input(interactions.as_dataset(frame), context="evaluation")
        mlflow.log_metric("ope/true_value", true_value)
        for row in table.itertuples():
            mlflow.log_metrics({f"ope/{row.estimator}": row.estimate, f"ope/{row.estimator}_ci_low": row.ci_low,
                                f"ope/{row.estimator}_ci_high": row.ci_high, f"ope/{row.estimator}_error": row.error})
        mlflow.log_table(table, "estimates.json")
        mlflow.log_figure(plots.estimates_figure(table, true_value, title, cfg.bootstrap.confidence),
                          "estimates.png")
    log.info("Logged MLflow run %s", active.info.run_id)
    return active.info.run_id


def report(table: pd.DataFrame, true_value: float, run_id: str) -> str:
    shown = table.assign(relative_error=table.relative_error.map("{:+.1%}".format))
    return "\n".join([f"true value (exact, from the simulator): {true_value:.4f}",
                      shown.to_string(index=False, float_format="{:.4f}".format),
                      f"MLflow run {run_id}"])


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    with exit_on_user_error():
        print(report(*evaluate(parse(argv))))


if __name__ == "__main__":
    main(sys.argv[1:])
