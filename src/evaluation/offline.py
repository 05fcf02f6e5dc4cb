"""Offline learning scored off-policy: `objective=ope/<estimator>`.

The agent never meets the environment. It learns from the first `offline.train_share` of
the rounds another run logged (`offline.logs_run_id`, a run trained with
`tracking.log_interactions=true`), in the same batches as online training would see them,
one pass. Its greedy policy is then scored on the remaining rounds by every estimator of
`src.evaluation.estimators`, with the hyperparameters `offline.estimator_params` sets; the
objective is one of them, so a sweep tunes an agent with no online interaction. The
simulator's exact value of the policy is logged beside them (`ope/true_value`), which shows
how far the off-policy score can be trusted.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import tensorflow as tf
from omegaconf import DictConfig
from tf_agents.specs import tensor_spec
from tf_agents.trajectories import time_step as ts
from tf_agents.trajectories import trajectory

from src import artifacts, config
from src.errors import UserError
from src.evaluation import estimators, interactions

log = logging.getLogger(__name__)


def logged_feedback(cfg: DictConfig, reward_model) -> tuple[estimators.Feedback, np.ndarray]:
    """The logs' rounds and their rows in `reward_model`, refused if they come from another
    environment than `cfg`'s or lack what the objective's estimator needs."""
    logs_run_id = str(cfg.offline.logs_run_id)
    artifacts.check_run(logs_run_id)
    with tempfile.TemporaryDirectory() as scratch:
        logs_cfg = artifacts.logged_config(logs_run_id, Path(scratch))
    interactions.check_same_environment(logs_cfg, cfg, f"the logs of run {logs_run_id}", "this run")
    frame = interactions.load(logs_run_id)
    feedback, rows = interactions.feedback_of(frame, reward_model, logs_run_id)
    estimator = cfg.objective.removeprefix(estimators.PREFIX)
    interactions.check_propensities(feedback, [estimator], logs_run_id, logs_cfg.agent.name)
    return feedback, rows


def learn(cfg: DictConfig, engine, feedback: estimators.Feedback, rows: np.ndarray) -> dict[str, float]:
    """Train `engine.agent` on the logged `feedback` (its users' `rows` in the environment) and
    score its greedy policy: every estimator's value (`ope/<estimator>`) and the true one
    (`ope/true_value`)."""
    reward_model = engine.environment.reward_model
    split = split_point(len(feedback), cfg.offline.train_share, engine.interactions_per_loop,
                        str(cfg.offline.logs_run_id))
    log.info("Learning offline from %d logged rounds, scoring on the %d after them", split, len(feedback) - split)
    train_on(engine, feedback.take(np.arange(split)))
    choices = greedy_choices(engine.agent.policy, reward_model)
    num_actions = len(reward_model.movie_ids)
    scored = feedback.take(np.arange(split, len(feedback)))
    terms = estimators.deterministic_target_terms(scored, choices[rows[split:]], num_actions,
                                                  cfg.offline.reward_model_ridge, cfg.offline.reward_model_folds)
    # Logs without propensities still give the estimates that need none (the objective's was checked).
    known = np.isfinite(scored.propensities).all()
    final = {estimators.metric_name(scorer.name): scorer.for_actions(num_actions).estimate(terms)
             for scorer in config.offline_estimators(cfg) if known or not scorer.needs_propensities}
    final[estimators.TRUE_VALUE] = reward_model.value_of(choices)
    return final


def split_point(rounds: int, train_share: float, per_batch: int, logs_run_id: str) -> int:
    """How many of the first logged rounds train; the rest score."""
    split = int(rounds * train_share)
    if split < per_batch or rounds - split < 2:  # one scored round has no spread: every interval NaN
        raise UserError(f"the log of run {logs_run_id} has {rounds} rounds: too few to train on "
                        f"{train_share:.1%} of them in batches of {per_batch} and score on the rest (at least 2)")
    return split


def train_on(engine, feedback: estimators.Feedback) -> None:
    """One pass of `engine.agent`'s training over the logged rounds, in the batches online
    training would take (a last partial batch is left out)."""
    train_agent_on(engine.agent, feedback, engine.environment.batch_size, engine.steps_per_loop)


def train_agent_on(agent, feedback: estimators.Feedback, batch_size: int, steps_per_loop: int) -> None:
    """`train_on` for an agent without an environment: [batch_size, steps_per_loop] batches."""
    train_step = tf.function(agent.train, autograph=False)
    per_batch = batch_size * steps_per_loop
    for start in range(0, len(feedback) - per_batch + 1, per_batch):
        train_step(experience(agent, feedback.take(np.arange(start, start + per_batch)), (batch_size, steps_per_loop)))


def greedy_choices(policy, reward_model) -> np.ndarray:
    """The movie `policy` picks for each of the environment's users (a trained policy is deterministic)."""
    users = tf.constant(reward_model.user_features, tf.float32)
    return policy.action(ts.restart(users, batch_size=len(reward_model.user_ids))).action.numpy()


def experience(agent, batch: estimators.Feedback, shape: tuple[int, int]) -> trajectory.Trajectory:
    """Logged rounds as the [batch_size, steps_per_loop] experience `agent.train` takes."""
    spec = agent.training_data_spec

    def shaped(values, dtype):
        return tf.reshape(tf.constant(values, dtype), shape + tuple(np.shape(values)[1:]))

    return trajectory.Trajectory(
        step_type=tf.fill(shape, ts.StepType.FIRST), observation=shaped(batch.contexts, tf.float32),
        action=shaped(batch.actions, spec.action.dtype),
        # What the logging policy reported is not what this agent's policy would have: zeros
        # of this agent's own info structure, which bandit agents read only for per-arm features.
        policy_info=tensor_spec.zero_spec_nest(spec.policy_info, outer_dims=shape),
        next_step_type=tf.fill(shape, ts.StepType.LAST), reward=shaped(batch.rewards, tf.float32),
        discount=tf.zeros(shape))
