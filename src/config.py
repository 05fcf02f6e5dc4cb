"""Everything that reads `conf/`: where it is, how every entry point and test composes it, and
the checks on what a user chose (group options, value types), each error naming its YAML file.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import os
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import hydra
from hydra.errors import HydraException
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from src.errors import UserError, require
from src.evaluation import estimators
from src.metrics import FINAL_METRICS, OBJECTIVES
from src.paths import PROJECT_ROOT

CONFIG_DIR = PROJECT_ROOT / "conf"
# No setting here comes near these: beyond them a value is a typo or an overflow (alpha=1e308
# trains like random; a seed of 2^32 overflows NumPy).
LARGEST_NUMBER = 1e6
LARGEST_INTEGER = 2**31 - 1
SMALLEST_FLOAT32 = 1.1754944e-38  # numpy.finfo(numpy.float32).tiny
# Simulated traffic (src.traffic, src.pipeline): beyond these a setting is a typo, a day of
# traffic or of waiting for feedback, ten thousand requests a second.
LONGEST_TRAFFIC_S = 86_400
MOST_REQUESTS_PER_S = 10_000
# Each of a loop's steps is traced into the compiled loop as its own copy of the collect step
# (hundreds of ops): 2,147,483,647 steps never finish tracing.
MOST_STEPS_PER_LOOP = 64
# A signal is honoured between compiled calls, so one call must end within seconds: 200,000
# interactions take 3-15 s at the rates measured here (14,000-66,000/s).
MOST_INTERACTIONS_PER_CALL = 200_000
# Thread pools far beyond the cores only cost memory (100,000 inter-op threads: 8 GB and a hang).
MOST_THREADS_PER_CORE = 4
# What a run keeps in memory per loop (its metric row, with pandas' copies while metrics.csv is
# written) and per logged interaction (user, movie, propensity and reward beside the features),
# and per column a logged slate adds per candidate and per slot (its float64 in the engine's
# record, the log's frame and the propensities' arrays).
BYTES_PER_LOOP = 300
BYTES_PER_LOGGED_INTERACTION = 200
BYTES_PER_LOGGED_SLATE_COLUMN = 32
# Replicas (training.replicas, src.replicas) that share one compiled loop's ops: the vectorised
# linear agents, whose statistics take a replica axis, on the stationary environments of one movie
# per step (a model per movie, or one over the candidates' features). Others train beside them in
# one process, each its own engine.
REPLICATED_AGENTS = ("linucb", "lints")
REPLICATED_ENVIRONMENTS = ("src.envs.movielens.build", "src.envs.movielens_per_arm.build")
# What replicas sharing a loop may set apart, each keeping its own (a sweep's trials batched,
# sweep.batch): agent hyperparameters that leave every tensor's shape as it is.
PER_REPLICA_HYPERPARAMETERS = ("alpha", "tikhonov_weight")
# What a replica holds per arm and cell of a dim x dim matrix, measured (LinUCB at 1,682 movies,
# rank 40: 96 MB a replica; 122 MB with a discount, whose update makes every arm's matrices anew):
# A, A^-1, their float32 scoring copies and an update's temporaries.
REPLICA_BYTES_PER_ARM_CELL = 48
# The time settings' choices, known before TensorFlow loads (src.envs: DRIFTS, DELAYS and
# ARRIVAL_ORDERS, which tests/test_config.py holds these equal to).
TIME_CHOICES = {"drift": ("none", "rotate", "switch"), "delay": ("none", "fixed", "geometric", "heavy"),
                "arrivals": ("none", "first_rating")}
# The timeline's refits a run may ask for: each fits the reward model on every rating before it
# again, 1-3 s on 2 cores at MovieLens 100K (env.refit_every=8 ran 5 loops in 25 s).
MOST_REFITS = 500
# env.delay's default longest wait, in env.delay_loops, by kind (src.envs.base.FeedbackDelay:
# LONGEST_MEANS means, of HEAVY_SCALE x delay_loops for the heavy tail, which tests/test_config.py
# holds these equal to): the pending ring's size before TensorFlow loads.
DEFAULT_LONGEST_DELAYS = {"fixed": 1, "geometric": 10, "heavy": 100}

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
    line ending in the command's `usage`; -h or --help prints the usage and that file (every
    option, its default and what it means), and exits."""
    if {"-h", "--help"} & set(overrides):
        print(f"{usage}\n\nOptions, as key=value (conf/{config_name}.yaml):\n")
        print((CONFIG_DIR / f"{config_name}.yaml").read_text())
        sys.exit(0)
    try:
        cfg = compose(overrides, config_name=config_name)
    except (HydraException, OmegaConfBaseException) as error:
        # Hydra explains over several lines; its first names the bad override.
        raise UserError(f"{str(error).splitlines()[0]} ({usage})") from None
    check_command_types(cfg, config_name)
    return cfg


def check_command_types(cfg: DictConfig, config_name: str) -> None:
    """Each option of `conf/<config_name>.yaml` keeps its default's type (`_require_types_of`)."""
    defaults = {key: value for key, value in OmegaConf.to_container(conf_file(CONFIG_DIR / f"{config_name}.yaml"),
                                                                     resolve=False).items() if key != "defaults"}
    values = OmegaConf.to_container(cfg, resolve=True)
    _require_types_of({key: values[key] for key in defaults if key in values}, defaults, "", command=True)


def conf_file(path: Path) -> DictConfig:
    """A YAML file of conf/, parsed once a process (runs name and check themselves against these
    files, and a sweep's worker runs many): a copy, the caller's to change."""
    return copy.deepcopy(_parsed(path))


@functools.cache
def _parsed(path: Path) -> DictConfig:
    return OmegaConf.load(path)


@functools.cache
def default_option(group: str) -> str:
    """The option conf/config.yaml's defaults list chooses for `group` (`env` -> `movielens`)."""
    defaults = _parsed(CONFIG_DIR / "config.yaml").defaults
    return next(entry[group] for entry in defaults if isinstance(entry, DictConfig) and group in entry)


# Data options that hold logged feedback, not ratings to simulate from: refused where a run would train.
LOGGED_FEEDBACK = {"obd": "data=obd holds logged clicks, not ratings to simulate from: score policies on it with "
                          "python -m src.evaluate data=obd data.dir=<folder> target_policy=bts (docs/obd.md)"}
# Where data lives or how it is checked, not what it is: never what tells runs apart.
DATA_WHEREABOUTS = ("dir", "path", "cache_dir", "url", "sha256", "md5")
# Training settings that change how fast a run goes or which draw it is, not what it does.
NOT_A_TRAINING_CHANGE = ("seed", "chunk_loops", "threads", "jit_compile")


def differences(cfg: DictConfig) -> list[str]:
    """What sets a run apart from one of the same agent with every default: the environment and
    data when not the default ones, the training preset, and the values changed from their YAML
    files, each short (`per_arm`, `synthetic`, `quick`, `alpha=3`). A tuned config is `tuned`."""
    choices = [cfg[group].name.removeprefix("movielens_") for group in ("env", "data")
               if cfg[group].name != default_option(group)]
    if cfg.get("tuned_for"):
        return [*choices, "tuned", *_training_preset(cfg)]
    changed = [f"{key}={_short(value)}" for group in ("agent", "env", "data")
               for key, value in _changed(cfg[group], group, cfg[group].name,
                                          DATA_WHEREABOUTS if group == "data" else ())]
    return [*choices, *_training_preset(cfg), *changed]


def option_file(group: str, option: str) -> DictConfig | None:
    """`conf/<group>/<option>.yaml` as Hydra composes it alone: the options of its group that its
    `defaults:` list names first, its own keys over them (env=movielens_switch is env=movielens
    with drift); None where there is no such file."""
    path = CONFIG_DIR / group / f"{option}.yaml"
    if not path.is_file():
        return None
    own = conf_file(path)
    bases = [option_file(group, entry) for entry in own.pop("defaults", []) if entry != "_self_"]
    return OmegaConf.merge(*bases, own) if bases else own


def _changed(values: DictConfig, group: str, option: str, ignored: tuple[str, ...] = ()) -> list[tuple[str, object]]:
    """The top-level values of `values` that differ from `conf/<group>/<option>.yaml`'s (not those
    that follow another by interpolation: they change with it)."""
    raw = option_file(group, option)
    if raw is None:
        return []
    defaults = OmegaConf.to_container(raw, resolve=True)
    given = OmegaConf.to_container(values, resolve=True)
    return [(key, value) for key, value in given.items()
            if key not in ignored and not key.startswith("_") and key in defaults and value != defaults[key]
            and not OmegaConf.is_interpolation(raw, key)]


def _training_preset(cfg: DictConfig) -> list[str]:
    """The conf/training preset the run's training settings are (none for the default), else
    the settings changed from the default's."""
    given = _what_training_does(cfg.training)
    presets = _training_presets()
    for name, preset in presets.items():
        if preset == given:
            return [] if name == default_option("training") else [name]
    default = presets[default_option("training")]
    return [f"{key}={_short(value)}" for key, value in given.items() if default.get(key) != value]


@functools.cache
def _training_presets() -> dict[str, dict]:
    """Each conf/training preset's settings: the default's with the preset's own on top (every
    preset starts from it). Merged by hand: a run names itself inside Hydra's job, where
    composing again is refused."""
    folder = CONFIG_DIR / "training"
    default = OmegaConf.load(folder / f"{default_option('training')}.yaml")
    presets = {}
    for path in sorted(folder.glob("*.yaml")):
        own = OmegaConf.load(path)
        own.pop("defaults", None)
        presets[path.stem] = _what_training_does(OmegaConf.merge(default, own))
    return presets


def _what_training_does(training: DictConfig) -> dict:
    return {key: value for key, value in OmegaConf.to_container(training, resolve=True).items()
            if key not in NOT_A_TRAINING_CHANGE}


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


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


def check_command_line(args: list[str]) -> DictConfig | None:
    """Refuse an unknown group option, an unknown key or a malformed override in one line,
    before Hydra prints a page about it and exits 1; return the single run's config (None for
    Hydra's own modes: -m, --cfg, --help, whose overrides a single config cannot take)."""
    check_group_choices(args)
    if any(arg.startswith("-") for arg in args):
        return None
    try:
        return compose(args)
    except hydra.errors.HydraException as error:
        missing = re.match(r"Could not override '([^']+)'", str(error))
        if missing:  # Hydra would suggest +key=value, which only earns the refusal that names the settings
            with contextlib.suppress(hydra.errors.HydraException, OmegaConfBaseException):  # else Hydra's line
                check_types(compose([f"++{arg}" if arg.partition("=")[0] == missing.group(1) else arg
                                     for arg in args]))
        raise UserError(composition_error(error)) from None


def composition_error(error: Exception) -> str:
    """Hydra's or OmegaConf's error as one line, with its cause's first line: Hydra's "Error merging
    override hydra.job.chdir=maybe" says why only in its cause ("Value 'maybe' is not a valid bool")."""
    line = " ".join(str(error).split("\n"))
    cause = str(error.__cause__ or "").strip()
    return f"{line}: {cause.splitlines()[0]}" if cause else line


def check_run(cfg: DictConfig, compilable_agent_known: bool = True) -> None:
    """Every check of a run's config that needs neither TensorFlow nor the data, so that a typo
    costs a second: types, sizes, tracking, the objective and offline learning's settings. The
    ranges that depend on the data (env.num_movies) or on an agent's builder are checked when
    they are built. A sweep whose trials choose their agent leaves what XLA can compile to each
    trial (`compilable_agent_known=False`)."""
    check_tuned(cfg)  # first: a tuned file's values on another agent are unknown keys there
    check_types(cfg)
    if cfg.data.get("name") in LOGGED_FEEDBACK:
        raise UserError(LOGGED_FEEDBACK[cfg.data.name])
    with errors_name_source("training"):
        for key in ("batch_size", "steps_per_loop", "loops", "chunk_loops"):
            value = cfg.training[key]
            require(isinstance(value, int) and value >= 1, f"training.{key}", value, "an integer >= 1")
        seed = cfg.training.seed
        require(isinstance(seed, int) and seed >= 0, "training.seed", seed, "an integer >= 0")
        for key, value in cfg.training.threads.items():
            # 0 lets TensorFlow choose; a negative count aborts the process inside TensorFlow.
            require(value >= 0, f"training.threads.{key}", value, "an integer >= 0 (0: TensorFlow's choice)")
    check_agent_ranges(cfg.agent)
    check_sizes(cfg)
    check_time(cfg)
    check_replicas(cfg)
    if cfg.training.get("jit_compile", False) and compilable_agent_known:
        check_compilable(cfg)
    require(cfg.tracking.artifacts in ("full", "light"), "tracking.artifacts", cfg.tracking.artifacts,
            "full or light")
    log_every = cfg.tracking.log_every
    require(log_every is None or (isinstance(log_every, int) and log_every >= 1), "tracking.log_every", log_every,
            "null (about 320 points a curve) or an integer >= 1")
    sampling = cfg.tracking.system_metrics_every_s
    require(sampling >= 0, "tracking.system_metrics_every_s", sampling, ">= 0 (0: none)")
    require(cfg.objective in FINAL_METRICS, "objective", cfg.objective, f"one of {', '.join(FINAL_METRICS)}")
    if is_offline(cfg):
        check_offline(cfg)


# The range of each agent hyperparameter, whatever the agent (its builder checks it too, for code
# that builds one directly): here they cost a second, not TensorFlow's import and the data's load.
AGENT_RANGES = {
    "learning_rate": (lambda value: value > 0, "> 0"),
    "alpha": (lambda value: value > 0, "> 0"),
    "tikhonov_weight": (lambda value: value > 0, "> 0"),
    "temperature": (lambda value: value > 0, "> 0"),
    "epsilon": (lambda value: 0 <= value <= 1, "in [0, 1]"),
    "log_epsilon": (lambda value: 0 <= value <= 1, "in [0, 1]"),
    "discount": (lambda value: 0 < value <= 1, "in (0, 1] (1: no discount)"),
    "dropout_offset": (lambda value: value > 1, "> 1"),
    "min_dropout_rate": (lambda value: 0 < value < 1, "in (0, 1)"),
    "encoding_dim": (lambda value: value >= 1, "an integer >= 1"),
    "encoding_network_num_train_steps": (lambda value: value >= 0, "an integer >= 0"),
}


def check_agent_ranges(agent: DictConfig) -> None:
    """Each hyperparameter of `agent` in its range (AGENT_RANGES); each value of a per-replica list."""
    with errors_name_source("agent", agent.get("name")):
        for key, (allowed, meaning) in AGENT_RANGES.items():
            values = agent.get(key)
            for value in values if isinstance(values, ListConfig) else [values]:
                if isinstance(value, int | float) and not isinstance(value, bool):
                    require(allowed(value), f"agent.{key}", value, meaning)


def check_compilable(cfg: DictConfig) -> None:
    """What XLA cannot compile: the linear agents (arms touched and inverted vary in number every
    loop), the pending feedback of a delay or of lost rewards (varies likewise), the timeline's refits (Python)."""
    if not cfg.agent.get("jit_compile", False):
        raise UserError(f"training.jit_compile=true: XLA cannot compile agent={cfg.agent.name}'s loop; "
                        f"agents it can: {', '.join(compilable_agents())}")
    pending = (f"env.delay={cfg.env.delay}" if cfg.env.get("delay", "none") != "none" else
               f"env.feedback_drop={cfg.env.feedback_drop}" if cfg.env.get("feedback_drop", 0) > 0 else None)
    if pending:
        raise UserError(f"training.jit_compile=true: XLA cannot compile the pending feedback of {pending} "
                        "(a changing number of rewards arrives each loop); use one or the other")
    if cfg.env.name == "movielens_timeline":
        raise UserError("training.jit_compile=true: XLA cannot compile env=movielens_timeline's loop (it refits "
                        "its reward model in Python)")
    if is_offline(cfg):
        raise UserError(f"training.jit_compile=true compiles the online loop; objective={cfg.objective} learns "
                        "from logged interactions")


def compilable_agents() -> list[str]:
    """The agent choices whose YAML says `jit_compile: true`."""
    return sorted(path.stem for path in (CONFIG_DIR / "agent").glob("*.yaml") if conf_file(path).get("jit_compile"))


def is_offline(cfg: DictConfig) -> bool:
    """Whether the run learns from logged interactions, scored off-policy (src.evaluation.offline)."""
    return str(cfg.objective).startswith(estimators.PREFIX)


def check_offline(cfg: DictConfig) -> None:
    require(cfg.offline.logs_run_id is not None, "offline.logs_run_id", None,
            f"a run trained with tracking.log_interactions=true, for objective={cfg.objective}")
    share = cfg.offline.train_share
    require(0 < share < 1, "offline.train_share", share, "in (0, 1): the rest of the log scores the policy")
    require(cfg.offline.reward_model_ridge > 0, "offline.reward_model_ridge", cfg.offline.reward_model_ridge, "> 0")
    estimators.check_folds(cfg.offline.reward_model_folds, "offline.reward_model_folds")
    offline_estimators(cfg)  # a bad hyperparameter is refused now, not after training


def offline_estimators(cfg: DictConfig) -> list[estimators.Estimator]:
    """Every estimator, with the hyperparameters of `offline.estimator_params`."""
    return estimators.configured(estimators.ESTIMATORS, cfg.offline.estimator_params, "offline.estimator_params")


def check_types(cfg: DictConfig) -> None:
    """Values of the wrong type, non-finite or absurdly large, are refused by name before any
    builder trips on them: each value keeps the type of its default in its YAML file, the
    group options' and conf/config.yaml's own (tracking, sweep, objective).

    Hydra's structured configs would check types too, but from a dataclass per YAML file that
    repeats each of its defaults; here the YAML files stay the one schema, and the finite-size
    bound (which structured configs lack) comes with it. Ranges are the builders' to check.
    """
    groups = (("data", cfg.data.name), ("env", cfg.env.name), ("agent", cfg.agent.name), ("training", "default"))
    for group, option in groups:
        own = option_file(group, option)
        if own is not None:
            # A default like `${.rank_k}` has the type of what it points to.
            defaults = OmegaConf.to_container(own, resolve=True)
            values = OmegaConf.to_container(cfg[group], resolve=True)
            with errors_name_source(group, option):
                _require_types_of(values, defaults, group)
    top = conf_file(CONFIG_DIR / "config.yaml")
    for entry in top.defaults:
        if isinstance(entry, str) and "@" in entry:  # a file of its own placed in a section (estimator_params)
            name, package = entry.split("@")
            OmegaConf.update(top, package, conf_file(CONFIG_DIR / f"{name}.yaml"))
    own = {key: default for key, default in OmegaConf.to_container(top, resolve=False).items()
           if key not in ("defaults", "hydra")}
    values = OmegaConf.to_container(cfg, resolve=True)
    _require_types_of({key: value for key, value in values.items() if key not in dict(groups)}, own, "")


def check_sizes(cfg: DictConfig) -> None:
    """Sizes whose product the machine cannot hold or a signal cannot interrupt, refused by name."""
    import psutil  # here: only a run's check needs the machine's size

    training = cfg.training
    per_loop = training.batch_size * training.steps_per_loop
    require(training.steps_per_loop <= MOST_STEPS_PER_LOOP, "training.steps_per_loop", training.steps_per_loop,
            f"at most {MOST_STEPS_PER_LOOP} (each step is compiled into the loop)")
    per_call = per_loop * training.chunk_loops
    require(per_call <= MOST_INTERACTIONS_PER_CALL, "training.chunk_loops", training.chunk_loops,
            f"such that chunk_loops x batch_size x steps_per_loop is at most {MOST_INTERACTIONS_PER_CALL:,} "
            f"interactions, so that Ctrl-C is honoured within seconds ({per_call:,} asked)")
    cores = os.cpu_count() or 1
    for key, value in training.threads.items():
        require(value <= MOST_THREADS_PER_CORE * cores, f"training.threads.{key}", value,
                f"at most {MOST_THREADS_PER_CORE} x the {cores} cores = {MOST_THREADS_PER_CORE * cores}")
    held = training.loops * BYTES_PER_LOOP
    if cfg.tracking.log_interactions:
        slate_columns = 2 * cfg.env.num_actions + 4 * cfg.env.slate_size if "slate_size" in cfg.env else 0
        per_row = BYTES_PER_LOGGED_INTERACTION + slate_columns * BYTES_PER_LOGGED_SLATE_COLUMN
        held += training.loops * per_loop * per_row
    memory = psutil.virtual_memory().total
    require(held <= memory / 2, "training.loops", training.loops,
            f"small enough for the run's history to fit in half of this machine's {memory / 2**30:.0f} GiB "
            f"(it would take about {held / 2**30:,.0f} GiB)")
    # The catalogue's bounds that need no data; the builders check them again against the data's movies.
    movies, candidates = cfg.env.get("num_movies"), cfg.env.get("num_actions")
    require(movies is None or (isinstance(movies, int) and movies >= 2), "env.num_movies", movies,
            "an integer >= 2 (null where allowed: every movie of the data)")
    if candidates is not None:
        most = f"env.num_movies={movies}" if movies else "the data's movies"
        require(isinstance(candidates, int) and 2 <= candidates <= (movies or candidates), "env.num_actions", candidates,
                f"an integer between 2 and {most}")


def check_time(cfg: DictConfig) -> None:
    """The time settings' choices, the timeline's refits, and the rows time keeps: the transitions
    a delay holds back (`longest + 1` loops of them) and an agent's sliding window, which far too
    long fill the machine (a ring of 2^31 loops asked 256 GiB) or slow every loop that scans them."""
    import psutil

    training, env = cfg.training, cfg.env
    for key, choices in TIME_CHOICES.items():
        if key in env:
            require(env[key] in choices, f"env.{key}", env[key], f"one of {', '.join(choices)}")
    # The ranges that need no data, as the builders check them again (src.envs, src.agents.linear).
    if env.get("drift", "none") != "none":
        require(isinstance(env.drift_period, int) and env.drift_period >= training.batch_size, "env.drift_period",
                env.drift_period, f"an integer number of interactions, at least training.batch_size={training.batch_size}")
    if "feedback_drop" in env:
        require(0 <= env.feedback_drop < 1, "env.feedback_drop", env.feedback_drop, "in [0, 1)")
    if env.get("arrivals", "none") != "none":
        require(isinstance(env.arrivals_every, int) and env.arrivals_every >= 1, "env.arrivals_every",
                env.arrivals_every, "an integer >= 1 (interactions between two arrivals)")
        # A first catalogue holds a movie (per-arm: a candidate set) and at most the pool, where the
        # config sizes it (check_sizes has held it to its candidates); a pool of every movie (null) is
        # known once the data has loaded.
        fewest, pool, start = env.get("num_actions", 1), env.get("num_movies"), env.arrivals_start
        fewest_meaning = f"env.num_actions={fewest} (a full candidate set)" if "num_actions" in env else "1"
        most_meaning = f"env.num_movies={pool}" if pool else "the data's movies"
        require(isinstance(start, int) and fewest <= start <= (pool or start), "env.arrivals_start", start,
                f"an integer between {fewest_meaning} and {most_meaning}")
    if "history_share" in env:
        require(isinstance(env.history_share, float) and 0 < env.history_share < 1, "env.history_share",
                env.history_share, "a share in (0, 1): the ratings that are the past when the replay starts")
    per_loop = training.batch_size * training.steps_per_loop
    if "refit_every" in env:
        least = -(-training.loops * per_loop // MOST_REFITS)
        require(isinstance(env.refit_every, int) and env.refit_every >= least, "env.refit_every", env.refit_every,
                f"an integer of at least {least:,}: at most {MOST_REFITS} refits of the reward model in the run's "
                f"{training.loops * per_loop:,} interactions")
    candidates = env.get("num_actions", 0)
    # A row's floats: its observation (per-arm: the candidates' features too), the policy's score
    # of every movie or candidate, the action, rewards and step types; each replica keeps its own.
    row_bytes = 8 * (env.get("rank_k", 1) * (1 + 2 * candidates) + (candidates or env.get("num_movies") or 1) + 16)
    row_bytes *= training.get("replicas", 1)
    half = psutil.virtual_memory().total / 2
    if env.get("delay", "none") != "none":
        loops, longest = env.delay_loops, env.get("delay_longest")
        require(isinstance(loops, int) and 1 <= loops < training.loops, "env.delay_loops", loops,
                f"a whole number of loops from 1 to training.loops - 1 = {training.loops - 1}: a reward due at the "
                "run's end or after never reaches the agent")
        require(longest is None or (isinstance(longest, int) and loops <= longest <= training.loops),
                "env.delay_longest", longest, f"null or a whole number of loops from env.delay_loops={loops} to "
                                              f"training.loops={training.loops}")
        slots = (longest or DEFAULT_LONGEST_DELAYS[env.delay] * loops) + 1
        require(slots * per_loop * row_bytes <= half, "env.delay_longest" if longest else "env.delay_loops",
                longest or loops, f"small enough for the feedback held back to fit in half of this machine's "
                                  f"{half * 2 / 2**30:.0f} GiB (about {slots * per_loop * row_bytes / 2**30:,.0f} GiB)")
    window = cfg.agent.get("window")
    if window is not None:
        # Not bounded by the run: an offline learner's (src.retrain, objective=ope/*) window counts logged rounds.
        require(isinstance(window, int) and window >= 1, "agent.window", window,
                "null (every interaction counts) or a whole number >= 1")
        require(window * row_bytes <= half, "agent.window", window, f"small enough to fit in half of this machine's "
                                                                    f"{half * 2 / 2**30:.0f} GiB (about "
                                                                    f"{window * row_bytes / 2**30:,.0f} GiB)")


def shares_ops(cfg: DictConfig) -> bool:
    """Whether the replicas of `cfg` share one compiled loop's ops (src.replicas)."""
    return cfg.training.get("replicas", 1) > 1 and can_share_ops(cfg)


def shares_compilation(cfg: DictConfig) -> bool:
    """Whether the replicas of `cfg` share one compiled loop, its ops or (XLA's) its compilation (src.replicas)."""
    return cfg.training.get("replicas", 1) > 1 and (can_share_ops(cfg) or compilation_key(cfg) is not None)


def can_share_ops(cfg: DictConfig) -> bool:
    """Whether runs of `cfg` can train side by side in one compiled loop: REPLICATED_AGENTS, without a
    window or logging propensities, on one of the REPLICATED_ENVIRONMENTS without drift, arrivals or delays."""
    agent, env = cfg.agent, cfg.env
    stationary = (env.get("drift") == "none" and env.get("delay") == "none" and env.get("feedback_drop") == 0
                  and env.get("arrivals", "none") == "none")
    return (agent.name in REPLICATED_AGENTS and env.get("_target_") in REPLICATED_ENVIRONMENTS and stationary
            and not any(agent.get(key) for key in ("window", "log_epsilon", "propensity_draws")))


def sharing_key(cfg: DictConfig) -> str | None:
    """What runs must have alike to train side by side in one loop (all but their seeds, their
    PER_REPLICA_HYPERPARAMETERS and how they are tracked); None for a run that cannot."""
    return alike_but_seeds(cfg, PER_REPLICA_HYPERPARAMETERS) if can_share_ops(cfg) else None


def compilation_key(cfg: DictConfig) -> str | None:
    """What runs whose loop XLA compiles must have alike to train on one compilation, in turn
    (src.shared_compilation): all but their seeds and how they are tracked; None for a run whose
    loop XLA does not compile."""
    return alike_but_seeds(cfg) if cfg.training.get("jit_compile", False) else None


def alike_but_seeds(cfg: DictConfig, agent_keys: Sequence[str] = ()) -> str:
    """`cfg` as a key, without its seed, replicas, tracking and these of its agent's settings."""
    alike = OmegaConf.to_container(cfg, resolve=True)
    del alike["training"]["seed"], alike["tracking"]
    alike["training"].pop("replicas", None)
    for key in agent_keys:
        alike["agent"].pop(key)
    return json.dumps(alike, sort_keys=True, default=str)


def members(cfg: DictConfig) -> list[DictConfig]:
    """The runs of `cfg.training.replicas` replicas, each as a run of its own: seed + r, no replicas."""
    runs = []
    for replica in range(cfg.training.get("replicas", 1)):
        member = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
        member.training.seed = cfg.training.seed + replica
        member.training.replicas = 1
        runs.append(member)
    return runs


def check_replicas(cfg: DictConfig) -> None:
    """`training.replicas`: a positive integer, without what a group does not log (interactions,
    offline learning), and only as many as half the machine's memory holds."""
    replicas = cfg.training.get("replicas", 1)  # a run logged before replicas has none
    require(isinstance(replicas, int) and replicas >= 1, "training.replicas", replicas, "an integer >= 1")
    if replicas == 1:
        return
    last_seed = cfg.training.seed + replicas - 1
    require(last_seed <= LARGEST_INTEGER, "training.replicas", replicas,
            f"such that the last replica's seed, training.seed + replicas - 1 = {last_seed}, is at most "
            f"{LARGEST_INTEGER}")
    require(not cfg.tracking.log_interactions, "training.replicas", replicas, "1 with tracking.log_interactions=true")
    require(not is_offline(cfg), "training.replicas", replicas, f"1 for offline learning (objective={cfg.objective})")
    check_group_fits(replicas, cfg, "training.replicas")


def cores_share(processes: int = 1) -> int:
    """The cores of this process's machine (those it may run on) each of `processes` processes
    sharing them gets, at least one: how many threads a group of runs trains on."""
    return max(1, len(os.sched_getaffinity(0)) // processes)


def check_group_fits(runs: int, cfg: DictConfig, key: str) -> None:
    """Refuse (naming `key`) a group of `runs` runs of `cfg` whose statistics and histories would
    take more than half of this machine's memory."""
    import psutil

    dim = cfg.env.get("rank_k", 1)
    # null, every movie of the data, is not known before the data loads: the environments that allow
    # it score candidates by their features, with one shared model, or train their replicas in turn.
    movies = cfg.env.get("num_movies") or 1
    needed = runs * (movies * dim * dim * REPLICA_BYTES_PER_ARM_CELL
                     + cfg.training.loops * BYTES_PER_LOOP)
    memory = psutil.virtual_memory().total
    require(needed <= memory / 2, key, runs, f"small enough for the runs' statistics and histories to fit in half "
                                            f"of this machine's {memory / 2**30:.0f} GiB (they would take about "
                                            f"{needed / 2**30:,.0f} GiB)")


def check_tuned(cfg: DictConfig) -> None:
    """A tuned configuration (conf/tuned/, which records what it was tuned for in `tuned_for`)
    holds values for one agent on one environment; with another `agent=` or `env=` on the
    command line they would silently land on an agent they mean nothing to."""
    tuned = cfg.get("tuned_for")
    if tuned and (tuned.agent, tuned.env) != (cfg.agent.name, cfg.env.name):
        raise UserError(f"tuned={tuned.agent}-{tuned.env} holds values tuned for agent={tuned.agent} on "
                        f"env={tuned.env}, not for agent={cfg.agent.name} on env={cfg.env.name}; "
                        "drop the other agent= or env= choice")


def _require_types_of(values: dict, defaults: dict, prefix: str, command: bool = False) -> None:
    """A number stays a finite number of sensible size (an integer an integer), a boolean a
    boolean, a list a list, so `agent.alpha=abc` or `agent.alpha=inf` is refused by name; a
    key its YAML file lacks (`+agent.alpah=3`) is refused too, as nothing would read it. A
    `command`'s options (`check_command_types`) need only be finite numbers where their default is
    a number (rate=0.5; each command checks its ranges), may be any text where it is text, and may
    hold the keys a group adds."""
    unknown = sorted(set(values) - set(defaults) - {"tuned_for"})  # what a tuned config records
    if unknown and not command:
        name = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        known = ", ".join(key for key in defaults if not key.startswith("_") and key != "defaults")
        raise UserError(f"{name} is not a setting here; the settings are: {known}", key=name)
    for key, default in defaults.items():
        value = values.get(key)
        if key.startswith("_") or default is None or (isinstance(default, str) and default.startswith("${")):
            continue  # no type to keep: Hydra's own keys, optional values, interpolations
        if key not in values:
            continue  # a setting added since a logged run's config was written (src.retrain reads those)
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(default, dict):
            require(isinstance(value, dict), name, value, "a mapping")
            _require_types_of(value, default, name, command)
        elif isinstance(default, bool):
            require(isinstance(value, bool), name, value, "true or false")
        elif isinstance(default, (int, float)) and command:  # each command checks its own ranges
            require(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value), name,
                    value, "a finite number")
        elif isinstance(default, int):
            require(isinstance(value, int) and not isinstance(value, bool), name, value, "an integer")
            require(abs(value) <= LARGEST_INTEGER, name, value, f"an integer of at most {LARGEST_INTEGER} in size")
        elif isinstance(default, float):
            require(isinstance(value, (int, float)) and not isinstance(value, bool), name, value, "a number")
            require(math.isfinite(value) and abs(value) <= LARGEST_NUMBER, name, value,
                    f"a finite number of at most {LARGEST_NUMBER:g} in size")
            # Agents compute in float32, where 1e-300 is 0 and passes a check of `> 0` as nonzero.
            require(value == 0 or abs(value) >= SMALLEST_FLOAT32, name, value,
                    f"0 or at least {SMALLEST_FLOAT32:.3g} in size (the agents compute in float32)")
        elif not (command and isinstance(default, str)):  # a command's text options (window=5000) are its own
            require(isinstance(value, type(default)), name, value, f"a {type(default).__name__}")
