"""Everything that reads `conf/`: where it is, how every entry point and test composes it, and
the checks on what a user chose (group options, value types), each error naming its YAML file.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator

import hydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from src.errors import UserError, require
from src.metrics import OBJECTIVES
from src.paths import PROJECT_ROOT

CONFIG_DIR = PROJECT_ROOT / "conf"
# No setting here comes near these: beyond them a value is a typo or an overflow (alpha=1e308
# trains like random; a seed of 2^32 overflows NumPy).
LARGEST_NUMBER = 1e6
LARGEST_INTEGER = 2**31 - 1

# Lets configs place files at the project root whatever the cwd (`${project_root:}`).
OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT), replace=True)
# A sweep's direction follows its objective (a cost is minimised, an estimated value maximised);
# a search config cannot set it itself, as Hydra merges the sweeper's own config after it.
OmegaConf.register_new_resolver("direction_of", lambda objective: OBJECTIVES.get(objective, "minimize"),
                                replace=True)


def compose(overrides: Iterable[str] = (), config_name: str = "config", with_hydra: bool = False) -> DictConfig:
    """`conf/<config_name>.yaml` with command-line style overrides, as `@hydra.main` would
    compose it; `with_hydra` keeps the `hydra` node (sweeper settings)."""
    with hydra.initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        return hydra.compose(config_name, overrides=list(overrides), return_hydra_config=with_hydra)


def compose_command(overrides: list[str], config_name: str, usage: str) -> DictConfig:
    """A command's own `conf/<config_name>.yaml` with its key=value arguments; a bad one is one
    line ending in the command's `usage`."""
    try:
        return compose(overrides, config_name=config_name)
    except (HydraException, OmegaConfBaseException) as error:
        # Hydra explains over several lines; its first names the bad override.
        raise UserError(f"{str(error).splitlines()[0]} ({usage})") from None


def default_option(group: str) -> str:
    """The option conf/config.yaml's defaults list chooses for `group` (`env` -> `movielens`)."""
    defaults = OmegaConf.load(CONFIG_DIR / "config.yaml").defaults
    return next(entry[group] for entry in defaults if isinstance(entry, DictConfig) and group in entry)


def source(group: str, option: str | None = None) -> str:
    """The file a group's values come from, relative to the project root."""
    folder = CONFIG_DIR.relative_to(PROJECT_ROOT) / group
    return str(folder / f"{option}.yaml" if option else folder)


@contextlib.contextmanager
def errors_name_source(group: str, option: str | None = None) -> Iterator[None]:
    """Inside, a `UserError` about a `group.*` key names the YAML file it is set in, so the
    builders that raise it need not know where they are configured."""
    try:
        yield
    except UserError as error:
        if error.key and error.key.startswith(f"{group}.") and error.source is None:
            error.source = source(group, option)
        raise


def check_group_choices(overrides: list[str]) -> None:
    """Refuse `agent=nope` with the list of choices.

    Hydra makes this check too, but per job: in a sweep (`-m agent=linucb,nope`) it finds the
    bad option only when that job starts, after the others have run, and says so in a page.
    """
    for override in overrides:
        key, sep, values = override.partition("=")
        group = key.lstrip("+~")
        folder = CONFIG_DIR / group
        # hydra/* groups are Hydra's and its plugins'; conf/hydra/ adds options, not all of them.
        if not sep or "." in group or "(" in values or group.startswith("hydra/") or not folder.is_dir():
            continue
        choices = sorted(path.stem for path in folder.glob("*.yaml"))
        for value in values.split(","):
            if value not in choices and value != "null":
                raise UserError(f"unknown {group} '{value}'; choose one of: {', '.join(choices)}")


def check_command_line(args: list[str]) -> None:
    """Refuse an unknown group option, an unknown key or a malformed override in one line,
    before Hydra prints a page about it and exits 1."""
    check_group_choices(args)
    if any(arg.startswith("-") for arg in args):
        return  # Hydra's own modes (-m, --cfg, --help) take overrides a single config cannot
    try:
        compose(args)
    except hydra.errors.HydraException as error:
        raise UserError(" ".join(str(error).split("\n"))) from None


def check_types(cfg: DictConfig) -> None:
    """Values of the wrong type, non-finite or absurdly large, are refused by name before any
    builder trips on them: each value keeps the type of its default in its YAML file, the
    group options' and conf/config.yaml's own (tracking, sweep, objective).

    Hydra's structured configs would check types too, but from a dataclass per YAML file that
    repeats each of its defaults; here the YAML files stay the one schema, and the finite-size
    bound (which structured configs lack) comes with it. Ranges are the builders' to check.
    """
    for group, option in (("data", cfg.data.name), ("env", cfg.env.name), ("agent", cfg.agent.name),
                          ("training", "default")):
        path = CONFIG_DIR / group / f"{option}.yaml"
        if path.is_file():
            # A default like `${.rank_k}` has the type of what it points to.
            defaults = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
            values = OmegaConf.to_container(cfg[group], resolve=True)
            with errors_name_source(group, option):
                _require_types_of(values, defaults, group)
    top = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "config.yaml"), resolve=False)
    own = {key: default for key, default in top.items() if key not in ("defaults", "hydra")}
    _require_types_of(OmegaConf.to_container(cfg, resolve=True), own, "")


def check_tuned(cfg: DictConfig) -> None:
    """A tuned configuration (conf/tuned/, which records what it was tuned for in `tuned_for`)
    holds values for one agent on one environment; with another `agent=` or `env=` on the
    command line they would silently land on an agent they mean nothing to."""
    tuned = cfg.get("tuned_for")
    if tuned and (tuned.agent, tuned.env) != (cfg.agent.name, cfg.env.name):
        raise UserError(f"tuned={tuned.agent}-{tuned.env} holds values tuned for agent={tuned.agent} on "
                        f"env={tuned.env}, not for agent={cfg.agent.name} on env={cfg.env.name}; "
                        "drop the other agent= or env= choice")


def _require_types_of(values: dict, defaults: dict, prefix: str) -> None:
    """A number stays a finite number of sensible size (an integer an integer), a boolean a
    boolean, a list a list, so `agent.alpha=abc` or `agent.alpha=inf` is refused by name."""
    for key, default in defaults.items():
        value = values.get(key)
        if key.startswith("_") or default is None or (isinstance(default, str) and default.startswith("${")):
            continue  # no type to keep: Hydra's own keys, optional values, interpolations
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(default, dict):
            require(isinstance(value, dict), name, value, "a mapping")
            _require_types_of(value, default, name)
        elif isinstance(default, bool):
            require(isinstance(value, bool), name, value, "true or false")
        elif isinstance(default, int):
            require(isinstance(value, int) and not isinstance(value, bool), name, value, "an integer")
            require(abs(value) <= LARGEST_INTEGER, name, value, f"an integer of at most {LARGEST_INTEGER} in size")
        elif isinstance(default, float):
            require(isinstance(value, (int, float)) and not isinstance(value, bool), name, value, "a number")
            require(math.isfinite(value) and abs(value) <= LARGEST_NUMBER, name, value,
                    f"a finite number of at most {LARGEST_NUMBER:g} in size")
        else:
            require(isinstance(value, type(default)), name, value, f"a {type(default).__name__}")
