"""Simulated users for the recommendation service, and the truth about what it served.

    uv run python -m src.traffic url=http://127.0.0.1:8000 rate=50 duration=60 feedback.delay_s=2 feedback.drop=0.1

The service's `/health` names the run behind the model it serves; that run's config rebuilds
its environment (the same data and env settings), whose users are the simulated ones and whose
reward model is the truth. Users are drawn uniformly (seeded), as the environment draws them;
`POST /recommend` goes out at `rate` a second for `duration` seconds, and after a delay (fixed
or exponential) `POST /feedback` returns the true reward of the movie served, except for a
share `feedback.drop` never sent. What no production system knows is then reported per model
version: the true mean reward and regret per interaction of what was served, beside counts of
requests sent, acknowledged and failed. The result is `traffic.json` and `interactions.csv` in
`out`, and an MLflow run in experiment `pipeline` (tag `bandits.role=traffic`).
Options: conf/traffic.yaml; docs/closed-loop.md.
"""

from __future__ import annotations

import heapq
import http.client
import itertools
import json
import logging
import math
import sys
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from src import config
from src.cli import exit_on_user_error, stop_on_termination_signals, writable_folder
from src.errors import UserError, one_line, require
from src.paths import PROJECT_ROOT, resolve

log = logging.getLogger(__name__)

USAGE = "usage: python -m src.traffic url=http://127.0.0.1:8000 [rate=50] [duration=60] [feedback.delay_s=2] " \
        "[feedback.drop=0.1] [data.dir=<MovieLens>] (conf/traffic.yaml)"
EXPERIMENT = "pipeline"
ROLE = "traffic"
DELAYS = ("fixed", "exponential")
LONGEST_S, MOST_PER_SECOND = config.LONGEST_TRAFFIC_S, config.MOST_REQUESTS_PER_S
MOST_WORKERS = 1024  # beyond it a typo: a thousand threads


def parse(overrides: list[str]) -> DictConfig:
    """`conf/traffic.yaml` with the command line's key=value overrides, checked."""
    cfg = config.compose_command(overrides, "traffic", USAGE)
    parts = urlsplit(str(cfg.url))
    require(parts.scheme in ("http", "https") and bool(parts.hostname), "url", cfg.url,
            "the service's address, http://<host>:<port>")
    numbers = (("rate", MOST_PER_SECOND), ("duration", LONGEST_S), ("timeout_s", 600), ("progress_s", LONGEST_S))
    for key, most in numbers:
        require(_number(cfg[key]) and 0 < cfg[key] <= most, key, cfg[key], f"> 0 and at most {most}")
    require(_integer(cfg.workers) and 1 <= cfg.workers <= MOST_WORKERS, "workers", cfg.workers,
            f"an integer in [1, {MOST_WORKERS}]")
    require(_integer(cfg.seed) and cfg.seed >= 0, "seed", cfg.seed, "an integer >= 0")
    require(_number(cfg.feedback.delay_s) and 0 <= cfg.feedback.delay_s <= LONGEST_S, "feedback.delay_s",
            cfg.feedback.delay_s, f">= 0 and at most {LONGEST_S} seconds")
    require(cfg.feedback.delay in DELAYS, "feedback.delay", cfg.feedback.delay, " or ".join(DELAYS))
    require(_number(cfg.feedback.drop) and 0 <= cfg.feedback.drop <= 1, "feedback.drop", cfg.feedback.drop,
            "in [0, 1]")
    require(isinstance(cfg.tracking.log, bool), "tracking.log", cfg.tracking.log, "true or false")
    return cfg


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class ServiceError(Exception):
    """A request the service did not answer with 200: its status (None: no answer) and why."""

    def __init__(self, status: int | None, message: str):
        super().__init__(f"{status or 'no answer'}: {message}")
        self.status = status


class Client:
    """JSON over HTTP to the service, one kept-alive connection per thread."""

    def __init__(self, url: str, timeout_s: float):
        parts = urlsplit(url)
        self._connection_type = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        self._host, self._port, self._timeout = parts.hostname, parts.port, timeout_s
        self._local = threading.local()

    def call(self, method: str, path: str, body: dict | None = None) -> dict:
        """The JSON answer; `ServiceError` for any other."""
        reused = getattr(self._local, "connection", None) is not None
        try:
            return self._call(method, path, body)
        except ServiceError as error:
            if error.status is not None or not reused:
                raise
            return self._call(method, path, body)  # the server closed the idle kept-alive connection

    def _call(self, method: str, path: str, body: dict | None) -> dict:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._local.connection = self._connection_type(self._host, self._port,
                                                                        timeout=self._timeout)
        try:
            connection.request(method, path, None if body is None else json.dumps(body),
                               {"Content-Type": "application/json"})
            response = connection.getresponse()
            text = response.read().decode(errors="replace")
        except (OSError, http.client.HTTPException) as error:
            connection.close()
            self._local.connection = None
            raise ServiceError(None, one_line(error) if str(error) else type(error).__name__) from None
        if response.status != 200:
            raise ServiceError(response.status, one_line(ValueError(text)) if text else response.reason)
        try:
            return json.loads(text)
        except ValueError:
            raise ServiceError(response.status, f"an answer that is not JSON: {text[:80]!r}") from None


def served_run(client: Client, url: str) -> dict:
    """The service's /health: the model it serves and the run behind it."""
    try:
        health = client.call("GET", "/health")
    except ServiceError as error:
        raise UserError(f"the service at {url} does not answer /health ({error}): is `python -m src.serve` running "
                        f"there?") from None
    if not health.get("run_id"):
        raise UserError(f"the service at {url} names no run behind its model in /health: {health}")
    return health


@dataclass(frozen=True)
class Truth:
    """The served model's environment: its users and every movie's true reward to each."""

    user_ids: np.ndarray  # [users]
    movie_ids: pd.Index  # [movies] a served movie id's column
    rewards: np.ndarray  # [users, movies]

    @classmethod
    def of(cls, reward_model, env: str) -> Truth:
        if not np.isfinite(reward_model.rewards).all():
            raise UserError(f"env={env} knows no reward for some users and movies (real ratings): simulated users "
                            f"need a reward for every movie, as env=movielens has")
        return cls(np.asarray(reward_model.user_ids), pd.Index(reward_model.movie_ids), reward_model.rewards)

    def outcome(self, row: int, movie_id: int) -> tuple[float, float]:
        """(reward, best reward there was) of serving `movie_id` to the user in `row`."""
        column = self.movie_ids.get_indexer([movie_id])[0]
        if column < 0:
            raise ServiceError(200, f"served movie {movie_id}, which the served run's environment does not hold")
        return float(self.rewards[row, column]), float(self.rewards[row].max())


def truth_of(run_id: str, data_dir: str | None) -> Truth:
    """The environment of the run behind the served model, as src.predict rebuilds it."""
    from src import artifacts, data
    from src.envs import build_environment

    artifacts.check_run(run_id)  # the service may read another store than the one given here
    with tempfile.TemporaryDirectory() as scratch:
        run_cfg = artifacts.logged_config(run_id, Path(scratch))
    if data_dir is not None:
        run_cfg.data.dir = data_dir
    log.info("Building the served model's environment (env=%s on %s data) for its users and the truth",
             run_cfg.env.name, run_cfg.data.name)
    return Truth.of(build_environment(run_cfg, data.load(run_cfg.data)).reward_model, run_cfg.env.name)


@dataclass
class Interaction:
    """One simulated visit: who came, what was served, what it was worth, what became of the feedback."""

    index: int
    user_id: int
    decision_id: str = ""
    movie_id: int = -1
    model_version: str = ""
    propensity: float = math.nan
    reward: float = math.nan
    optimal: float = math.nan
    answered_s: float = math.nan  # after the first request
    latency_s: float = math.nan
    error: str = ""
    # planned (to be sent), dropped (never sent on purpose), recorded, duplicate, error: <why>; none
    # where the recommendation failed
    feedback: str = "planned"


class Later(threading.Thread):
    """Hands each job to a pool at its due time: a heap by due time, kept by this one thread."""

    def __init__(self, pool: ThreadPoolExecutor):
        super().__init__(name="feedback-clock", daemon=True)
        self._pool = pool
        self._due: list = []
        self._order = itertools.count()  # ties by arrival: jobs themselves do not compare
        self._ready = threading.Condition()
        self._closed = False
        self.sent: list[Future] = []

    def at(self, due: float, job, *args) -> None:
        with self._ready:
            heapq.heappush(self._due, (due, next(self._order), job, args))
            self._ready.notify()

    def close(self) -> None:
        """Run what is waiting, then stop: nothing more will come."""
        with self._ready:
            self._closed = True
            self._ready.notify()

    def run(self) -> None:
        while True:
            with self._ready:
                while not (self._due and self._due[0][0] <= time.monotonic()):
                    if self._closed and not self._due:
                        return
                    self._ready.wait(self._due[0][0] - time.monotonic() if self._due else None)
                _, _, job, args = heapq.heappop(self._due)
            self.sent.append(self._pool.submit(job, *args))


@dataclass(frozen=True)
class Plan:
    """What is drawn before the first request, so that a seed fixes it: each visit's user row,
    its feedback delay and whether the feedback is dropped."""

    rows: np.ndarray
    delays: np.ndarray
    dropped: np.ndarray

    @classmethod
    def draw(cls, cfg: DictConfig, users: int) -> Plan:
        rng = np.random.default_rng(cfg.seed)
        visits = max(1, round(cfg.rate * cfg.duration))
        rows = rng.integers(users, size=visits)
        delay = cfg.feedback.delay_s
        delays = rng.exponential(delay, visits) if cfg.feedback.delay == "exponential" else np.full(visits, delay)
        return cls(rows, delays, rng.random(visits) < cfg.feedback.drop)


class Traffic:
    """The visits of a `Plan` sent to the service and their feedback after their delays."""

    def __init__(self, client: Client, truth: Truth, plan: Plan, workers: int):
        self.client, self.truth, self.plan = client, truth, plan
        self.visits = [Interaction(i, int(truth.user_ids[row])) for i, row in enumerate(plan.rows)]
        self._requests = ThreadPoolExecutor(workers, thread_name_prefix="recommend")
        self._feedback = ThreadPoolExecutor(workers, thread_name_prefix="feedback")
        self._later = Later(self._feedback)
        self._started = math.nan
        self.stopped: KeyboardInterrupt | None = None  # Ctrl-C or SIGTERM, re-raised once the result is kept

    def run(self, rate: float, progress_s: float) -> float:
        """Send every visit at `rate` a second, then the feedback still due; the seconds from the
        first request to the last answer."""
        self._later.start()
        started = self._started = time.monotonic()
        answered: list[Future] = []
        next_progress = started + progress_s
        try:
            for visit in self.visits:
                now = time.monotonic()
                if now >= next_progress:
                    log.info("%s", self.progress(now - started))
                    next_progress += progress_s
                time.sleep(max(0.0, started + visit.index / rate - now))
                answered.append(self._requests.submit(self.recommend, visit))
        except KeyboardInterrupt as stop:
            log.warning("Stopping: no more recommendations; the feedback already due is still sent")
            self.stopped = stop
            self.visits = self.visits[:len(answered)]  # the report counts what was sent
        wait(answered)
        self._drain(started, progress_s)
        return float(np.nanmax([visit.answered_s for visit in self.visits], initial=0.0))

    def _drain(self, started: float, progress_s: float) -> None:
        self._later.close()
        while self._later.is_alive():
            self._later.join(progress_s)
            if self._later.is_alive():
                log.info("%s (sending the feedback still due)", self.progress(time.monotonic() - started))
        wait(self._later.sent)
        self._requests.shutdown()
        self._feedback.shutdown()

    def recommend(self, visit: Interaction) -> None:
        asked = time.monotonic()
        try:
            answer = self.client.call("POST", "/recommend", {"user_id": visit.user_id})
            decision_id, movie_id = str(answer["decision_id"]), int(answer["movie_id"])
            version, propensity = str(answer["model_version"]), answer.get("propensity")
            visit.reward, visit.optimal = self.truth.outcome(self.plan.rows[visit.index], movie_id)
        except ServiceError as error:
            visit.error, visit.feedback = str(error), "none"
            return
        except (KeyError, TypeError, ValueError) as error:  # a thread's exception would go unseen
            visit.error, visit.feedback = f"200: an unreadable answer ({type(error).__name__}: {error})", "none"
            return
        answered = time.monotonic()
        visit.answered_s, visit.latency_s = answered - self._started, answered - asked
        visit.decision_id, visit.movie_id, visit.model_version = decision_id, movie_id, version
        visit.propensity = math.nan if propensity is None else float(propensity)
        if self.plan.dropped[visit.index]:
            visit.feedback = "dropped"
        else:
            self._later.at(answered + self.plan.delays[visit.index], self.reward, visit)

    def reward(self, visit: Interaction) -> None:
        try:
            answer = self.client.call("POST", "/feedback", {"decision_id": visit.decision_id, "reward": visit.reward})
            visit.feedback = str(answer["status"])
        except ServiceError as error:
            visit.feedback = f"error: {error}"

    def progress(self, seconds: float) -> str:
        served = [visit for visit in self.visits if visit.decision_id]
        failed = sum(bool(visit.error) for visit in self.visits)
        acknowledged = sum(visit.feedback in ("recorded", "duplicate") for visit in self.visits)
        truth = ""
        if served:
            rewards = np.array([visit.reward for visit in served])
            regret = np.array([visit.optimal for visit in served]) - rewards
            truth = f"; served so far: true mean reward {rewards.mean():.3f}, regret {regret.mean():.3f}"
        return (f"{seconds:6.1f} s: {len(served)} recommendations ({len(served) / max(seconds, 1e-9):.1f}/s), "
                f"{failed} failed; {acknowledged} feedback acknowledged{truth}")

    def frame(self) -> pd.DataFrame:
        rows = [asdict(visit) for visit in self.visits]
        return pd.DataFrame(rows).assign(regret=lambda frame: frame.optimal - frame.reward)


def summary(frame: pd.DataFrame, cfg: DictConfig, health: dict, elapsed: float) -> dict:
    """Counts, rates, latency and, per model version, the true value of what was served."""
    served = frame[frame.decision_id != ""]
    feedback = frame.feedback
    errors = frame.error[frame.error != ""]
    feedback_errors = feedback[feedback.str.startswith("error")]
    return {
        "url": str(cfg.url), "model_uri": health.get("model_uri"), "run_id": health["run_id"],
        "target_rate": float(cfg.rate), "achieved_rate": len(served) / elapsed if elapsed > 0 else 0.0,
        "seconds": elapsed,
        "recommend": {"sent": len(frame), "answered": len(served), "errors": len(errors),
                      "first_error": errors.iloc[0] if len(errors) else None,
                      "latency_ms": {f"p{q}": float(np.percentile(served.latency_s, q) * 1000) if len(served) else None
                                     for q in (50, 95, 99)}},
        "feedback": {"sent": int(feedback.isin(["recorded", "duplicate"]).sum() + len(feedback_errors)),
                     "recorded": int((feedback == "recorded").sum()), "duplicate": int((feedback == "duplicate").sum()),
                     "errors": len(feedback_errors), "dropped": int((feedback == "dropped").sum()),
                     "first_error": feedback_errors.iloc[0] if len(feedback_errors) else None},
        "versions": {version: {"interactions": len(group), "true_mean_reward": float(group.reward.mean()),
                               "true_regret": float(group.regret.mean()),
                               "best_possible_reward": float(group.optimal.mean())}
                     for version, group in served.groupby("model_version")},
    }


def write(result: dict, frame: pd.DataFrame, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "traffic.json").write_text(json.dumps(result, indent=2) + "\n")
    frame.to_csv(folder / "interactions.csv", index=False)


def log_run(cfg: DictConfig, result: dict, folder: Path, experiment_id: str) -> str:
    """The result as an MLflow run in the pipeline's experiment."""
    import mlflow

    from src import tracking

    tags = {tracking.ROLE_TAG: ROLE, "traffic.url": str(cfg.url), "traffic.run_id": result["run_id"],
            "traffic.model_versions": ",".join(result["versions"])}
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"traffic·{cfg.rate:g}/s·{cfg.duration:g}s",
                          tags=tags) as active:
        mlflow.log_params(tracking.flatten(cfg))
        counts = {f"{part}/{name}": value for part in ("recommend", "feedback")
                  for name, value in result[part].items() if isinstance(value, int)}
        per_version = {f"v{version}/{name}": value for version, values in result["versions"].items()
                       for name, value in values.items()}
        mlflow.log_metrics({"achieved_rate": result["achieved_rate"], **counts, **per_version})
        mlflow.log_artifacts(str(folder))
    return active.info.run_id


def report(result: dict) -> str:
    recommend, feedback = result["recommend"], result["feedback"]
    lines = [f"{recommend['answered']:,} of {recommend['sent']:,} recommendations answered at "
             f"{result['achieved_rate']:.1f}/s (target {result['target_rate']:g}/s), {recommend['errors']} failed; "
             f"latency p50 {recommend['latency_ms']['p50'] or math.nan:.1f} ms, "
             f"p99 {recommend['latency_ms']['p99'] or math.nan:.1f} ms",
             f"feedback: {feedback['recorded']:,} recorded, {feedback['duplicate']} duplicate, {feedback['errors']} "
             f"failed, {feedback['dropped']:,} dropped on purpose"]
    lines += [f"model version {version}: {values['interactions']:,} served, true mean reward "
              f"{values['true_mean_reward']:.4f}, regret {values['true_regret']:.4f} per interaction"
              for version, values in result["versions"].items()]
    return "\n".join(lines)


def simulate(cfg: DictConfig) -> None:
    """Run the traffic `cfg` describes and keep its result (in `out`, and an MLflow run), also
    where it was stopped (then re-raising the stop) or nothing was answered (one line)."""
    from src import tracking

    folder = writable_folder(resolve(cfg.out) if cfg.out else PROJECT_ROOT / "outputs" / "traffic" /
                             datetime.now().strftime("%Y-%m-%d_%H-%M-%S"), "out")
    client = Client(str(cfg.url), cfg.timeout_s)
    health = served_run(client, str(cfg.url))
    uri = tracking.tracking_uri(cfg.tracking.uri)
    tracking.check_store_exists(uri)  # MLflow would create an empty store, which holds no served run
    experiment_id = tracking.connect(uri, EXPERIMENT, create=cfg.tracking.log)
    log.info("The service serves %s (version %s, run %s)", health.get("model_uri"), health.get("model_version"),
             health["run_id"])
    truth = truth_of(health["run_id"], cfg.data.dir)
    traffic = Traffic(client, truth, Plan.draw(cfg, len(truth.user_ids)), cfg.workers)
    log.info("Sending %d recommendations at %g/s, feedback after %s %gs, %g%% of it dropped", len(traffic.visits),
             cfg.rate, cfg.feedback.delay, cfg.feedback.delay_s, 100 * cfg.feedback.drop)
    elapsed = traffic.run(cfg.rate, cfg.progress_s)
    frame = traffic.frame()
    result = summary(frame, cfg, health, elapsed)
    write(result, frame, folder)
    run_id = log_run(cfg, result, folder, experiment_id) if cfg.tracking.log else None
    print(report(result))
    print(f"Result: {folder / 'traffic.json'} and {folder / 'interactions.csv'}"
          + (f"; MLflow run {run_id} (experiment {EXPERIMENT})" if run_id else ""))
    if traffic.stopped:
        raise traffic.stopped
    if not result["recommend"]["answered"]:
        raise UserError(f"none of the {result['recommend']['sent']:,} recommendations was answered (the first "
                        f"error: {result['recommend']['first_error']}); is the service at {cfg.url} still up?")


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    stop_on_termination_signals()  # a SIGTERM stops the traffic as Ctrl-C does, the result kept
    with exit_on_user_error():
        simulate(parse(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
