"""The leaderboard's tables, from its runs in MLflow: per environment, one row per entry (the
runs tagged `leaderboard.entry` with one label), ranked by final cumulative regret with
src.comparison's statistics; the page that benchmarks/leaderboard.py writes, with its CSVs
(the table, the curves), from which `rebuild` makes the page and its figures again without
the runs (`uv run python -m docs.rebuild_leaderboards` for the pages under docs/)."""

from __future__ import annotations

import collections
import concurrent.futures
import copy
import functools
import logging
import multiprocessing
import os
import re
import signal
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from src import comparison, config, metrics, plots, tracking
from src.cli import TERMINATION, Terminated
from src.errors import UserError, one_line

LINEUP = config.CONFIG_DIR / "leaderboard.yaml"
ENTRY_TAG = "leaderboard.entry"
ENV = comparison.ENV
METRIC = metrics.CUMULATIVE_REGRET
CONFIDENCE = 0.95
VERSIONS = ("tensorflow", "tf-agents", "mlflow", "optuna", "numpy")
# Agent parameters that name or wire the agent rather than set how it learns.
NOT_HYPERPARAMETERS = ("agent._target_", "agent.name", "agent.per_arm", "agent.slate", "agent.action_mask",
                       "agent.jit_compile")
# Environment parameters the searches tune beside the agent's (conf/hparams_search/).
TUNED_ENV_KEYS = ("env.rank_k",)
# The entry every figure draws as the line to beat, not as a contender.
REFERENCE_AGENT = "random"
ABOUT = "about.md"  # hand-written: what the page's environments are, kept when the page is made again
CURVES = "curves.csv"
DATA_PLACEHOLDER = "/path/to/ml-100k"
MACHINE_PATH = re.compile(r"(--data-dir[ =]|data\.dir=)('[^']*'|\S+)")
# What `markdown` writes first: rebuild reads the title, the command and the wall time back.
PAGE_HEADER = re.compile(r"# (?P<title>.+)\n\nMade by `(?P<command>.+?)`; (?P<wall>.+?)\. Rank by final")

# A job whose worker process died this many times is given up (out of memory each time, say).
WORKER_DEATHS = 2
POOL_TAG = "leaderboard.pool"  # the pool of worker processes a run was trained in
STARTED, STOPPED = "started", "stopped"  # what a worker says of a job
LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"

log = logging.getLogger(__name__)
_news = None  # in a worker process: where it says which job it starts and stops (train_in_processes)

Identity = tuple[str, tuple[tuple[str, str], ...]]


def training_rate(runs: pd.DataFrame) -> pd.Series:
    """Each run's interactions per second: a replica's group's (src.replicas), what the machine gave
    the group's training, else its own."""
    own = comparison.column(runs, f"metrics.{metrics.INTERACTIONS_PER_S}")
    return comparison.column(runs, f"metrics.{metrics.GROUP_INTERACTIONS_PER_S}").fillna(own)


def identity(label: str, params: dict[str, str]) -> Identity:
    """What makes two runs the same leaderboard run: the entry, and every config parameter, the
    seed included, but where the run is stored and how it spreads over threads (src.comparison's
    NOT_CONFIG), each setting the run's options gained since it was made at its default
    (`with_new_defaults`)."""
    return label, tuple(sorted((key, value) for key, value in with_new_defaults(params).items()
                               if key == comparison.SEED or not comparison.NOT_CONFIG.fullmatch(key)))


@dataclass(frozen=True)
class Job:
    label: str
    cfg: DictConfig

    def identity(self) -> Identity:
        return identity(self.label, tracking.run_params(self.cfg))

    def __str__(self) -> str:
        first, replicas = self.cfg.training.seed, self.cfg.training.get("replicas", 1)
        seeds = f"seed {first}" if replicas == 1 else f"seeds {first}-{first + replicas - 1}"
        return f"{self.label} on {self.cfg.env.name}, {seeds}"


def jobs(lineup: DictConfig, agents: list[str] | None, envs: list[str] | None, seeds: int,
         overrides: list[str]) -> list[Job]:
    """Every run of the line-up, its config composed and checked before any training starts."""
    known = [entry.agent for entry in lineup.entries]
    for name in agents or []:
        if name not in known:
            raise UserError(f"--agents: no entry for agent '{name}' in the line-up; "
                            f"choose from {', '.join(dict.fromkeys(known))}")
    for name in envs or []:
        if name not in lineup.environments:
            raise UserError(f"--envs: unknown environment '{name}'; choose from {', '.join(lineup.environments)}")
    found = []
    for entry in lineup.entries:
        if agents and entry.agent not in agents:
            continue
        label = entry.get("label") or (f"{entry.agent} (tuned)" if entry.get("tuned") else entry.agent)
        for env in entry.get("envs") or lineup.environments:
            if envs and env not in envs:
                continue
            tuned = [f"tuned={entry.agent}-{env}"] if entry.get("tuned") else []
            base = [f"agent={entry.agent}", f"env={env}", *tuned, *lineup.overrides, *entry.get("overrides", []),
                    *overrides]
            config.check_group_choices(base[:2])
            if not runs_on(entry.agent, env, lineup):
                continue
            # One composition an entry, its seeds copies of it: Hydra's compose (~0.1 s) for each
            # of the board's 260 runs took 25 s before any worker started.
            composed = config.check_command_line(base)
            if lineup.get("jit_compile") and compilable(composed):
                composed.training.jit_compile = True
            found += [Job(label, seeded(composed, seed)) for seed in range(seeds)]
    if not found:
        raise UserError("no runs: no entry of the line-up matches --agents and --envs")
    return found


def seeded(cfg: DictConfig, seed: int) -> DictConfig:
    """A copy of `cfg` with `training.seed=seed`, as composing it with that override makes it."""
    run = copy.deepcopy(cfg)
    run.training.seed = seed
    return run


def compilable(cfg: DictConfig) -> bool:
    """Whether XLA can compile the loop of `cfg`'s run (config.check_compilable)."""
    try:
        config.check_compilable(cfg)
    except UserError:
        return False
    return True


def train_job(job: Job, cores: int, tags: dict[str, str] | None = None) -> tuple[list[float | None] | None, str | None]:
    """Train a job of the board, its runs tagged with its entry and `tags`: (each run's final
    cumulative regret, None for a run that failed, and the one-line reason any failed), or (None,
    why none trained). A replica group trains on `cores` threads, a run that diverges in it
    failing alone; an unexpected error fails the job's runs, its traceback logged, and is
    returned as the others are, so that the board goes on."""
    from src import replicas, training  # TensorFlow: in the worker that trains, not in the command

    tags = {ENTRY_TAG: job.label, **(tags or {})}
    try:
        if job.cfg.training.replicas > 1:
            trained = replicas.train_seeds(job.cfg, tags, cores)
            stopped = "; ".join(replicas.stopped_runs(job.cfg, trained))
            return [None if each.stopped else each.final[METRIC] for each in trained], stopped or None
        final, _ = training.train(job.cfg, tags)
    except UserError as error:
        return None, str(error)
    except Exception as error:
        log.exception("%s failed", job)
        return None, one_line(error)
    return [final[METRIC]], None


def train_in_processes(todo: list[Job], workers: int, experiment_id: str,
                       report: Callable[[Job, list | None, str | None], None], train: Callable = train_job) -> None:
    """`train` each job of `todo`, `workers` at a time in processes of their own, `report`ing each
    job's outcome as it comes. A worker killed outright (SIGKILL, out of memory) breaks the pool,
    which stops the other workers (their runs end KILLED at the end of a chunk): the runs the
    dead one left RUNNING end FAILED, the jobs whose runs all ended are taken from the store, and
    the rest train again in a fresh pool; a job whose worker died WORKER_DEATHS times is given
    up, so that the board goes on and ends. The runs are told apart by a tag of their pool's."""
    deaths: collections.Counter[int] = collections.Counter()
    left = dict(enumerate(todo))
    context = multiprocessing.get_context("spawn")  # not forked: TensorFlow's threads do not survive a fork
    while left:
        pool_tag, news = {POOL_TAG: uuid.uuid4().hex}, context.SimpleQueue()
        started, stopped = [], []  # job indices, in the order the workers said so
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_started,
                                                    initargs=(news,)) as pool:
            running = {pool.submit(_announced, train, index, job, config.cores_share(workers), pool_tag): index
                       for index, job in left.items()}
            try:
                for done in concurrent.futures.as_completed(running):
                    _read(news, started, stopped)  # as it comes: a full pipe would block the workers
                    outcome = done.result()  # raises where the pool broke: the job stays left
                    report(left.pop(running[done]), *outcome)
                return
            except KeyboardInterrupt:  # the command is stopped: what has not started never will
                pool.shutdown(wait=False, cancel_futures=True)
                # The pool has handed a job beyond its workers to its queue already, which no cancel
                # reaches, and a worker ignores Ctrl-C: each is stopped (its run KILLED) before it takes it.
                for worker in multiprocessing.active_children():
                    worker.terminate()
                raise
            except concurrent.futures.process.BrokenProcessPool:
                _read(news, started, stopped)
                stopped_first = list(stopped)  # before the pool stopped the others: stopped from outside
        _read(news, started, stopped)
        runs = pool_runs(experiment_id, pool_tag)
        ended = {identity: final for identity, _, status, final in runs if status in ("FINISHED", "FAILED")}
        for index, job_runs in [(index, members(job)) for index, job in left.items()]:
            if set(job_runs) <= ended.keys():  # its runs ended on their own, but the break lost its outcome
                finals = [ended[member] for member in job_runs]
                report(left.pop(index), finals,
                       None if None not in finals else "failed (the reason went with the pool: see its runs)")
        left_running = end_runs_left_running(runs)
        # Who died: a job that neither ended nor stopped when the pool asked, else one that had
        # stopped before the break (a SIGTERM from outside); a worker that died idle is no job's.
        vanished = [index for index in dict.fromkeys(started) if index in left and index not in stopped]
        killers = vanished or [index for index in stopped_first if index in left]
        if killers:
            log.warning("A worker process died training %s; its runs left RUNNING (%d) ended FAILED",
                        "; ".join(str(left[index]) for index in killers), left_running)
        for index in killers:
            deaths[index] += 1
            if deaths[index] == WORKER_DEATHS:
                report(left.pop(index), None, f"its worker process died {WORKER_DEATHS} times (killed, or out of "
                                              f"memory): given up, its runs ended FAILED")
        if left:
            log.warning("%d jobs train again in fresh worker processes", len(left))


def _worker_started(news) -> None:
    """A worker process says on `news` which job it starts and which it stopped, stops on SIGTERM
    (a run ending KILLED; idle, at once and quietly), logs as the command does, and leaves Ctrl-C
    to the command."""
    global _news
    _news = news
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for signum in TERMINATION:
        signal.signal(signum, _stop)
    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT)


_training = False  # whether this worker process is in a job


def _stop(signum, frame) -> None:
    if _training:
        raise Terminated(signum)
    os._exit(128 + signum)  # between jobs: nothing to end (raising printed a traceback from the pool's loop)


def _announced(train: Callable, index: int, job: Job, cores: int, tags: dict[str, str]):
    global _training
    try:
        _training = True
        _news.put((STARTED, index))
        return train(job, cores, tags)
    except Terminated:  # stopped, as the pool stops its workers once one died: not on to the next job
        _news.put((STOPPED, index))
        os._exit(128 + signal.SIGTERM)
    finally:
        _training = False


def _read(news, started: list[int], stopped: list[int]) -> None:
    while not news.empty():
        what, index = news.get()
        (started if what == STARTED else stopped).append(index)


def pool_runs(experiment_id: str, pool_tag: dict[str, str]) -> list[tuple[Identity, str, str, float | None]]:
    """The runs a pool's workers made: (identity, run id, status, final cumulative regret if it
    FINISHED)."""
    (key, value), = pool_tag.items()
    runs = mlflow.search_runs([experiment_id], filter_string=f"tags.`{key}` = '{value}'")
    if not len(runs):
        return []
    finals = comparison.column(runs, f"metrics.{METRIC}")
    return [(each, run_id, status, None if pd.isna(final) or status != "FINISHED" else float(final))
            for each, run_id, status, final in zip(identities(runs), runs.run_id, runs.status, finals)]


def end_runs_left_running(runs: list, why: str = "its worker process died") -> int:
    """End FAILED a pool's runs still RUNNING once its workers are gone: a worker that died could
    not end them. How many there were."""
    left_running = [run_id for _, run_id, status, _ in runs if status == "RUNNING"]
    for run_id in left_running:
        tracking.fail_run(run_id, f"benchmarks.leaderboard: {why}")
    return len(left_running)


def members(job: Job) -> list[Identity]:
    """The identities of the runs of `job`, a seed each (a replica group has several)."""
    single = OmegaConf.merge(job.cfg, {"training": {"replicas": 1}})
    return [Job(job.label, seeded(single, seed)).identity()
            for seed in range(job.cfg.training.seed, job.cfg.training.seed + job.cfg.training.replicas)]


def failed_runs(job: Job, finals: list[float | None] | None) -> int:
    """How many of the job's runs failed: every one where it has no finals."""
    return job.cfg.training.replicas if finals is None else sum(final is None for final in finals)


def in_groups(todo: list[Job]) -> list[Job]:
    """`todo` with each entry's runs of consecutive seeds as one replica group (training.replicas)
    where the replicas share a compiled loop's ops or its compilation (config.shares_compilation):
    elsewhere a group would only train them in turn, at no gain."""
    grouped: list[Job] = []
    for job in todo:
        last = grouped[-1] if grouped else None
        if last is not None and last.label == job.label and same_but_seed(last.cfg, job.cfg):
            group = OmegaConf.merge(last.cfg, {"training": {"replicas": last.cfg.training.replicas + 1}})
            if config.shares_compilation(group):
                grouped[-1] = Job(last.label, group)
                continue
        grouped.append(job)
    return grouped


def same_but_seed(group: DictConfig, run: DictConfig) -> bool:
    """Whether `run` is the run of the seed after `group`'s last, in the same configuration."""
    def rest(cfg):
        return {key: value for key, value in tracking.flatten(cfg).items()
                if key not in ("training.seed", "training.replicas")}

    return run.training.seed == group.training.seed + group.training.replicas and rest(group) == rest(run)


def runs_on(agent: str, env: str, lineup: DictConfig) -> bool:
    """Whether the agent's YAML says it can take the environment: what the line-up `requires`
    there (per_arm: per-arm features, slate: slates)."""
    needed = lineup.get("requires", {}).get(env)
    return needed is None or bool(OmegaConf.load(config.CONFIG_DIR / "agent" / f"{agent}.yaml").get(needed, False))


def identities(runs: pd.DataFrame) -> pd.Series:
    """Each leaderboard run's `identity` (None for other runs), from MLflow's runs frame."""
    entries = comparison.column(runs, f"tags.{ENTRY_TAG}")
    params = runs.filter(regex=r"^params\.").rename(columns=lambda name: name.removeprefix("params."))
    return pd.Series([identity(entry, values.dropna().to_dict()) if isinstance(entry, str) else None
                      for entry, (_, values) in zip(entries, params.iterrows())], index=runs.index, dtype=object)


def with_new_defaults(params: dict[str, str]) -> dict[str, str]:
    """A run's params, and each setting its agent's, environment's or training's option gained
    since the run was made (agent.action_mask, env.arrivals, training.jit_compile) at its default,
    which is what the run had: a leaderboard made before keeps its runs. A run made before the
    seeds' streams were mended says so (tracking.STREAMS_PARAM): it is not this code's run."""
    filled = {tracking.STREAMS_PARAM: "from_seed", **params}
    for group, option in (("agent", params.get("agent.name", "")), ("env", params.get("env.name", "")),
                          ("training", "default")):
        for key, value in option_defaults(group, option):
            filled.setdefault(key, value)
    return filled


@functools.cache
def option_defaults(group: str, option: str) -> tuple[tuple[str, str], ...]:
    """The plain settings of `conf/<group>/<option>.yaml` as params (none where there is no such
    file), read once a process: every run of a board asks for its agent's and environment's."""
    parsed = config.option_file(group, option)
    if parsed is None:
        return ()
    return tuple((f"{group}.{key}", str(value)) for key, value in OmegaConf.to_container(parsed, resolve=False).items()
                 if not isinstance(value, dict | list) and not str(value).startswith("${"))


def standings(experiment_id: str, planned: set[Identity] | None = None) -> comparison.Report:
    """One row per environment and entry of the FINISHED leaderboard runs (those `planned`, if
    given), ranked by final regret within an environment, and the curves (mean and band per
    step) of each."""
    runs = comparison.find_runs(experiment_id)
    found = identities(runs)
    chosen = found.map(lambda run: run is not None and (planned is None or run in planned)).astype(bool)
    if not chosen.any():
        raise UserError(f"none of this line-up's runs has FINISHED in experiment "
                        f"'{mlflow.get_experiment(experiment_id).name}'; train them first (without --tables-only)")
    runs = runs[chosen]
    client = mlflow.MlflowClient()
    rows, curves = [], []
    for (environment, label), members in runs.groupby([f"params.{ENV}", f"tags.{ENTRY_TAG}"], sort=True):
        params = comparison.config_params(members)
        check_one_configuration(members, params, environment, label)
        aligned = comparison.align([comparison.history(client, run_id, METRIC) for run_id in members.index])
        curve = comparison.summarise(aligned, CONFIDENCE, METRIC)
        final = curve.iloc[-1]
        rows.append({"environment": environment, "entry": label, "agent": params[comparison.AGENT].iloc[0],
                     "n": len(members), "mean": final["mean"], "ci_low": final["low"], "ci_high": final["high"],
                     "interactions": int(final["step"]),
                     "interactions_per_s": training_rate(members).mean(),
                     "seeds": ",".join(members[f"params.{comparison.SEED}"]),
                     "hyperparameters": hyperparameters(params.iloc[0]),
                     "versions": versions(members)})
        curves.append(curve.assign(environment=environment, configuration=label))
    table = pd.DataFrame(rows).sort_values(["environment", "mean"], ignore_index=True)
    return comparison.Report(table, pd.concat(curves, ignore_index=True))


def check_one_configuration(runs: pd.DataFrame, params: pd.DataFrame, environment: str, label: str) -> None:
    """An entry's runs on an environment must be the seeds of one configuration, each seed once."""
    differing = comparison.grouping_key(params)[1:]
    fix = "train the leaderboard into a fresh experiment (--experiment)"
    if differing:
        raise UserError(f"the runs of {label} on {environment} differ in {', '.join(differing)}; {fix}")
    seeds = runs[f"params.{comparison.SEED}"]
    if seeds.duplicated().any():
        raise UserError(f"{label} on {environment} has more than one run of seed "
                        f"{', '.join(sorted(set(seeds[seeds.duplicated()])))}; {fix}")


def hyperparameters(params: pd.Series) -> str:
    """`alpha=0.3 (default 1.0), tikhonov_weight=1.0, rank_k=7 (default 20)`: the agent's values
    and the rank of its features, each beside its default (conf/agent/<agent>.yaml,
    conf/env/<env>.yaml) where it differs, as a tuned configuration's do."""
    defaults = {}
    for group, option in (("agent", params[comparison.AGENT]), ("env", params.get(ENV))):
        own = config.option_file(group, option)
        if own is not None:
            defaults |= tracking.flatten(OmegaConf.create({group: own}))
    shown = []
    for key, value in sorted(params.dropna().items()):
        if (key.startswith("agent.") and key not in NOT_HYPERPARAMETERS) or key in TUNED_ENV_KEYS:
            default = defaults.get(key)
            differs = f" (default {default})" if default is not None and default != value else ""
            shown.append(f"{key.split('.', 1)[1]}={comparison.shown(value, 4)}{differs}")
    if params.get("training.jit_compile") == "True":
        shown.append("loop compiled by XLA")  # its draws are others than without: a reader should know
    return ", ".join(shown) or "none"


def versions(runs: pd.DataFrame) -> str:
    """The package versions the runs were trained with (every one, if they differ)."""
    return ", ".join(f"{name} {'/'.join(sorted(set(comparison.column(runs, f'tags.version.{name}').dropna()))) or '?'}"
                     for name in VERSIONS)


def public(command: str) -> str:
    """The command as a reader can type it: a data directory is a path on the machine that made
    the page, meaningless elsewhere, so it becomes DATA_PLACEHOLDER."""
    return MACHINE_PATH.sub(lambda found: found[1] + DATA_PLACEHOLDER, command)


def markdown(table: pd.DataFrame, command: str, wall: str, title: str = "Leaderboard", about: str = "") -> str:
    """The leaderboard page: a ranked table and a figure per environment, the hyperparameters,
    the versions and the command; `about`, hand-written Markdown, after the introduction."""
    lines = [f"# {title}", "",
             f"Made by `{public(command)}`; {wall}. Rank by final cumulative regret (lower is better): the mean "
             f"over seeds with the {CONFIDENCE:.0%} Student t-interval of the mean (clipped at 0); "
             "interactions/s is the mean of the runs' `train/interactions_per_s` (tracked training, "
             "first loop to last; for runs trained as a replica group, the group's, "
             "`train/group_interactions_per_s`). The same command with `--tables-only` rebuilds this page from the "
             "tracked runs.", "", *([about.strip(), ""] if about.strip() else [])]
    for environment, rows in table.groupby("environment", sort=True):
        interactions = rows["interactions"].iloc[0]
        lines += [f"## {environment}", "",
                  f"| rank | entry | final cumulative regret ({interactions:,} interactions), mean "
                  f"[{CONFIDENCE:.0%} CI] | interactions/s | seeds |", "|---:|---|---|---:|---|"]
        for rank, row in enumerate(rows.itertuples(), 1):
            band = f" [{plots.number(row.ci_low)}, {plots.number(row.ci_high)}]" if row.n > 1 else " (n=1, no band)"
            lines.append(f"| {rank} | {row.entry} | {plots.number(row.mean)}{band} | {row.interactions_per_s:,.0f} "
                         f"| {row.n} ({row.seeds}) |")
        lines += ["", f"![Cumulative regret on {environment}, the entries in rank order: mean over seeds, "
                      f"{CONFIDENCE:.0%} band]({figure_name(environment)})", ""]
    lines += ["## Hyperparameters", "", "| entry | environment | hyperparameters |", "|---|---|---|"]
    lines += [f"| {row.entry} | {row.environment} | {row.hyperparameters} |"
              for row in table.sort_values(["entry", "environment"]).itertuples()]
    lines += ["", "## Versions", ""]
    lines += [f"- {text}" for text in dict.fromkeys(table["versions"])]
    return "\n".join(lines) + "\n"


def figure_name(environment: str) -> str:
    return f"regret_{environment}.png"


def write(report: comparison.Report, out: Path, command: str, wall: str, title: str = "Leaderboard") -> None:
    """The page (with `out`/about.md, if there), its CSVs and its figures under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    about = out / ABOUT
    (out / "leaderboard.md").write_text(markdown(report.table, command, wall, title,
                                                 about.read_text() if about.is_file() else ""))
    report.table.to_csv(out / "leaderboard.csv", index=False)
    # The curves as well, so that the figures can be drawn again without the runs (rebuild).
    if not report.curves.empty:
        report.curves.to_csv(out / CURVES, index=False, float_format="%.6g")
    for environment, rows in report.table.groupby("environment"):
        curves = report.curves[report.curves["environment"] == environment]
        figure = plots.leaderboard_figure(rows, None if curves.empty else curves, REFERENCE_AGENT, CONFIDENCE)
        figure.suptitle(f"{title} on {environment}: {rows['interactions'].iloc[0]:,} interactions, "
                        f"{rows['n'].max()} seeds")
        figure.savefig(out / figure_name(environment), dpi=120)
    log.info("Wrote %s", out / "leaderboard.md")


def rebuild(out: Path) -> None:
    """Write the page and figures under `out` again from what it keeps: leaderboard.csv, curves.csv
    (the figures show the ranking alone without it) and the page's title, command and wall time.
    Neither MLflow nor training: a page's hour of runs need not be tracked here to redraw it."""
    page = out / "leaderboard.md"
    header = PAGE_HEADER.match(page.read_text()) if page.is_file() else None
    if header is None:
        raise UserError(f"{page}: no leaderboard page that src.leaderboard wrote")
    table = pd.read_csv(out / "leaderboard.csv", dtype={"seeds": str})
    curves = pd.read_csv(out / CURVES) if (out / CURVES).is_file() else pd.DataFrame(columns=["environment"])
    write(comparison.Report(table, curves), out, header["command"], header["wall"], header["title"])
