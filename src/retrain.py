"""One round of the closed loop: learn a challenger from what the service logged, gate it against
the champion off-policy, and promote it if it is better.

    uv run python -m src.retrain
    uv run python -m src.retrain agent.alpha=0.1 start=scratch window=3600 min_gain=0.01

The champion is a registered model (`model=`, by default `models:/<model_name>@champion`); its
source run's config fixes the environment and data the challenger learns in. The round reads
the decision log's joined decisions (decision and feedback) in its window, holds out the latest
`holdout_share` of them, trains the challenger offline on the rest (`start=warm`: on every joined
decision so far) with offline learning's own code, and gates both greedy policies on the held-out
rounds (src.evaluation.gate). Each round is an MLflow run in experiment `pipeline` (tag
`bandits.role=retrain`); a promoted challenger is logged in it, registered as the model's next
version, and `@champion` moves to it. The end of the round's window is the next round's start.
Options: conf/retrain.yaml; docs/closed-loop.md.
"""

from __future__ import annotations

import logging
import math
import re
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf, open_dict

from src import config
from src.cli import exit_on_user_error, interrupts_handled, run_and_exit, stop_on_termination_signals
from src.errors import UserError, one_line, require
from src.evaluation import estimators, gate

log = logging.getLogger(__name__)

USAGE = ("usage: python -m src.retrain [model=models:/<name>@champion] [decision_log=<url>] [agent=<agent>] "
         "[window=since_last_round|<seconds>] [start=warm|scratch]")
EXPERIMENT = "pipeline"
ROLE = "retrain"
ALIAS = "champion"
STARTS = ("warm", "scratch")
SINCE_LAST_ROUND = "since_last_round"
MODEL_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))")
# Tags of a round's run; the next round reads its window's start from UNTIL_TAG.
MODEL_TAG = "retrain.model_name"
ROUND_TAG = "retrain.round"
SINCE_TAG = "retrain.since"
UNTIL_TAG = "retrain.until"
CHAMPION_VERSION_TAG = "retrain.champion_version"
CHAMPION_RUN_TAG = "retrain.champion_run_id"
DECISION_TAG = "retrain.decision"
REASON_TAG = "retrain.reason"
PROMOTED_VERSION_TAG = "retrain.promoted_version"
DECISIONS_ARTIFACT = "decisions/joined.parquet"


def parse(overrides: list[str]) -> DictConfig:
    """`conf/retrain.yaml` with the command line's key=value overrides, checked before anything
    heavy loads."""
    config.check_group_choices(overrides)
    cfg = config.compose_command(overrides, "retrain", USAGE)
    if not MODEL_URI.fullmatch(str(cfg.model)):
        raise UserError(f"model must be a registered model, models:/<name>@<alias> or models:/<name>/<version>, "
                        f"got {cfg.model!r}: a promoted challenger becomes that name's next version")
    window = cfg.window
    require(window == SINCE_LAST_ROUND or (_number(window) and window > 0), "window", window,
            f"{SINCE_LAST_ROUND} or a number of seconds > 0")
    require(cfg.start in STARTS, "start", cfg.start, " or ".join(STARTS))
    require(_number(cfg.holdout_share) and 0 < cfg.holdout_share < 1, "holdout_share", cfg.holdout_share,
            "in (0, 1)")
    gate_estimator(cfg)  # an unknown estimator or hyperparameter is refused now
    challenger_config(config.compose([]), cfg)  # and the challenger's hyperparameters, on a stand-in champion
    require(_number(cfg.reward_model_ridge) and 0 < cfg.reward_model_ridge <= config.LARGEST_NUMBER,
            "reward_model_ridge", cfg.reward_model_ridge, f"> 0 and at most {config.LARGEST_NUMBER:g}")
    require(_number(cfg.min_gain) and abs(cfg.min_gain) <= config.LARGEST_NUMBER, "min_gain", cfg.min_gain,
            f"a number of mean reward, at most {config.LARGEST_NUMBER:g} in size")
    require(_number(cfg.confidence) and 0 < cfg.confidence < 1, "confidence", cfg.confidence, "in (0, 1)")
    require(cfg.interval in gate.LOWER_BOUNDS, "interval", cfg.interval, f"one of {', '.join(gate.LOWER_BOUNDS)}")
    require(_integer(cfg.min_holdout) and 0 <= cfg.min_holdout <= config.LARGEST_INTEGER, "min_holdout",
            cfg.min_holdout, "an integer >= 0")
    samples = cfg.bootstrap.samples
    require(_integer(samples) and 100 <= samples <= 100_000, "bootstrap.samples", samples,
            "an integer in [100, 100000]")
    require(_integer(cfg.bootstrap.seed) and cfg.bootstrap.seed >= 0, "bootstrap.seed", cfg.bootstrap.seed,
            "an integer >= 0")
    return cfg


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def gate_estimator(cfg: DictConfig) -> estimators.Estimator:
    (estimator,) = estimators.configured([cfg.estimator], cfg.estimator_params, "estimator_params")
    return estimator


@dataclass(frozen=True)
class Champion:
    """The registered version the round challenges, and the run that trained it."""

    name: str
    version: str
    run_id: str
    cfg: DictConfig  # the source run's config: environment, data, training batches
    policy_path: Path

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def resolve_champion(model_uri: str, scratch: Path) -> Champion:
    """The version `model_uri` names (an alias read once, so the round holds to it), its policy
    downloaded into `scratch` and its source run's config."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from src import artifacts

    parts = MODEL_URI.fullmatch(model_uri)
    name, alias = parts["name"], parts["alias"]
    client = mlflow.MlflowClient()
    try:
        found = (client.get_model_version_by_alias(name, alias) if alias
                 else client.get_model_version(name, parts["version"]))
    except MlflowException as error:
        raise UserError(f"model={model_uri}: no such registered model version in {mlflow.get_tracking_uri()} "
                        f"({one_line(error)})") from None
    run_id, policy_path = artifacts.fetch_policy(None, f"models:/{name}/{found.version}", scratch)
    return Champion(name, str(found.version), run_id, artifacts.logged_config(run_id, scratch / "config"),
                    policy_path)


def connect(configured_uri: str | None) -> str | None:
    """The pipeline experiment's id, None before a first round records one. A SQLite store that
    is not there is refused (`tracking.connect` only reading): it holds no champion."""
    from src import tracking

    return tracking.connect(configured_uri, EXPERIMENT, create=False)


def previous_round(experiment_id: str | None, name: str):
    """This model's last finished round, or None."""
    import mlflow

    from src import tracking

    if experiment_id is None:
        return None
    runs = mlflow.search_runs(
        [experiment_id], output_format="list", max_results=1, order_by=["attributes.start_time DESC"],
        filter_string=f"tags.`{tracking.ROLE_TAG}` = '{ROLE}' AND tags.`{MODEL_TAG}` = '{name}' "
                      f"AND attributes.status = 'FINISHED'")
    return runs[0] if runs else None


def window_of(cfg: DictConfig, previous, now: float) -> tuple[float | None, float]:
    """(since, until) of the decisions this round reads; since None: from the log's start."""
    if cfg.window != SINCE_LAST_ROUND:
        return now - float(cfg.window), now
    return (float(previous.data.tags[UNTIL_TAG]) if previous else None), now


def describe_window(since: float | None, until: float) -> str:
    def stamp(moment: float) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(moment))

    return f"{'the start' if since is None else stamp(since)} to {stamp(until)}"


def read_decisions(url: str, since: float | None, until: float, start: str,
                   model_name: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The window's joined decisions of the model `model_name` served to the catalogue's users,
    and those the challenger may learn from (warm: every such one decided before `until`)."""
    from src.serving.decision_log import DecisionLog

    decision_log = DecisionLog(url)
    try:
        window = of_users(decision_log.joined(since, until, model_name))
        if window.empty:
            raise UserError(f"nothing to learn from: no decision of models:/{model_name} in {decision_log.shown} from "
                            f"{describe_window(since, until)} has feedback yet")
        history = (of_users(decision_log.joined(None, until, model_name)) if start == "warm" and since is not None
                   else window)
    finally:
        decision_log.close()
    return window, history


def of_users(joined: pd.DataFrame) -> pd.DataFrame:
    """The decisions made for a user of the catalogue: one the service made from raw features
    (no user id) has no user whose choices the gate compares, nor a true reward to grade by."""
    for_features = joined.user_id.isna()
    if for_features.any():
        log.info("Leaving out %d decisions made from raw features (no user id): a round learns and gates on the "
                 "catalogue's users", for_features.sum())
    return joined[~for_features]


def split(window: pd.DataFrame, history: pd.DataFrame, holdout_share: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, holdout): the window's latest `holdout_share` are held out, the challenger learns
    from the rest of `history`. Latest, so that the gate scores on the traffic closest to now."""
    held = max(1, round(len(window) * holdout_share))
    holdout = window.iloc[len(window) - held:]
    return history[~history.decision_id.isin(holdout.decision_id)], holdout


def challenger_config(champion_cfg: DictConfig, cfg: DictConfig) -> DictConfig:
    """A fresh `cfg.agent` (with its hyperparameters) on the champion's environment, data and
    training batches, tracked in the pipeline's experiment: the config a promoted version's run
    logs, as a training run's, so that everything reading a training run reads it."""
    challenger = config.compose([f"agent={cfg.agent.name}"])
    challenger.agent = cfg.agent
    for key in ("data", "env", "training"):
        challenger[key] = champion_cfg[key]
    with open_dict(challenger):  # a champion logged before training.jit_compile lacks it
        challenger.training.jit_compile = False  # the challenger learns offline, from the decisions: no compiled loop
    if cfg.data.dir is not None:
        challenger.data.dir = cfg.data.dir
    challenger.tracking.uri = cfg.tracking.uri
    challenger.tracking.experiment = EXPERIMENT
    challenger.tracking.system_metrics_every_s = 0  # a round is seconds of work, not a long training
    config.check_run(challenger)
    return challenger


def feedback_of(frame: pd.DataFrame, reward_model, url: str) -> tuple[estimators.Feedback, np.ndarray]:
    """The decisions as logged rounds and their users' rows in `reward_model`; refused if they
    are not the champion's environment's."""
    from src.evaluation import interactions

    try:
        feedback, rows = interactions.feedback_of(frame, reward_model, url)
    except UserError:
        raise UserError(f"the decisions in {url} do not match the champion's environment (other users or "
                        f"features): was its data changed, or does the log hold another model's decisions?") from None
    movies = reward_model.movie_ids
    if ((feedback.actions < 0) | (feedback.actions >= len(movies))).any() or \
            (movies[np.clip(feedback.actions, 0, len(movies) - 1)] != frame.movie_id.to_numpy()).any():
        raise UserError(f"the decisions in {url} name other movies than the champion's environment's")
    return feedback, rows


def check_propensities(holdout: estimators.Feedback, frame: pd.DataFrame, cfg: DictConfig, url: str) -> None:
    """Refuse held-out decisions the gate's estimator cannot weight: a propensity unknown (a
    policy that draws without a closed form, served with exploration) or outside (0, 1]."""
    if not gate_estimator(cfg).needs_propensities:
        return
    bad = np.flatnonzero(~((holdout.propensities > 0) & (holdout.propensities <= 1)))
    if len(bad):
        raise UserError(f"decision {frame.decision_id.iloc[bad[0]]} in {url} has propensity "
                        f"{holdout.propensities[bad[0]]}: estimator={cfg.estimator} weights by propensities in "
                        f"(0, 1]; estimator=dm needs none")


def challenge(engine, train: estimators.Feedback, holdout: estimators.Feedback, holdout_rows: np.ndarray,
              champion_choices: np.ndarray, cfg: DictConfig):
    """Train `engine.agent` offline on `train` (offline learning's one pass in online training's
    batches) and gate its greedy policy against `champion_choices` (a movie per user row) on
    the `holdout` rounds, the gate's reward model fitted on `train` (cross-fitted): (the
    challenger's choices, the gate's verdict)."""
    from src.evaluation import offline

    log.info("Training %s offline on %d decisions", cfg.agent.name, len(train))
    offline.train_on(engine, train)
    reward_model = engine.environment.reward_model
    choices = offline.greedy_choices(engine.agent.policy, reward_model)
    verdict = gate.decide(holdout, champion_choices[holdout_rows], choices[holdout_rows], len(reward_model.movie_ids),
                          gate_estimator(cfg), min_gain=float(cfg.min_gain), confidence=float(cfg.confidence),
                          samples=cfg.bootstrap.samples, seed=cfg.bootstrap.seed, ridge=cfg.reward_model_ridge,
                          reward_rounds=train, interval=cfg.interval,
                          reward_range=(float(reward_model.rewards.min()), float(reward_model.rewards.max())),
                          min_rounds=cfg.min_holdout)
    return choices, verdict


def true_values(reward_model, champion_choices: np.ndarray, challenger_choices: np.ndarray) -> dict[str, float]:
    """Each policy's exact value and regret per interaction, where the environment knows every
    reward (the simulator); empty otherwise."""
    from src.envs.base import CompleteRewardModel

    if not isinstance(reward_model, CompleteRewardModel) or not np.isfinite(reward_model.rewards).all():
        return {}
    best = float(reward_model.optimal_reward.mean())
    values = {role: reward_model.value_of(choices)
              for role, choices in (("champion", champion_choices), ("challenger", challenger_choices))}
    return {**{f"{role}/true_value": value for role, value in values.items()},
            **{f"{role}/true_regret": best - value for role, value in values.items()},
            "gate/true_difference": values["challenger"] - values["champion"]}


@dataclass(frozen=True)
class Outcome:
    """What a round did, for its report."""

    round: int
    champion: Champion
    agent: str
    start: str
    counts: dict[str, int]
    verdict: gate.Verdict
    truth: dict[str, float]
    run_id: str
    promoted_version: str | None


def run_round(cfg: DictConfig) -> Outcome:
    """One round, as the module's docstring says."""
    from src import tracking
    from src.serving import decision_log

    experiment_id = connect(cfg.tracking.uri)
    url = cfg.decision_log or decision_log.default_url(tracking.tracking_uri(cfg.tracking.uri))
    with tempfile.TemporaryDirectory() as folder:
        scratch = Path(folder)
        champion = resolve_champion(str(cfg.model), scratch)
        if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
            # Opening it would create an empty log: a round only reads.
            raise UserError(f"nothing to learn from: there is no decision log at {url} (has the service run, and "
                            f"with serve.decision_log pointing elsewhere? pass decision_log=)")
        with decision_log.round_lock(url, champion.name):
            return one_round(cfg, experiment_id, champion, url)


def one_round(cfg: DictConfig, experiment_id: str | None, champion: Champion, url: str) -> Outcome:
    """The round itself, its model's lock held: the window, learning, the gate, the record."""
    previous = previous_round(experiment_id, champion.name)
    since, until = window_of(cfg, previous, time.time())
    window, history = read_decisions(url, since, until, cfg.start, champion.name)
    train_frame, holdout_frame = split(window, history, cfg.holdout_share)
    log.info("Round %d against %s (run %s): %d joined decisions from %s; learning from %d, gating on %d",
             round_number(previous), champion.uri, champion.run_id, len(window), describe_window(since, until),
             len(train_frame), len(holdout_frame))
    counts = {"window_rounds": len(window), "train_rounds": len(train_frame),
              "holdout_rounds": len(holdout_frame)}
    return learn_and_gate(cfg, experiment_id, champion, previous, (since, until), url, train_frame,
                          holdout_frame, counts)


def round_number(previous) -> int:
    return int(previous.data.tags[ROUND_TAG]) + 1 if previous else 1


def learn_and_gate(cfg: DictConfig, experiment_id: str | None, champion: Champion, previous, span: tuple,
                   url: str, train_frame: pd.DataFrame, holdout_frame: pd.DataFrame, counts: dict) -> Outcome:
    """Build the champion's environment, train and gate the challenger, and record the round."""
    from src import data, experiment, serving

    challenger_cfg = challenger_config(champion.cfg, cfg)
    log.info("Loading the champion's data and environment (%s on %s)", challenger_cfg.env.name,
             challenger_cfg.data.name)
    dataset = data.load(challenger_cfg.data)
    engine = experiment.assemble(challenger_cfg, dataset)
    if engine.environment.logged_round_kind == "slate":
        raise UserError(f"the champion's env={challenger_cfg.env.name} offers more than a user and a movie a round, "
                        f"which a decision log does not keep; retraining needs env=movielens")
    if engine.environment.logged_round_kind is None:
        raise UserError(f"the champion's env={challenger_cfg.env.name} cannot be retrained from a decision log: "
                        f"{engine.environment.unlogged_because}")
    reward_model = engine.environment.reward_model
    train, _ = feedback_of(train_frame, reward_model, url)
    holdout, holdout_rows = feedback_of(holdout_frame, reward_model, url)
    check_propensities(holdout, holdout_frame, cfg, url)
    if len(train) < engine.interactions_per_loop:
        raise UserError(f"too few decisions to learn from: {len(train)} before the held-out ones, fewer than one "
                        f"training batch of {engine.interactions_per_loop}; wait for more traffic")
    catalogue = serving.Catalogue.of(reward_model, dataset.movies, challenger_cfg.env)
    champion_choices, _ = serving.Policy(champion.policy_path).decide(catalogue.user_features, catalogue)
    challenger_choices, verdict = challenge(engine, train, holdout, holdout_rows, champion_choices, cfg)
    truth = true_values(reward_model, np.asarray(champion_choices), challenger_choices)
    outcome = Outcome(round_number(previous), champion, cfg.agent.name, str(cfg.start), counts,
                      verdict, truth, "", None)
    return record(cfg, challenger_cfg, experiment_id, outcome, span, pd.concat([train_frame, holdout_frame]),
                  engine, catalogue)


def record(cfg: DictConfig, challenger_cfg: DictConfig, experiment_id: str | None, outcome: Outcome, span: tuple,
           joined: pd.DataFrame, engine, catalogue) -> Outcome:
    """The round's MLflow run; a promoted challenger logged in it, registered, and `@champion`
    moved to it, last, so that a failure before leaves the alias where it was. Ctrl-C or SIGTERM
    meanwhile waits for the round to be recorded whole, then stops the command."""
    with interrupts_handled("once the round is recorded"):
        return _record(cfg, challenger_cfg, experiment_id, outcome, span, joined, engine, catalogue)


def _record(cfg: DictConfig, challenger_cfg: DictConfig, experiment_id: str | None, outcome: Outcome, span: tuple,
            joined: pd.DataFrame, engine, catalogue) -> Outcome:
    import mlflow

    from src import serving, tracking
    from src.evaluation import interactions

    verdict, champion = outcome.verdict, outcome.champion
    since, until = span
    tags = {tracking.ROLE_TAG: ROLE, MODEL_TAG: champion.name, ROUND_TAG: str(outcome.round),
            CHAMPION_VERSION_TAG: champion.version, CHAMPION_RUN_TAG: champion.run_id,
            SINCE_TAG: "" if since is None else repr(since), UNTIL_TAG: repr(until),
            DECISION_TAG: "promoted" if verdict.promote else "refused", REASON_TAG: verdict.reason,
            "mlflow.note.content": f"Round {outcome.round} against {champion.uri}: {verdict.reason}."}
    promoted = None
    experiment_id = experiment_id or tracking.connect(cfg.tracking.uri, EXPERIMENT)
    with tracking.run(challenger_cfg, f"retrain·r{outcome.round}·{outcome.agent}", experiment_id, tags) as active:
        mlflow.log_params({**{f"retrain.{key}": value for key, value in tracking.flatten(cfg).items()},
                           **{f"retrain.{key}": value for key, value in outcome.counts.items()}})
        mlflow.log_text(OmegaConf.to_yaml(cfg, resolve=True), "retrain.yaml")
        with tempfile.TemporaryDirectory() as scratch:
            path = Path(scratch) / Path(DECISIONS_ARTIFACT).name
            joined.to_parquet(path, index=False)
            mlflow.log_artifact(str(path), str(Path(DECISIONS_ARTIFACT).parent))
        mlflow.log_input(interactions.as_dataset(joined, f"{mlflow.get_artifact_uri()}/{DECISIONS_ARTIFACT}"),
                         context="decision_log")
        mlflow.log_metrics({**verdict_metrics(verdict), **outcome.truth})
        if verdict.promote:
            serving.log_policy(engine.agent.policy, catalogue)
            promoted = register(champion.name, outcome, active.info.run_id)
    return replace(outcome, run_id=active.info.run_id, promoted_version=promoted)


def verdict_metrics(verdict) -> dict[str, float]:
    metrics = {"gate/difference": verdict.difference, "gate/lower_bound": verdict.lower_bound}
    for role, value, (low, high) in (("champion", verdict.champion, verdict.champion_interval),
                                     ("challenger", verdict.challenger, verdict.challenger_interval)):
        name = f"{role}/{verdict.estimator}"
        metrics.update({name: value, f"{name}_ci_low": low, f"{name}_ci_high": high})
    return {name: value for name, value in metrics.items() if np.isfinite(value)}


def register(name: str, outcome: Outcome, run_id: str) -> str:
    """Register the model just logged as `name`'s next version and point `@champion` at it."""
    import mlflow

    client = mlflow.MlflowClient()
    version = mlflow.register_model(f"models:/{mlflow.last_logged_model().model_id}", name).version
    client.set_model_version_tag(name, version, ROUND_TAG, str(outcome.round))
    client.update_model_version(name, version, description=(
        f"{outcome.agent} retrained from the decision log in round {outcome.round} (run {run_id}); "
        f"{outcome.verdict.reason}; it replaced version {outcome.champion.version}."))
    mlflow.set_tag(PROMOTED_VERSION_TAG, str(version))
    client.set_registered_model_alias(name, ALIAS, str(version))
    log.info("Registered models:/%s/%s and moved @%s to it", name, version, ALIAS)
    return str(version)


def report(outcome: Outcome) -> str:
    verdict, truth = outcome.verdict, outcome.truth
    rows = []
    for role, value, (low, high) in (("champion", verdict.champion, verdict.champion_interval),
                                     ("challenger", verdict.challenger, verdict.challenger_interval)):
        exact = f"  true {truth[f'{role}/true_value']:.4f}" if truth else ""
        rows.append(f"  {role:<10} {verdict.estimator} {value:.4f} [{low:.4f}, {high:.4f}]{exact}")
    moved = (f"@{ALIAS} -> models:/{outcome.champion.name}/{outcome.promoted_version}" if outcome.promoted_version
             else f"@{ALIAS} stays at models:/{outcome.champion.name}/{outcome.champion.version}")
    return "\n".join([
        f"round {outcome.round}: {outcome.agent} ({outcome.start}) against {outcome.champion.uri}; learnt from "
        f"{outcome.counts['train_rounds']:,} decisions, gated on {outcome.counts['holdout_rounds']:,}",
        *rows, verdict.reason, moved, f"MLflow run {outcome.run_id}"])


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    stop_on_termination_signals()  # SIGTERM as Ctrl-C: a round's run ends KILLED, not left RUNNING
    with exit_on_user_error():
        cfg = parse(argv)
        print(report(run_round(cfg)))


if __name__ == "__main__":
    run_and_exit(lambda: main(sys.argv[1:]))
