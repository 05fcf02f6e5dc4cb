"""The environment contract (src.envs.base): every environment in conf/env/ keeps it, and a worked
example of a new one: a fixed table of two users and three movies, written from scratch here and
trained on by LinUCB in the compiled engine."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from tf_agents.bandits.specs import utils as bandit_spec_utils
from tf_agents.specs import tensor_spec
from tf_agents.trajectories import time_step as ts

from src import config, data, seeding
from src.agents import build_agent, features_spec, has_action_mask, has_per_arm_features, is_slate, logged_policy
from src.engine import Engine
from src.envs import build_environment
from src.envs.base import CompleteRewardModel, InGraphBandit, RewardModel
from src.envs.movielens import RewardModel as TableRewardModel

ENV_CONFIGS = sorted((config.CONFIG_DIR / "env").glob("*.yaml"))


def fitted_to_test_data(name: str) -> list[str]:
    """Overrides that fit env `name` to the synthetic data (60 users, 30 movies; tests/conftest.py's
    SMALL takes 10 of them where the YAML names a number)."""
    params = config.option_file("env", name)
    overrides = [f"env={name}"]
    if "num_movies" in params and params.num_movies is None:
        overrides.append("env.num_movies=null")
    if "num_actions" in params:
        overrides.append("env.num_actions=4")
    if "slate_size" in params:
        overrides.append("env.slate_size=2")
    return overrides


def check_contract(environment) -> None:
    """What src.envs.base asks of an environment, checked on one step."""
    assert isinstance(environment, InGraphBandit)
    assert environment.logged_round_kind in (None, "movie", "slate")
    model = environment.reward_model
    assert isinstance(model, RewardModel)
    users, movies = len(model.user_ids), len(model.movie_ids)
    observation = features_spec(environment.time_step_spec())
    per_arm = has_per_arm_features(environment.time_step_spec())
    user_spec = observation[bandit_spec_utils.GLOBAL_FEATURE_KEY] if per_arm else observation
    assert model.user_features.shape == (users, *user_spec.shape)
    assert model.movie_features.ndim == 2 and len(model.movie_features) == movies
    assert model.rewards.shape == (users, movies)
    assert model.skipped_users is None or model.skipped_users >= 0
    assert model.random_policy_regret > 0
    if environment.logged_round_kind == "movie":  # the log keeps a user row and a movie column, no more
        assert isinstance(model, CompleteRewardModel) and not per_arm and not is_slate(environment.action_spec())
        assert model.optimal_reward.shape == (users,)
    if environment.logged_round_kind == "slate":
        assert is_slate(environment.action_spec())

    batch = environment.batch_size
    time_step = environment.reset()
    if has_action_mask(environment.time_step_spec()):  # movies arriving: the first column first
        mask = time_step.observation[1].numpy()
        assert mask.shape == (batch, movies) and mask[:, 0].all()
    action = first_actions(environment.action_spec(), batch)
    reward, optimal = environment.outcome(action)
    assert reward.dtype == optimal.dtype == tf.float64 and reward.shape == optimal.shape == (batch,)
    assert (reward <= optimal).numpy().all()
    tf.nest.assert_same_structure(environment.feedback(action, reward), environment.reward_spec())
    if environment.extra_metric_names:
        assert environment.extra_metrics(action).shape == (batch, len(environment.extra_metric_names))
    if environment.logged_round_kind is not None:
        assert environment.users.shape == (batch,)
        # A slate round: the user, every candidate, the slate and a reward per slot.
        candidates = observation[bandit_spec_utils.PER_ARM_FEATURE_KEY].shape[0] if per_arm else 0
        size = action.shape[1] if is_slate(environment.action_spec()) else 0
        width = 1 + candidates + 2 * size if size else 2
        assert environment.logged_round(action).shape == (batch, width)


def first_actions(action_spec, batch: int) -> tf.Tensor:
    """The first movie for each user, or a slate of the first ones in order."""
    if is_slate(action_spec):
        return tf.tile(tf.range(action_spec.shape[0])[tf.newaxis], [batch, 1])
    return tf.zeros([batch], action_spec.dtype)


@pytest.mark.parametrize("name", [path.stem for path in ENV_CONFIGS])
def test_every_configured_environment_keeps_the_contract(make_config, name):
    cfg = make_config(*fitted_to_test_data(name))
    check_contract(build_environment(cfg, data.load(cfg.data)))


# Each user's best movie is their own; the third is half as good to both.
TABLE = np.array([[1.0, 0.0, 0.5],
                  [0.0, 1.0, 0.5]])


class FixedTable(InGraphBandit):
    """Each step `batch_size` users drawn with replacement, each observed as a one-hot vector; the
    reward is the table's. The engine needs `reset()` (here `_observe`) and `outcome`; TF-Agents'
    `step()` needs `_apply_action`; the rest of the contract has defaults."""

    logged_round_kind = "movie"

    def __init__(self, batch_size: int, seed: int):
        num_users, num_movies = TABLE.shape
        self.reward_model = TableRewardModel(user_ids=np.arange(1, num_users + 1),
                                             movie_ids=np.arange(1, num_movies + 1), user_factors=np.eye(num_users),
                                             movie_factors=TABLE.T, rank_k=num_users)
        self._rewards = tf.constant(TABLE)
        self._rng = seeding.stream(seed, seeding.USERS)  # a stream of its own, not another seed's
        self._users = tf.Variable(tf.zeros([batch_size], tf.int32), trainable=False)
        super().__init__(ts.time_step_spec(tf.TensorSpec([num_users], tf.float32)),
                         tensor_spec.BoundedTensorSpec((), tf.int32, minimum=0, maximum=num_movies - 1), batch_size)

    @property
    def users(self) -> tf.Variable:
        return self._users

    def _observe(self) -> tf.Tensor:
        self._users.assign(self._rng.uniform([self.batch_size], maxval=len(TABLE), dtype=tf.int32))
        return tf.one_hot(self._users, len(TABLE))

    def _apply_action(self, action: tf.Tensor) -> tf.Tensor:
        return tf.cast(self.outcome(action)[0], tf.float32)

    def outcome(self, action: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        rewards = tf.gather(self._rewards, self._users)
        return tf.gather(rewards, action, batch_dims=1), tf.reduce_max(rewards, axis=1)


def test_a_new_environment_keeps_the_contract_and_linucb_learns_it():
    environment = FixedTable(batch_size=4, seed=0)
    check_contract(environment)
    # Uniform picks miss the best by 1 or 0.5 two times in three: 0.5 an interaction.
    assert environment.reward_model.random_policy_regret == 0.5
    # alpha 1: the bound on the 0.5 movie falls under the best one's after a handful of pulls.
    agent_cfg = config.compose(["agent=linucb", "agent.alpha=1.0"]).agent
    agent = build_agent(agent_cfg, environment.time_step_spec(), environment.action_spec(), seed=0)
    engine = Engine(environment, agent, steps_per_loop=2,
                    policy_columns=logged_policy(agent_cfg, environment.action_spec()), seed=0)
    (loops,) = engine.run(loops=30, chunk=30)
    # It explores in the first few loops (seed 0: regret 15, uniform random's expectation 120),
    # then never misses.
    interactions = engine.interactions_per_loop
    assert 0 < loops.regret.sum() < 0.25 * environment.reward_model.random_policy_regret * 30 * interactions
    np.testing.assert_array_equal(loops.regret[-20:], 0)
    users, movies = loops.interactions[-20 * interactions:, :2].T.astype(int)
    np.testing.assert_array_equal(movies, users)  # each user's own movie
