"""The study a sweep config names: composed and checked, created or resumed with its MLflow
parent run (a grid's points enqueued once), and how many trials end it."""

from __future__ import annotations

import itertools
import logging
import re
import time

import mlflow
import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, OverrideParseException
from hydra.utils import get_class
from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides
from mlflow.entities import RunStatus
from mlflow.tracking.context import registry as context_registry
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from src import config, metrics, tracking
from src.campaigns.repair import RetryDeadWorkersTrial, end_orphaned_runs
from src.campaigns.storage import POLL_SECONDS, open_storage, reaching_storage, shown_storage
from src.campaigns.trials import COMPLETE, FAIL, PARENT_RUN_ATTR
from src.errors import UserError, one_line, require

log = logging.getLogger(__name__)

GRID_ATTR = "grid_size"
SPACE_ATTR = "search_space"  # what the study searches, each dimension's Optuna distribution as JSON
# Pruned trials, per trial asked for, that stop a study with sweep.max_pruned unset: a pruner that
# prunes every new trial (worse than the median of earlier ones) would otherwise run forever.
PRUNED_PER_TRIAL = 4
STUDY_NAME = re.compile(r"[A-Za-z0-9._-]+")


def compose_sweep(overrides: list[str]) -> DictConfig:
    """The sweep's config without its command-line search dimensions (`x=choice(...)`), which
    `search_space` reads; study, storage, sampler and tracking are all that count here."""
    fixed = split_overrides(overrides)[0]
    config.check_group_choices(fixed)  # hparams_search=nope, agent=nope: the choices, not Hydra's page
    try:
        return config.compose(fixed, with_hydra=True)
    except (HydraException, OmegaConfBaseException) as error:
        raise UserError(config.composition_error(error)) from None


def split_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """(fixed overrides, search dimensions) of a command line."""
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException as error:
        # Hydra's message runs over lines: the override, then the grammar's complaint.
        raise UserError(" ".join(str(error).split("\n")[:2]) + " (quote a value holding brackets or $: key='...')") \
            from None
    fixed = [text for text, override in zip(overrides, parsed) if not override.is_sweep_override()]
    return fixed, [text for text in overrides if text not in fixed]


def directions(cfg: DictConfig) -> list[str]:
    direction = cfg.hydra.sweeper.direction
    names = [direction] if isinstance(direction, str) else list(direction)
    return [str(name).lower() for name in names]


def check_sweeper(cfg: DictConfig, overrides: list[str] = ()) -> None:
    """The sweep's settings, and its trials' own (types, sizes) as each trial's are checked, but
    what XLA can compile where the trials choose their agent."""
    searched = {*(cfg.hydra.sweeper.params or {}), *(text.partition("=")[0] for text in split_overrides(list(overrides))[1])}
    # Hydra's own settings resolve only in a job.
    config.check_run(OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"]),
                     compilable_agent_known="agent" not in searched)
    sweeper = cfg.hydra.sweeper
    require(isinstance(sweeper.n_trials, int) and sweeper.n_trials >= 1, "hydra.sweeper.n_trials", sweeper.n_trials,
            "an integer >= 1 (--trials)")
    if cfg.training.replicas != 1:
        raise UserError("training.replicas must be 1 in a campaign: a trial is one run (a worker trains sweep.batch "
                        "trials as a group)")
    batch = cfg.sweep.batch
    require(isinstance(batch, int) and batch >= 1, "sweep.batch", batch, "an integer >= 1")
    if batch > 1:
        require(not cfg.tracking.log_interactions, "sweep.batch", batch, "1 with tracking.log_interactions=true")
        require(not config.is_offline(cfg), "sweep.batch", batch, f"1 for offline learning (objective={cfg.objective})")
        config.check_group_fits(min(batch, sweeper.n_trials), cfg, "sweep.batch")
    wanted = metrics.OBJECTIVES.get(cfg.objective)
    if wanted and directions(cfg) != [wanted]:
        raise UserError(f"hydra.sweeper.direction is {sweeper.direction}, but objective={cfg.objective} "
                        f"is to {wanted}; set hydra.sweeper.direction={wanted}")
    # `remember_trial` hands one trial to the job that runs next; a batch of several would
    # tag runs with the wrong trials.
    if sweeper.n_jobs != 1:
        raise UserError(f"hydra.sweeper.n_jobs must be 1, got {sweeper.n_jobs}; "
                        "run trials in parallel with ./multirun.sh --workers N")
    name = str(sweeper.study_name)
    if not STUDY_NAME.fullmatch(name):
        raise UserError(f"hydra.sweeper.study_name must be letters, digits, '.', '_' or '-' (it names log folders "
                        f"and MLflow models), got {name!r}")
    if cfg.sweep.pruner not in (None, "median", "hyperband"):
        raise UserError(f"sweep.pruner must be null, median or hyperband, got {cfg.sweep.pruner!r}")
    check_recovery(cfg.sweep)
    try:  # each worker builds it again; one it cannot build failed them all with a traceback
        search_space(cfg, list(overrides))
    except (ValueError, TypeError) as error:
        raise UserError(f"the search space cannot be built: {one_line(error)}") from None


def check_recovery(sweep: DictConfig) -> None:
    """The settings that find dead workers and stop a hopeless study, in their ranges: a grace under
    two heartbeats fails trials whose worker is alive (both then train it), a zero budget of
    failures stopped the worker with an IndexError."""
    def whole(key: str, least: int) -> None:
        value = sweep[key]
        require(isinstance(value, int) and not isinstance(value, bool) and least <= value <= config.LARGEST_INTEGER,
                f"sweep.{key}", value, f"an integer >= {least}")

    for key, least in (("heartbeat_s", 1), ("max_retries", 0), ("storage_patience_s", 1), ("max_failures", 1)):
        whole(key, least)
    require(isinstance(sweep.grace_s, int) and 2 * sweep.heartbeat_s <= sweep.grace_s <= config.LARGEST_INTEGER,
            "sweep.grace_s", sweep.grace_s, f"an integer of at least 2 x sweep.heartbeat_s = {2 * sweep.heartbeat_s} "
                                            f"(a live worker's trial would be failed and trained twice)")
    if sweep.max_pruned is not None:
        whole("max_pruned", 1)


def most_pruned(cfg: DictConfig, goal: int) -> int:
    """How many pruned trials stop the study: `sweep.max_pruned`, or PRUNED_PER_TRIAL x its goal."""
    return cfg.sweep.max_pruned if cfg.sweep.max_pruned is not None else PRUNED_PER_TRIAL * goal


def pruner(cfg: DictConfig) -> optuna.pruners.BasePruner:
    """Pruning compares trials at equal interactions; none before a fifth of the run."""
    interactions = cfg.training.loops * cfg.training.batch_size * cfg.training.steps_per_loop
    if cfg.sweep.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=interactions // 5)
    if cfg.sweep.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, interactions // 5), max_resource=interactions)
    return optuna.pruners.NopPruner()


def load_study(cfg: DictConfig, sampler: optuna.samplers.BaseSampler | None = None) -> optuna.Study:
    """The study the sweep config names, checked to agree with the config."""
    name, wanted = cfg.hydra.sweeper.study_name, directions(cfg)
    storage = open_storage(cfg)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with reaching_storage(cfg):
        try:
            study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner(cfg))
        except KeyError:
            raise UserError(f"no study '{name}' in {shown_storage(cfg)}; run the sweep first") from None
    found = [d.name.lower() for d in study.directions]
    if found != wanted:
        raise UserError(
            f"study '{name}' in {shown_storage(cfg)} exists with direction {found}, the config asks for {wanted}; "
            f"use another hydra.sweeper.study_name or storage")
    return study


def is_grid(cfg: DictConfig) -> bool:
    return get_class(cfg.hydra.sweeper.sampler._target_) is optuna.samplers.GridSampler


def search_space(cfg: DictConfig, overrides: list[str]) -> dict[str, optuna.distributions.BaseDistribution]:
    """Optuna distributions from the sweep config's `params` and the command line, read by
    Hydra's Optuna sweeper's own parser: same syntax, same meaning (a fixed value on the
    command line takes its key out of the search)."""
    declared = [f"{key}={value}" for key, value in (cfg.hydra.sweeper.params or {}).items()]
    space, fixed = create_params_from_overrides([*declared, *overrides])
    return {name: distribution for name, distribution in space.items() if name not in fixed}


def create_study(cfg: DictConfig) -> bool:
    """Create the study unless it exists; True for the one process that created it (the
    storage's unique study name decides between workers starting together)."""
    with reaching_storage(cfg):
        try:
            created = optuna.create_study(study_name=cfg.hydra.sweeper.study_name, storage=open_storage(cfg),
                                          directions=directions(cfg))
        except optuna.exceptions.DuplicatedStudyError:
            return False
        # Optuna's plots and optuna-dashboard then say what the value is ("Objective Value" otherwise).
        created.set_metric_names([str(cfg.objective)])
    return True


def parent_run_of(study: optuna.Study, wait_s: float = 60.0) -> str | None:
    """The study's MLflow parent run, waiting a while for the worker that creates it."""
    deadline = time.monotonic() + wait_s
    while (parent_id := study.user_attrs.get(PARENT_RUN_ATTR)) is None and time.monotonic() < deadline:
        time.sleep(POLL_SECONDS)
    return parent_id


def prepare(cfg: DictConfig, overrides: list[str] = ()) -> optuna.Study:
    """Create or resume the study and its MLflow parent run; return the study."""
    check_sweeper(cfg, list(overrides))
    created = create_study(cfg)
    study = load_study(cfg)
    searched = {name: optuna.distributions.distribution_to_json(distribution)
                for name, distribution in sorted(search_space(cfg, list(overrides)).items())}
    if created:
        study.set_user_attr(SPACE_ATTR, searched)
    elif study.user_attrs.get(SPACE_ATTR, searched) != searched:  # a study made before it was recorded: as is
        raise UserError(f"study '{study.study_name}' searches {shown_space(study.user_attrs[SPACE_ATTR])}, this "
                        f"command {shown_space(searched)}: resuming it would report its old trials as this search's; "
                        f"search as it did, or name a new study (hydra.sweeper.study_name=...)")
    experiment_id = tracking.connect(cfg.tracking.uri, cfg.tracking.experiment)
    client = mlflow.MlflowClient()
    parent_id = None if created else parent_run_of(study)
    if parent_id is None:
        # The client, unlike `mlflow.start_run`, adds no source tags (git commit, user) itself.
        parent = client.create_run(
            experiment_id, run_name=f"{study.study_name}·sweep",
            tags=context_registry.resolve_tags({"sweep.study": study.study_name, "sweep.role": "parent",
                                                "sweep.storage": shown_storage(cfg)}))
        parent_id = parent.info.run_id
        study.set_user_attr(PARENT_RUN_ATTR, parent_id)
        for key, value in (cfg.hydra.sweeper.params or {}).items():
            client.log_param(parent_id, f"search.{key}", value)
        if is_grid(cfg):
            enqueue_grid(study, search_space(cfg, list(overrides)))
    else:
        client.update_run(parent_id, status=RunStatus.to_string(RunStatus.RUNNING))
        end_orphaned_runs(study, cfg.tracking.experiment)
    log.info("Study '%s': %d trials complete so far; MLflow parent run %s",
             study.study_name, len(study.get_trials(states=(COMPLETE,))), parent_id)
    return study


def shown_space(space: dict[str, str]) -> str:
    return "; ".join(f"{name} in {repr(optuna.distributions.json_to_distribution(text))}"
                     for name, text in space.items()) or "nothing"


def enqueue_grid(study: optuna.Study, space: dict) -> None:
    """Every grid point once, as a WAITING trial any worker takes (Optuna pops each once)."""
    names = list(space)
    points = list(itertools.product(*(space[name].choices for name in names)))
    for point in points:
        study.enqueue_trial(dict(zip(names, point)))
    study.set_user_attr(GRID_ATTR, len(points))
    log.info("Grid of %d points enqueued over %s", len(points), ", ".join(names))


def target(cfg: DictConfig, study: optuna.Study) -> int:
    """How many COMPLETE trials the study ends with: `n_trials`, or a grid's size."""
    return study.user_attrs.get(GRID_ATTR) or cfg.hydra.sweeper.n_trials


def failed_for_good(study: optuna.Study) -> int:
    """FAIL trials that will not run again (a retry is a new WAITING trial)."""
    retried = {RetryDeadWorkersTrial.retried_trial_number(t) for t in study.trials}
    return sum(1 for t in study.get_trials(states=(FAIL,)) if t.number not in retried)
