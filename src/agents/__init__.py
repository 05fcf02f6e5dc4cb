"""Agent builders. Each `conf/agent/*.yaml` names its builder in `_target_`."""

from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf


def build_agent(cfg: DictConfig, time_step_spec, action_spec):
    """Call the builder the agent config names with its hyperparameters and the env's specs.

    Called directly rather than through `hydra.utils.instantiate`, which would wrap a
    builder's `UserError` in its own exception and lose the one-line message.
    """
    hyperparameters = OmegaConf.to_container(cfg, resolve=True)
    builder = get_object(hyperparameters.pop("_target_"))
    return builder(time_step_spec=time_step_spec, action_spec=action_spec, **hyperparameters)
