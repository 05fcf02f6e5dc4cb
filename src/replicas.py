"""Runs trained together in one process, each recorded as an ordinary MLflow run:
`training.replicas=R` trains R seeds of one config (seed .. seed + R - 1); a sweep's worker trains
a batch of trials (`sweep.batch`, src.campaigns.worker).

A run's cost at MovieLens' default size is mostly the dispatch of a loop's ~190 small ops, not
their arithmetic. Runs that can share the ops (`config.sharing_key`: the linear agents on the
stationary environment, alike but for their seeds, alpha and ridge; their statistics and the
environment carry a replica axis, src.agents.linear, src.envs.movielens) train side by side in
one compiled loop (`SharedOps`), all but a few per-replica ops (the generators' draws, the scoring
products) serving every run; any other run trains its own engine (`Alone`) beside them, the
parts' chunks in threads, sharing the process's start-up, data, tracking and cores but not the
ops. Either way each run draws from the generators its run alone would (seeded from its own
seed), so its metrics equal that run's
(tests/test_replicas.py); its MLflow run holds what a run of its own holds, with the config that
reproduces it alone (`training.replicas=1`), tagged with its group.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import tensorflow as tf
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from src import agents, config, data, experiment, metrics, serving, shared_compilation, tracking, training
from src.cli import interrupts_handled
from src.engine import configure_threads
from src.errors import UserError, one_line

log = logging.getLogger(__name__)

GROUP_TAG = "bandits.replica_group"  # the same for every run trained in one group
REPLICA_TAG = "bandits.replica"  # "r/R": the run's place in its group


class SharedOps:
    """Members alike but for their seeds and config.PER_REPLICA_HYPERPARAMETERS (config.sharing_key)
    in one compiled loop: an engine whose environment and agent carry them."""

    def __init__(self, members: list[DictConfig], dataset):
        self.members = members
        self.engine = experiment.assemble(members[0], dataset, members)
        self.interactions_per_loop = self.engine.interactions_per_loop

    def run(self, loops: int, chunk: int, stopped=lambda place: False):
        """Each round's chunk of every member (their loop trains them all, stopped or not)."""
        return self.engine.run_replicas(loops, chunk)

    def reward_model(self, place: int):
        return self.engine.environment.reward_model

    def movies_arrived(self, place: int) -> int | None:
        return self.engine.environment.movies_arrived

    def policy(self, place: int):
        """The member's greedy policy as its run alone's agent holds it, to save and serve."""
        member, environment = self.members[place], self.engine.environment
        alone = agents.build_agent(member.agent, environment.time_step_spec(), environment.action_spec(),
                                   member.training.seed)
        alone.take_replica(self.engine.agent, place)
        return alone.policy


class Alone(SharedOps):
    """A member that shares no ops: its engine, assembled and traced under its own seed as its
    run alone's is, so that the op seeds of its random ops are that run's."""

    def __init__(self, member: DictConfig, dataset):
        self.members = [member]
        self.engine = experiment.assemble(member, dataset)
        self.engine.run_chunk.get_concrete_function(tf.TensorSpec([], tf.int32))
        self.interactions_per_loop = self.engine.interactions_per_loop

    def policy(self, place: int):
        return self.engine.agent.policy


class OneCompilation(SharedOps):
    """Members alike but for their seeds whose loop XLA compiles (config.compilation_key), each on
    an engine of its own traced as its run alone's, their chunks in turn on one compiled loop, the
    host's (src.shared_compilation): one compilation, not one a member."""

    def __init__(self, members: list[DictConfig], dataset):
        self.members = members
        self.host = shared_compilation.traced(members[0], dataset)
        self.runs = [shared_compilation.traced(member, dataset) for member in members]
        self._pairs = [shared_compilation.paired_variables(self.host, run) for run in self.runs]
        self._to_host, self._from_host = [], []
        for pairs in self._pairs:
            hosts, runs = [host for host, _ in pairs], [own for _, own in pairs]
            self._to_host.append(shared_compilation.copier(runs, hosts))
            self._from_host.append(shared_compilation.copier(hosts, runs))
        self.interactions_per_loop = self.host.engine.interactions_per_loop

    def run(self, loops: int, chunk: int, stopped=lambda place: False):
        """As `SharedOps.run`, but a member `stopped` (pruned, diverged) trains no further: None."""
        done = 0
        while done < loops:
            size = min(chunk, loops - done)
            round_ = []
            for place, (into_host, out_of_host) in enumerate(zip(self._to_host, self._from_host)):
                if stopped(place):
                    round_.append(None)
                    continue
                into_host()
                round_.extend(next(self.host.engine.run_replicas(size, size)))
                out_of_host()
            done += size
            yield round_

    def reward_model(self, place: int):
        return self.runs[place].engine.environment.reward_model

    def movies_arrived(self, place: int) -> int | None:
        return self.runs[place].engine.environment.movies_arrived

    def policy(self, place: int):
        return self.runs[place].engine.agent.policy


class Group:
    """Runs trained together: those that can share ops (config.sharing_key) in as many compiled
    loops as `cores` (default: this process's), the others alone; every part trains a chunk a
    round, the parts in threads."""

    def __init__(self, members: list[DictConfig], datasets: list, cores: int | None = None):
        alike: dict[object, list[int]] = {}
        for index, member in enumerate(members):
            if key := config.sharing_key(member):
                alike.setdefault((SharedOps, key), []).append(index)
            elif key := config.compilation_key(member):
                alike.setdefault((OneCompilation, key), []).append(index)
            else:
                alike[(Alone, index)] = [index]
        self.parts, self._places = [], {}
        self.refused: dict[int, UserError] = {}  # members whose environment or agent refused their config
        # Members alike train in a compiled loop per core (`run` trains the parts in threads): on 2
        # cores 10 LinUCB runs as two loops of 5 go 3.1x the runs one after another, as one loop 1.8x.
        self.cores = cores or config.cores_share()
        pieces = [(kind, [int(index) for index in piece]) for (kind, _), indices in alike.items()
                  for piece in np.array_split(indices, min(self.cores, len(indices)))]
        for kind, indices in pieces:
            try:
                # Members alike share their data too (it is part of either key).
                self._add(kind if len(indices) > 1 else Alone, [members[index] for index in indices], indices,
                          datasets[indices[0]])
            except UserError as refusal:
                self.refused.update(dict.fromkeys(indices, refusal))
        self.size = len(members)
        self.stopped: set[int] = set()

    def _add(self, kind: type[SharedOps], members: list[DictConfig], indices: list[int], dataset) -> None:
        try:
            part = kind(members, dataset) if kind is not Alone else Alone(members[0], dataset)
        except shared_compilation.Unshareable as reason:
            # Not expected of runs alike but for their seeds: each then compiles its own loop.
            log.warning("The group's runs compile a loop each (%s)", reason)
            for member, index in zip(members, indices):
                self._add(Alone, [member], [index], dataset)
            return
        self.parts.append((part, indices))
        self._places.update({index: (part, place) for place, index in enumerate(indices)})

    def describe(self) -> str:
        shared = [f"{len(indices)} in one compiled loop" if type(part) is SharedOps
                  else f"{len(indices)} in turn on one compilation" for part, indices in self.parts
                  if not isinstance(part, Alone)]
        alone = sum(isinstance(part, Alone) for part, _ in self.parts)
        return ", ".join([*shared, *([f"{alone} on engines of their own"] if alone else [])])

    def interactions_per_loop(self, index: int) -> int:
        return self._places[index][0].interactions_per_loop

    def reward_model(self, index: int):
        part, place = self._places[index]
        return part.reward_model(place)

    def movies_arrived(self, index: int) -> int | None:
        part, place = self._places[index]
        return part.movies_arrived(place)

    def policy(self, index: int):
        part, place = self._places[index]
        return part.policy(place)

    def run(self):
        """Each round of chunks: {member index: its chunk's metrics} of the members not `stopped`,
        each part training its members' `training.loops`; a part whose members have all stopped
        trains no further. The parts train their chunks of a round at once, a thread per core:
        a compiled call lets go of the GIL, and a small agent's ops keep one core busy at most
        (two epsilon-greedy runs in turn 1.4-1.5x faster on 2 cores, neural LinUCB 2x). Each
        part's draws are its own generators', so the order the threads run in changes nothing."""
        running = [(iter(part.run(part.members[0].training.loops, part.members[0].training.chunk_loops,
                                  lambda place, indices=indices: indices[place] in self.stopped)), indices)
                   for part, indices in self.parts]
        with ThreadPoolExecutor(max_workers=max(1, min(len(running), self.cores))) as threads:
            while running:
                running = [(chunks, indices) for chunks, indices in running if not self.stopped.issuperset(indices)]
                round_ = {}
                for (_, indices), chunk in zip(running, threads.map(lambda part: next(part[0], ()), running)):
                    round_.update({index: each for index, each in zip(indices, chunk) if index not in self.stopped})
                if not round_:
                    return
                yield round_


@dataclass
class Trained:
    """A member's end: its final metrics and run, or what stopped it (a pruner, a divergence, or
    its config refused, which starts no run)."""

    final: dict[str, float]
    run_id: str | None
    stopped: Exception | None = None


def train_seeds(cfg: DictConfig, tags: dict[str, str] | None = None, cores: int | None = None) -> list[Trained]:
    """Train the `cfg.training.replicas` runs of `cfg` (seeds seed .. seed + R - 1) together on
    `cores` threads (default: this process's cores), each tracked as its own MLflow run; a run
    that stops (diverges) ends alone, its `Trained` saying why."""
    config.check_run(cfg)
    trained = train_members(config.members(cfg), [tags or {}] * cfg.training.replicas, cores=cores)
    if trained[0].run_id is None:  # refused: the same config refused every member
        raise trained[0].stopped
    return trained


def stopped_runs(cfg: DictConfig, trained: list[Trained]) -> list[str]:
    """A line for each run of `cfg`'s group that stopped: its run, seed and why."""
    return [f"run {each.run_id} (seed {cfg.training.seed + index}): {one_line(each.stopped)}"
            for index, each in enumerate(trained) if each.stopped is not None]


def train_group(cfg: DictConfig, tags: dict[str, str] | None = None,
                cores: int | None = None) -> list[tuple[dict[str, float], str]]:
    """`train_seeds`, each run's final metrics and run id; raises, once all have ended, if any stopped."""
    trained = train_seeds(cfg, tags, cores)
    stopped = stopped_runs(cfg, trained)
    if stopped:
        others = "the others finished" if len(stopped) < len(trained) else "none finished"
        raise UserError(f"{len(stopped)} of the group's {len(trained)} runs stopped, {others}: {'; '.join(stopped)}")
    return [(each.final, each.run_id) for each in trained]


def train_members(members: list[DictConfig], tags: list[dict[str, str]],
                  reporters: list[training.Reporter | None] | None = None, cores: int | None = None) -> list[Trained]:
    """Train `members` (runs of one machine's threads and tracking store; any agents,
    environments, data, seeds) together, each tracked as its own MLflow run with its `tags`, and
    told to its reporter as a run alone would tell it. A member that a reporter stops or that
    diverges ends alone (KILLED, FAILED), the others train on; what stops the whole group (Ctrl-C,
    an error) marks every run.
    A member whose environment or agent refuses its config starts no run, as a run alone would not.
    The group trains on `cores` threads (default: this process's cores)."""
    for member in members:
        config.check_run(member)
    first = members[0]
    configure_threads(first.training.threads.intra_op, first.training.threads.inter_op)
    experiment_id = tracking.connect(first.tracking.uri, first.tracking.experiment)
    datasets = each_dataset(members)
    group = Group(members, datasets, cores)
    if group.refused:
        # The others train as a group of their own (built anew: rare, and simpler than renumbering).
        kept = [index for index in range(len(members)) if index not in group.refused]
        others = iter(train_members([members[index] for index in kept], [tags[index] for index in kept],
                                    [(reporters or [None] * len(members))[index] for index in kept], cores)
                      if kept else [])
        return [Trained({}, None, group.refused[index]) if index in group.refused else next(others)
                for index in range(len(members))]
    random_regrets = [group.reward_model(index).random_policy_regret for index in range(group.size)]
    group_id = uuid.uuid4().hex
    member_tags = [{**extra, training.LONG_NAME_TAG: training.long_name(member, extra), GROUP_TAG: group_id,
                    REPLICA_TAG: f"{index}/{group.size}",
                    metrics.RANDOM_REGRET_TAG: str(metrics.rounded(random_regrets[index]))}
                   for index, (member, extra) in enumerate(zip(members, tags))]
    names = [training.run_name(member, extra) for member, extra in zip(members, tags)]
    histories = [metrics.RegretHistory(group.interactions_per_loop(index)) for index in range(group.size)]
    reward_model = group.reward_model(0)
    with interrupts_handled() as interrupts, tracking.group_runs(members, names, experiment_id, member_tags) as ids:
        log.info("Training %s (%s), %s on %s (%s data), %d users, %d movies; %d loops x %d interactions each",
                 f"{group.size} runs together" if group.size > 1 else "1 run", group.describe(),
                 "/".join(sorted({member.agent.name for member in members})),
                 first.env.name, first.data.name, len(reward_model.user_ids), len(reward_model.movie_ids),
                 first.training.loops, group.interactions_per_loop(0))
        stopped: dict[int, Exception] = {}
        try:
            seconds = run_loops(members, group, histories, ids, random_regrets, interrupts,
                                reporters or [None] * group.size, stopped)
        except BaseException:
            for index in set(range(group.size)) - set(stopped):
                keep_tables(members[index], histories[index], random_regrets[index], ids[index])
            raise
        # A run's own rate is its share of the group's.
        rate = sum(history.loops_done * group.interactions_per_loop(index)
                   for index, history in enumerate(histories)) / seconds / group.size
        unlogged = []
        for index, (run_id, name, member, history) in enumerate(zip(ids, names, members, histories)):
            if index in stopped:
                continue
            try:
                with tracking.finishing(run_id, name, experiment_id):
                    training.log_ratings(member, datasets[index])
                    mlflow.log_metrics({metrics.INTERACTIONS_PER_S: metrics.rounded(rate),
                                        metrics.GROUP_INTERACTIONS_PER_S: metrics.rounded(rate * group.size),
                                        metrics.SECONDS: metrics.rounded(seconds)})
                    log_artifacts(member, group, index, history, random_regrets[index], datasets[index])
            except (OSError, MlflowException) as error:  # the run is FAILED; the others are logged still
                kept = keep_unlogged(member, group, index, history, random_regrets[index], run_id)
                unlogged.append(f"run {run_id}: {one_line(error)}; kept in {kept}")
        if unlogged:
            raise UserError(f"{len(unlogged)} of the group's runs could not write their artifacts to the artifact "
                            f"store ({'; '.join(unlogged)})")
    log.info("Done in %.1f s (%.0f interactions/s in all): cumulative regret %s", seconds, rate * group.size,
             ", ".join(f"{history.final()[metrics.CUMULATIVE_REGRET]:.1f}" for history in histories))
    return [Trained(history.final(), run_id, stopped.get(index))
            for index, (history, run_id) in enumerate(zip(histories, ids))]


def each_dataset(members: list[DictConfig]) -> list:
    """Each member's data, every distinct dataset loaded once."""
    loaded = {}
    for member in members:
        key = OmegaConf.to_yaml(member.data)
        if key not in loaded:
            loaded[key] = data.load(member.data)
    return [loaded[OmegaConf.to_yaml(member.data)] for member in members]


def keep_tables(member: DictConfig, history: metrics.RegretHistory, random_regret: float, run_id: str) -> None:
    """A stopped run keeps its table and plot so far; a store that refuses them too is not what
    stopped it."""
    if history.loops_done:
        with tempfile.TemporaryDirectory() as scratch, contextlib.suppress(OSError, MlflowException):
            training.write_tables(member, history, random_regret, Path(scratch))
            mlflow.MlflowClient().log_artifacts(run_id, scratch)


def log_artifacts(member: DictConfig, group: Group, index: int, history: metrics.RegretHistory,
                  random_regret: float, dataset) -> None:
    """The member's tables, plot and, with full artifacts, its policy, into its active run."""
    training.log_tables(member, history, random_regret)
    if member.tracking.artifacts == "full" and member.tracking.save_policy:
        catalogue = serving.Catalogue.of(group.reward_model(index), dataset.movies, member.env)
        serving.log_policy(group.policy(index), catalogue, group.movies_arrived(index))


def keep_unlogged(member: DictConfig, group: Group, index: int, history: metrics.RegretHistory,
                  random_regret: float, run_id: str) -> Path:
    """What the artifact store refused of a member, on disk as a run alone keeps it (training.UNLOGGED)."""
    kept = training.UNLOGGED / run_id
    kept.mkdir(parents=True, exist_ok=True)
    training.write_tables(member, history, random_regret, kept)
    if member.tracking.artifacts == "full" and member.tracking.save_policy:
        serving.save_policy(group.policy(index), kept / "policy", group.movies_arrived(index))
    return kept


def run_loops(members: list[DictConfig], group: Group, histories: list[metrics.RegretHistory], run_ids: list[str],
              random_regrets: list[float], interrupts, reporters: list[training.Reporter | None],
              stopped: dict[int, Exception]) -> float:
    """Train the group, logging each member's metrics to its run and telling its reporter as they
    come; a member its reporter stops (`tracking.RunStopped`) or that diverges ends there, noted in
    `stopped`; the whole group stops between chunks when interrupted. The seconds it took."""
    downsamplers = [metrics.Downsampler(training.loops_per_point(member)) for member in members]
    writer = tracking.history_writer()  # one write at a time for the whole group
    started = time.perf_counter()
    most = max(member.training.loops for member in members)
    tenths_logged = 0
    # A bar on a terminal only; in a log file, a line per tenth of the run.
    with (contextlib.ExitStack() as stack,
          tqdm(total=most, unit="loop", desc=f"training {group.size} runs", dynamic_ncols=True, disable=None) as bar):
        stack.callback(writer.shutdown)
        loggers = [stack.enter_context(tracking.HistoryLogger(run_id, writer=writer)) for run_id in run_ids]
        for chunks in group.run():
            interrupts.check(urgent_only=True)
            for index, chunk in chunks.items():
                member, history, run_id = members[index], histories[index], run_ids[index]
                try:
                    rows = history.add(chunk)
                    loss = rows[metrics.LOSS].to_numpy()
                    ending = history.loops_done == member.training.loops or not np.isfinite(loss).all()
                    window_rows = downsamplers[index].push(rows, last=ending)
                    if len(window_rows):
                        loggers[index].log(window_rows)
                    training.check_finite(rows, loss)
                    if reporters[index]:
                        reporters[index](int(rows["step"].iloc[-1]), float(rows[member.objective].iloc[-1]), run_id)
                except (tracking.RunStopped, UserError) as stop:
                    stopped[index] = stop
                    group.stopped.add(index)
                    end_stopped(member, history, random_regrets[index], run_id, stop)
            bar.update(max(history.loops_done for history in histories) - bar.n)
            if bar.disable and (tenths := 10 * bar.n // most) > tenths_logged:
                tenths_logged = tenths
                log.info("Loop %d of %d: cumulative regret %s", bar.n, most,
                         ", ".join(f"{history.final()[metrics.CUMULATIVE_REGRET]:.1f}" for history in histories))
            interrupts.check()
    return time.perf_counter() - started


def end_stopped(member: DictConfig, history: metrics.RegretHistory, random_regret: float, run_id: str,
                stop: Exception) -> None:
    """A member stopped on purpose (KILLED) or diverged (FAILED) keeps its table so far and ends
    alone, as its run alone would."""
    keep_tables(member, history, random_regret, run_id)
    on_purpose = isinstance(stop, tracking.RunStopped)
    status = RunStatus.KILLED if on_purpose else RunStatus.FAILED
    mlflow.MlflowClient().set_terminated(run_id, RunStatus.to_string(status))
    log.log(logging.INFO if on_purpose else logging.WARNING, "Run %s stopped and marked %s: %s", run_id,
            RunStatus.to_string(status), one_line(stop))
