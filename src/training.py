"""Training: `fit` trains the experiment a config describes (online in the environment, or
offline from logged interactions); `train` does it as a tracked run, logging params, metric
histories, a regret plot, the config and the policy to MLflow.

`train(cfg, tags, report)` is what every way of running an experiment calls: `src.train`
for one run or a Hydra multirun, `src.sweep` workers for each trial of a campaign. `fit`, the
same training untracked, is what a sweep's retraining of its best trial and `src.evaluate`'s
agents trained on logs call.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from src import tf_runtime  # noqa: F401,I001  (before TensorFlow: a quiet start-up in a spawned process too)
import mlflow
import numpy as np
import pandas as pd
import pyarrow
import pyarrow.compute
import pyarrow.csv
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig
from tensorboard.compat.proto import event_pb2, summary_pb2, types_pb2
from tensorboard.plugins.scalar import metadata as scalar_metadata
from tensorboard.summary.writer.event_file_writer import EventFileWriter
from tqdm import tqdm

from src import agents, config, data, experiment, metrics, plots, serving, tracking
from src.cli import Interrupts, interrupts_handled
from src.engine import Engine, LoopMetrics, configure_threads
from src.errors import UserError, one_line
from src.evaluation import estimators, interactions, offline
from src.paths import PROJECT_ROOT

log = logging.getLogger(__name__)

# Where a run's artifacts go when its artifact store refuses them after training.
UNLOGGED = PROJECT_ROOT / "outputs" / "unlogged"

# Called after each chunk of loops with (interactions so far, the objective's value so far, the
# run's id); it may stop the run by raising `tracking.RunStopped` (a sweep's pruner does).
Reporter = Callable[[int, float, str], None]
LONG_NAME_TAG = "bandits.long_name"
SKIPPED_USERS_TAG = "bandits.skipped_users"
# MLflow's run charts draw at most 320 points of a metric's history: more are not seen, and
# each costs training time (ten times as many points took epsilon-greedy 0.94 -> 0.76 of its
# untracked speed).
CHART_POINTS = 320
# The characters of a run's name before the seed that MLflow's runs table shows uncut.
RUN_NAME_WIDTH = 32


def check_finite(rows: pd.DataFrame, loss: np.ndarray) -> None:
    """Stop a diverged run (a sweep's trial then fails alone) rather than train on NaNs."""
    diverged = np.flatnonzero(~np.isfinite(loss))
    if len(diverged):
        first = diverged[0]
        raise UserError(f"training diverged: the agent's loss is {loss[first]} after "
                        f"{int(rows['step'].iloc[first])} interactions; try a smaller agent.learning_rate")


# Called with each chunk of loops' metrics and their rows in the run's history, as they come.
ChunkWatcher = Callable[[LoopMetrics, pd.DataFrame], None]


@dataclass(frozen=True)
class Fitting:
    """An experiment built and ready to train: its engine, the history it fills, and for offline
    learning the logged rounds it learns from. Built before a tracked run starts, so that a
    config error or unusable logs leave no FAILED run behind."""

    cfg: DictConfig
    engine: Engine
    history: metrics.RegretHistory
    logs: tuple[estimators.Feedback, np.ndarray] | None  # offline learning's rounds and their users' rows

    @classmethod
    def of(cls, cfg: DictConfig, dataset) -> Fitting:
        if cfg.training.get("replicas", 1) != 1:
            raise UserError("training.replicas > 1 trains a group of runs: src.replicas.train_group, as "
                            "python -m src.train does")
        engine = experiment.assemble(cfg, dataset)
        logs = offline.logged_feedback(cfg, engine.environment.reward_model) if config.is_offline(cfg) else None
        return cls(cfg, engine, metrics.RegretHistory(engine.interactions_per_loop), logs)

    def run(self, watch: ChunkWatcher | None = None) -> dict[str, float]:
        """Train; return the final metrics (offline: the off-policy estimates and the true value)."""
        if self.logs is not None:
            return offline.learn(self.cfg, self.engine, *self.logs)
        for chunk in self.engine.run(self.cfg.training.loops, self.cfg.training.chunk_loops):
            rows = self.history.add(chunk)
            if watch:
                watch(chunk, rows)
        return self.history.final()


def fit(cfg: DictConfig, dataset) -> tuple[Engine, dict[str, float]]:
    """Train the experiment `cfg` describes over the parsed `dataset`, untracked: the trained
    engine and the final metrics. The same training as a tracked run's, to the digit."""
    fitting = Fitting.of(cfg, dataset)
    return fitting.engine, fitting.run()


def run_name(cfg: DictConfig, tags: dict[str, str]) -> str:
    """What tells runs apart, short enough for MLflow's runs table: `linucb·alpha=3·quick·s0`
    (agent, what differs from the defaults, seed; a sweep's trial instead of its searched values,
    which its parent run lists: `linucb·s0·t12`). The long form is the run's tag `bandits.long_name`."""
    if "sweep.trial" in tags:
        differing = [cfg.env.name.removeprefix("movielens_")] if cfg.env.name != config.default_option("env") else []
        return "·".join([cfg.agent.name, *differing, f"s{cfg.training.seed}", f"t{tags['sweep.trial']}"])
    parts, differing = [cfg.agent.name], config.differences(cfg)
    while differing and len("·".join([*parts, differing[0]])) <= RUN_NAME_WIDTH:
        parts.append(differing.pop(0))
    if differing:
        parts.append("…")
    return "·".join([*parts, f"s{cfg.training.seed}"])


def long_name(cfg: DictConfig, tags: dict[str, str]) -> str:
    """Every part of the run's identity, `<env>__<agent>[__<differences>]__seed<N>__<time>[__trial<N>]`,
    for its tag."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    trial = f"__trial{tags['sweep.trial']}" if "sweep.trial" in tags else ""
    differing = "".join(f"__{part}" for part in config.differences(cfg))
    return f"{cfg.env.name}__{cfg.agent.name}{differing}__seed{cfg.training.seed}__{stamp}{trial}"


def train(cfg: DictConfig, tags: dict[str, str] | None = None,
          report: Reporter | None = None) -> tuple[dict[str, float], str]:
    """Run the experiment `cfg` describes as an MLflow run with these extra `tags`; return the
    final metrics and the run's id."""
    tags = tags or {}
    config.check_run(cfg)
    configure_threads(cfg.training.threads.intra_op, cfg.training.threads.inter_op)
    experiment_id = tracking.connect(cfg.tracking.uri, cfg.tracking.experiment)
    dataset = data.load(cfg.data)
    fitting = Fitting.of(cfg, dataset)  # before the run: a config error leaves no FAILED run
    engine, history = fitting.engine, fitting.history
    reward_model = engine.environment.reward_model
    tags = {**tags, LONG_NAME_TAG: long_name(cfg, tags),
            metrics.RANDOM_REGRET_TAG: str(metrics.rounded(reward_model.random_policy_regret))}
    if reward_model.skipped_users is not None:  # an environment that leaves out users with too few ratings
        tags[SKIPPED_USERS_TAG] = str(reward_model.skipped_users)
    if fitting.logs is not None:
        return train_offline(fitting, dataset, experiment_id, tags)
    logged = interaction_log(cfg, engine) if engine.record_interactions else None
    with interrupts_handled() as interrupts, tracking.run(cfg, run_name(cfg, tags), experiment_id, tags) as active:
        log_ratings(cfg, dataset)
        log.info("Training %s on %s (%s data): %d users, %d movies, rank %d; %d loops x %d interactions",
                 cfg.agent.name, cfg.env.name, cfg.data.name, len(reward_model.user_ids), len(reward_model.movie_ids),
                 reward_model.user_features.shape[1], cfg.training.loops, engine.interactions_per_loop)
        try:
            run_loops(fitting, logged, interrupts, active.info.run_id, report)
        except (KeyboardInterrupt, tracking.RunStopped, UserError):
            if history.loops_done:  # a stopped or diverged run keeps its table and plot so far
                log_tables(cfg, history, reward_model.random_policy_regret)
            raise
        with_policy = cfg.tracking.artifacts == "full" and cfg.tracking.save_policy
        logged_frame = None if logged is None else logged.frame(reward_model)
        try:
            log_tables(cfg, history, reward_model.random_policy_regret)
            if logged is not None:
                interactions.log(logged_frame, cfg.agent.get("propensity_draws", 0))
            if with_policy:
                log.info("Saving the policy and its servable model")
                # Read again: an environment that refits as it goes (the timeline) serves its last fit.
                catalogue = serving.Catalogue.of(engine.environment.reward_model, dataset.movies, cfg.env)
                serving.log_policy(engine.agent.policy, catalogue, engine.environment.movies_arrived)
        except (OSError, MlflowException) as error:
            kept = UNLOGGED / active.info.run_id
            kept.mkdir(parents=True, exist_ok=True)
            write_tables(cfg, history, reward_model.random_policy_regret, kept)
            if logged is not None:
                logged_frame.to_parquet(kept / interactions.FILE, index=False)
            if with_policy:
                serving.save_policy(engine.agent.policy, kept / "policy", engine.environment.movies_arrived)
            raise UserError(f"the trained run's artifacts could not be written to {mlflow.get_artifact_uri()} "
                            f"({one_line(error)}); they are kept in {kept}") from None
    return history.final(), active.info.run_id


def interaction_log(cfg: DictConfig, engine) -> interactions.InteractionLog:
    """An empty log for the engine's rounds; a slate logger's propensities are settled here,
    before the run, so that a size they cannot be computed at is refused before it starts."""
    environment = engine.environment
    if environment.logged_round_kind != "slate":
        return interactions.InteractionLog(environment.logged_round_kind)
    model = environment.reward_model
    return interactions.InteractionLog("slate", agents.slate_probabilities(cfg.agent, model.num_actions,
                                                                           model.slate_size))


def log_ratings(cfg: DictConfig, dataset) -> None:
    """The ratings as the run's training input; a download is named by its address, a local
    copy by its folder, generated data (no folder) by the code that made it (MLflow's default)."""
    downloaded = cfg.data.get("url") and not cfg.data.get("dir")
    if downloaded:
        source = cfg.data.url
    else:
        source = dataset.source.as_uri() if dataset.source.is_absolute() else None
    tracking.log_dataset(cfg.data.name, dataset.ratings, source)


def train_offline(fitting: Fitting, dataset, experiment_id: str, tags: dict[str, str]) -> tuple[dict[str, float], str]:
    """Learn from logged interactions, not the environment, and score off-policy (src.evaluation.offline)."""
    cfg, engine = fitting.cfg, fitting.engine
    with tracking.run(cfg, run_name(cfg, tags), experiment_id, tags) as active:
        log_ratings(cfg, dataset)
        final = fitting.run()
        mlflow.log_metrics({name: metrics.rounded(value) for name, value in final.items()})
        log.info("Learnt offline: %s = %.4f, true value %.4f", cfg.objective, final[cfg.objective],
                 final[estimators.TRUE_VALUE])
        if cfg.tracking.artifacts == "full" and cfg.tracking.save_policy:
            log.info("Saving the policy and its servable model")
            reward_model = engine.environment.reward_model
            serving.log_policy(engine.agent.policy, serving.Catalogue.of(reward_model, dataset.movies, cfg.env))
    return final, active.info.run_id


def run_loops(fitting: Fitting, logged: interactions.InteractionLog | None, interrupts: Interrupts, run_id: str,
              report: Reporter | None) -> None:
    """Train for `cfg.training.loops` loops into the fitting's history (and `logged`, when
    recording), logging the metrics as they come; stop cleanly between chunks on Ctrl-C or SIGTERM."""
    cfg, engine, history = fitting.cfg, fitting.engine, fitting.history
    training = cfg.training
    downsampler = metrics.Downsampler(loops_per_point(cfg))
    started = time.perf_counter()
    # A bar on a terminal only: in a log file each frame would be a line. There, a line per
    # tenth of the run says how far it is.
    with (tqdm(total=training.loops, unit="loop", desc="training", dynamic_ncols=True, disable=None) as bar,
          tracking.HistoryLogger(run_id) as history_logger):
        tenths_logged = 0

        def watch(chunk: LoopMetrics, rows: pd.DataFrame) -> None:
            nonlocal tenths_logged
            bar.update(len(chunk.regret))
            if logged is not None:
                logged.add(chunk.interactions)
            if bar.disable and (tenths := 10 * history.loops_done // training.loops) > tenths_logged:
                tenths_logged = tenths
                log.info("Loop %d of %d: cumulative regret %.1f", history.loops_done, training.loops,
                         history.final()[metrics.CUMULATIVE_REGRET])
            interrupts.check(urgent_only=True)
            # A diverged run ends here: its last, partial window is logged too.
            loss = rows[metrics.LOSS].to_numpy()
            ending = history.loops_done == training.loops or not np.isfinite(loss).all()
            window_rows = downsampler.push(rows, last=ending)
            if len(window_rows):
                history_logger.log(window_rows)
            check_finite(rows, loss)
            interrupts.check()
            if report:
                report(int(rows["step"].iloc[-1]), float(rows[cfg.objective].iloc[-1]), run_id)
            bar.set_postfix(regret=f"{chunk.regret.mean() / engine.interactions_per_loop:.3f}")

        fitting.run(watch)
    seconds = time.perf_counter() - started
    final = history.final()
    rate = training.loops * engine.interactions_per_loop / seconds
    mlflow.log_metrics({metrics.INTERACTIONS_PER_S: metrics.rounded(rate), metrics.SECONDS: metrics.rounded(seconds)})
    log.info("Done in %.1f s (%.0f interactions/s): cumulative regret %.1f, last-loop regret %.4f "
             "(uniform random: %.4f)", seconds, rate, final[metrics.CUMULATIVE_REGRET],
             final[metrics.REGRET], engine.environment.reward_model.random_policy_regret)


def log_tables(cfg: DictConfig, history: metrics.RegretHistory, random_regret: float) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        write_tables(cfg, history, random_regret, Path(scratch))
        mlflow.log_artifacts(scratch)


def loops_per_point(cfg: DictConfig) -> int:
    """`tracking.log_every`; by default as many loops as give a curve CHART_POINTS points."""
    return cfg.tracking.log_every or max(1, cfg.training.loops // CHART_POINTS)


def write_tables(cfg: DictConfig, history: metrics.RegretHistory, random_regret: float, folder: Path) -> None:
    """Every loop's metrics as metrics.csv and, with full artifacts, the regret plot."""
    frame = history.frame()
    write_csv(frame, folder / "metrics.csv")
    if cfg.tracking.artifacts == "full":
        plots.regret_figure(frame, plots.run_title(cfg), random_regret).savefig(folder / "regret.png")
        write_tensorboard(metrics.downsample(frame, loops_per_point(cfg)), folder / "tensorboard")


def write_csv(frame: pd.DataFrame, path: Path) -> None:
    """`frame` as `frame.to_csv(path, index=False)` writes it, by Arrow's CSV writer: 0.02 s
    against pandas' 0.1-0.2 s for a run's 20,000 rows. Every float in the digits that read back
    exactly, a whole one with its `.0` (Arrow writes 1.0 as `1`, which reads back as an integer),
    a NaN as an empty cell."""
    table = pyarrow.Table.from_pandas(frame, preserve_index=False)
    columns = [float_text(column) if pyarrow.types.is_floating(column.type) else column for column in table.columns]
    pyarrow.csv.write_csv(pyarrow.table(columns, names=table.column_names), path,
                          pyarrow.csv.WriteOptions(quoting_style="none", quoting_header="none"))


def float_text(column: pyarrow.ChunkedArray) -> pyarrow.ChunkedArray:
    """Floats as the shortest text that reads back exactly, whole ones with a `.0`."""
    text = pyarrow.compute.cast(column, pyarrow.string())
    whole = pyarrow.compute.match_substring_regex(text, r"^-?[0-9]+$")
    return pyarrow.compute.if_else(whole, pyarrow.compute.binary_join_element_wise(text, ".0", ""), text)


def write_tensorboard(frame: pd.DataFrame, folder: Path) -> None:
    """The metric histories as MLflow has them, as TensorBoard scalars too, for those who read
    curves there (`tensorboard --logdir <run artifacts>/tensorboard`): what `tf.summary.scalar`
    writes (float32 tensors under the scalars plugin), a row's metrics in one event: 0.015 s at
    the default 320 rows, where a TensorFlow function writing them took 0.07-0.18 s. At 20,000 rows
    (`tracking.log_every=1`) 0.8 s against its 0.5 s: TensorBoard's writer checksums each record in
    Python, a cost small beside what logging every loop to MLflow takes."""
    names = frame.columns.drop("step").tolist()
    scalar = scalar_metadata.create_summary_metadata(display_name=None, description=None)
    with np.errstate(over="ignore"):  # beyond float32's range is inf there, as TensorFlow's cast makes it
        rows = frame[names].to_numpy(np.float32)
    writer = EventFileWriter(str(folder))
    try:
        for row, (step, values) in enumerate(zip(frame["step"].to_numpy().tolist(), rows.tolist())):
            summary = summary_pb2.Summary()
            for name, value in zip(names, values):
                entry = summary.value.add(tag=name)
                entry.tensor.dtype = types_pb2.DT_FLOAT
                entry.tensor.float_val.append(value)
                if not row:  # a tag's plugin is read from its first value, as TensorFlow writes it
                    entry.metadata.CopyFrom(scalar)
            writer.add_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))
    finally:
        writer.close()
