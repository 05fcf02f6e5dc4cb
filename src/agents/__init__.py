"""Agent builders. Each `conf/agent/*.yaml` names its builder in `_target_`.

An agent YAML's `per_arm: true` says its builder picks one movie from observations with
per-arm features (`env=movielens_per_arm`), `slate: true` that it can recommend slates
(`env=movielens_ranking`, whose observations have per-arm features too), and `action_mask: true`
that it takes observations carrying an action mask (`env.arrivals` on `env=movielens`: the movies
arrived) through an `observation_and_action_constraint_splitter`, as TF-Agents' agents do, and
`jit_compile: true` that XLA compiles its loop (`training.jit_compile`); the lists of such agents
are read from those files.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Mapping, Sequence

from src import tf_runtime  # noqa: F401,I001  (before TensorFlow: a quiet start-up)
import numpy as np
import tensorflow as tf
from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf
from tf_agents.bandits.specs import utils as bandit_spec_utils

from src import config
from src.errors import UserError

AGENT_CONFIGS = config.CONFIG_DIR / "agent"


def has_per_arm_features(time_step_spec) -> bool:
    observation = time_step_spec.observation
    return isinstance(observation, dict) and bandit_spec_utils.PER_ARM_FEATURE_KEY in observation


def has_action_mask(time_step_spec) -> bool:
    """Whether observations are (features, action mask), TF-Agents' convention for masked agents."""
    return isinstance(time_step_spec.observation, tuple)


def split_action_mask(observation) -> tuple:
    """(features, mask [batch, actions]: 1 where the action may be taken) of an observation with
    an action mask, the `observation_and_action_constraint_splitter` every masked agent is given."""
    return observation[0], observation[1]


def features_spec(time_step_spec):
    """The spec of what an agent's model reads of an observation: all of it but an action mask."""
    return time_step_spec.observation[0] if has_action_mask(time_step_spec) else time_step_spec.observation


def agents_that(can: str) -> list[str]:
    """The agent choices whose YAML says `<can>: true` (per_arm, slate)."""
    return sorted(path.stem for path in AGENT_CONFIGS.glob("*.yaml") if OmegaConf.load(path).get(can, False))


def per_arm_agents() -> list[str]:
    return agents_that("per_arm")


def is_slate(action_spec) -> bool:
    return action_spec.shape.rank == 1


def build_agent(cfg: DictConfig, time_step_spec, action_spec, seed: int, replica_seeds: Sequence[int] = (),
                replica_values: Mapping[str, list] | None = None):
    """Call the builder the agent config names with its hyperparameters and the env's specs,
    and `seed` where the builder takes one (for a generator of the agent's own, so that what
    ran before does not change its draws). With `replica_seeds`, an agent that trains a run of
    each seed side by side (config.shares_ops), `replica_values` giving each replica's own value
    of a hyperparameter that differs between them (config.PER_REPLICA_HYPERPARAMETERS).

    Called directly rather than through `hydra.utils.instantiate`, which would wrap a
    builder's `UserError` in its own exception and lose the one-line message.
    """
    hyperparameters = OmegaConf.to_container(cfg, resolve=True)
    builder = get_object(hyperparameters.pop("_target_"))
    accepts_per_arm, recommends_slates = hyperparameters.pop("per_arm", False), hyperparameters.pop("slate", False)
    hyperparameters.pop("jit_compile", None)  # what training.jit_compile may ask of it (src.config.check_compilable)
    if hyperparameters.pop("action_mask", False) and has_action_mask(time_step_spec):
        hyperparameters["observation_and_action_constraint_splitter"] = split_action_mask
    elif has_action_mask(time_step_spec):
        raise UserError(f"agent={cfg.name} cannot take an action mask (env.arrivals: movies that have not arrived); "
                        f"agents that can: {', '.join(agents_that('action_mask'))}")
    # A slate's observations carry per-arm features too; `slate: true` covers them.
    if is_slate(action_spec):
        if not recommends_slates:
            raise UserError(f"agent={cfg.name} cannot recommend slates; "
                            f"agents that can: {', '.join(agents_that('slate'))}")
    elif has_per_arm_features(time_step_spec) and not accepts_per_arm:
        slates_only = " (it recommends slates: use it with env=movielens_ranking)" if recommends_slates else ""
        raise UserError(f"agent={cfg.name} cannot take this environment's per-arm features{slates_only}; "
                        f"agents that can: {', '.join(per_arm_agents())}")
    if "seed" in inspect.signature(builder).parameters:
        hyperparameters["seed"] = seed
    if replica_seeds:
        hyperparameters["replica_seeds"] = list(replica_seeds)
        hyperparameters.update(replica_values or {})
    with config.errors_name_source("agent", cfg.name):
        return builder(time_step_spec=time_step_spec, action_spec=action_spec, **hyperparameters)


def _module_of(cfg: DictConfig):
    return importlib.import_module(cfg._target_.rsplit(".", 1)[0])


def action_probabilities(cfg: DictConfig, num_actions: int):
    """The agent's collect-policy propensities as a function of its `PolicyStep`, from its
    builder module's `action_probabilities`; None where they are unknown (LinUCB is
    deterministic given its state unless `agent.log_epsilon` wraps it; LinTS and dropout TS
    sample without a closed form)."""
    module = _module_of(cfg)
    probabilities = getattr(module, "action_probabilities", None)
    hyperparameters = OmegaConf.to_container(cfg, resolve=True)
    # A builder module may expose them only under some settings (LinUCB: with agent.log_epsilon > 0).
    if probabilities is None or not getattr(module, "exposes_propensities", lambda **_: True)(**hyperparameters):
        return None
    return functools.partial(probabilities, num_actions=num_actions, **hyperparameters)


def logged_policy(cfg: DictConfig, action_spec):
    """What the interaction log keeps of each collect-policy step, [batch, columns] float64
    (src.engine.PolicyColumns): the pick's propensity (NaN where unknown), or over slates each
    candidate's score (NaN where the policy reports none), from which `slate_probabilities`
    gives the slate's propensities once the run is over. Scores, not propensities, because a
    Plackett-Luce slate's position marginals are a sum over subsets, work for NumPy, not the loop."""
    num_actions = int(action_spec.maximum) + 1
    nan = tf.constant(np.nan, tf.float64)
    if is_slate(action_spec):
        def scores(step):
            predicted = getattr(step.info, "predicted_rewards_mean", ())
            if isinstance(predicted, tuple):  # an empty field: the policy reports no scores
                return tf.fill([tf.shape(step.action)[0], num_actions], nan)
            return tf.cast(predicted, tf.float64)
        return scores
    probabilities = action_probabilities(cfg, num_actions)

    def propensity(step):
        action = tf.cast(step.action, tf.int32)
        if probabilities is None:
            return tf.fill([tf.shape(action)[0], 1], nan)
        return tf.gather(probabilities(step), action, batch_dims=1)[:, None]
    return propensity


def slate_probabilities(cfg: DictConfig, num_candidates: int, slate_size: int):
    """The slate collect policy's probabilities of logged slates, a function of (scores [n, N],
    slates [n, K]) -> `src.evaluation.slates.SlateProbabilities`, from its builder module's
    `slate_probabilities` factory (which refuses sizes it cannot compute); None where they are
    unknown (LinUCB and LinTS rank deterministically or by a posterior draw; the ranking agent's
    cosine_distance penalty has no closed form)."""
    factory = getattr(_module_of(cfg), "slate_probabilities", None)
    if factory is None:
        return None
    return factory(num_candidates, slate_size, **OmegaConf.to_container(cfg, resolve=True))
