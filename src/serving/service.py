"""The recommendation service: an ASGI app that recommends movies with a registered policy,
explores (`src.serving.exploration`), writes every decision to the decision log before it
answers, takes the feedback that comes back, and follows the registry to new model versions.

    POST /recommend  {"user_id": 42} or {"features": [...]}, optional "k" (slate size)
    POST /feedback   {"decision_id": "...", "reward": 3.5}
    GET  /health     the served model and the log's counts
    GET  /metrics    Prometheus text: counters, log gauges, latency quantiles per route

Starlette rather than FastAPI: the body has to be read under our control (a size cap enforced
while it streams in, a JSON parse whose RecursionError on deep nesting is a 422: FastAPI reads
the whole body and answers such a parse with a 400), after which FastAPI would add only its
per-request dependency machinery to the hot path. Pydantic models still check each body, with
unknown fields refused.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import math
import re
import tempfile
import threading
import time
import uuid
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from src import artifacts, tracking
from src.errors import UserError, one_line
from src.serving import exploration
from src.serving.catalogue import Catalogue
from src.serving.decision_log import Decision, DecisionLog, UnknownDecision
from src.serving.policy import Policy

log = logging.getLogger(__name__)

ALIAS = re.compile(r"models:/(?P<name>[^/@]+)@(?P<alias>[^/@]+)")
VERSION = re.compile(r"models:/(?P<name>[^/@]+)/(?P<version>\d+)")
ROUTES = ("/recommend", "/feedback", "/health", "/metrics")
LATENCY_WINDOW = 2048  # requests per route the latency quantiles are taken over
QUANTILES = (0.5, 0.9, 0.99)
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"

Finite = Annotated[float, Field(allow_inf_nan=False)]


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    user_id: int | None = None
    features: list[Finite] | None = None
    k: int = Field(1, ge=1)

    @model_validator(mode="after")
    def one_user(self):
        if (self.user_id is None) == (self.features is None):
            raise ValueError("send exactly one of user_id (a MovieLens user id) and features (a feature vector)")
        return self


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    decision_id: str = Field(min_length=1, max_length=64)
    reward: Finite


@dataclass(frozen=True)
class ServedModel:
    """One model version, loaded."""

    version: str  # the registry version, or the run id for a runs:/ URI
    run_id: str
    policy: Policy
    catalogue: Catalogue
    own: exploration.OwnPick

    @property
    def size(self) -> int:
        """The movies it serves: the catalogue's first ones, those arrived by the end of the policy's
        training where movies arrived (the catalogue is in arrival order), else all."""
        return self.policy.movies_arrived or len(self.catalogue.movie_ids)


class ModelSource:
    """The configured model URI: which version it names now, and a version loaded.

    `models:/<name>@<alias>` names whatever version the alias points to (the service follows it);
    `models:/<name>/<version>` and `runs:/<run id>/model` name one model for good."""

    def __init__(self, uri: str):
        self.uri = uri
        self._alias = ALIAS.fullmatch(uri)
        self._version = VERSION.fullmatch(uri)

    @property
    def follows(self) -> bool:
        return self._alias is not None

    def version(self) -> str | None:
        """The registry version the URI names now; None for a runs:/ URI."""
        if self._version:
            return self._version["version"]
        if not self._alias:
            return None
        try:
            found = mlflow.MlflowClient().get_model_version_by_alias(self._alias["name"], self._alias["alias"])
        except MlflowException as error:
            raise self._unavailable(error) from None
        return str(found.version)  # MLflow answers an int from some stores

    def load(self, version: str | None) -> ServedModel:
        uri = f"models:/{self._alias['name']}/{version}" if self._alias else self.uri
        with tempfile.TemporaryDirectory() as scratch:
            scratch = Path(scratch)
            try:
                local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(scratch / "model")))
            except (MlflowException, OSError) as error:
                raise self._unavailable(error) from None
            run_id, parts = self._parts(local)
            agent = artifacts.logged_config(run_id, scratch).agent
            policy = Policy(local / parts["policy"]["path"])
            catalogue = Catalogue.load(local / parts["catalogue"]["path"])
        return ServedModel(version or run_id, run_id, policy, catalogue, exploration.own_pick(agent, policy, catalogue))

    def _parts(self, local: Path) -> tuple[str, dict]:
        """The run that logged the model at `local`, and the model's artifacts."""
        if not (local / "MLmodel").is_file():
            raise UserError(f"model={self.uri} is not a servable policy model (it has no MLmodel): serve "
                            f"runs:/<run id>/model or a registered model")
        logged = Model.load(str(local))
        parts = logged.flavors.get("python_function", {}).get("artifacts") or {}
        if not {"policy", "catalogue"} <= parts.keys() or logged.run_id is None:
            raise UserError(f"model={self.uri} is not a policy model logged by src.train")
        return logged.run_id, parts

    def _unavailable(self, error: Exception) -> UserError:
        where = mlflow.get_tracking_uri()
        if tracking.is_unreachable(error):
            return UserError(f"cannot reach the tracking server {where} for model={self.uri}")
        return UserError(f"cannot fetch model={self.uri} from {where}: {one_line(error)}")


class Metrics:
    """Counters and latency quantiles over each route's recent requests, in Prometheus' text format."""

    COUNTERS = {
        "decisions_total": "Decisions served, each committed to the decision log first.",
        "feedback_total": "Feedback recorded (each joins its decision in the log).",
        "feedback_duplicates_total": "Feedback for a decision that had some already (the first is kept).",
        "feedback_unknown_total": "Feedback for a decision id the log never saw.",
        "model_reloads_total": "New model versions loaded by following the registry.",
    }
    LOG_GAUGES = (("decision_log_decisions", "decisions", "Decisions in the decision log, every writer's."),
                  ("decision_log_joined", "feedback", "Decisions in the log joined with their feedback."))

    def __init__(self):
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(self.COUNTERS, 0)
        self._latencies = {route: deque(maxlen=LATENCY_WINDOW) for route in (*ROUTES, "other")}
        self._sums = dict.fromkeys(self._latencies, 0.0)
        self._totals = dict.fromkeys(self._latencies, 0)

    def count(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1

    def __getitem__(self, name: str) -> int:
        return self._counts[name]

    def observe(self, path: str, seconds: float) -> None:
        route = path if path in self._latencies else "other"
        with self._lock:
            self._latencies[route].append(seconds)
            self._sums[route] += seconds
            self._totals[route] += 1

    def render(self, log_counts: dict[str, int], model: ServedModel) -> str:
        with self._lock:
            counts = dict(self._counts)
            windows = {route: np.array(values) for route, values in self._latencies.items() if values}
            sums, totals = dict(self._sums), dict(self._totals)
        lines = []
        for name, about in self.COUNTERS.items():
            lines += [f"# HELP {name} {about}", f"# TYPE {name} counter", f"{name} {counts[name]}"]
        for name, key, about in self.LOG_GAUGES:
            lines += [f"# HELP {name} {about}", f"# TYPE {name} gauge", f"{name} {log_counts[key]}"]
        lines += ["# HELP served_model_info The model version serving now.", "# TYPE served_model_info gauge",
                  f'served_model_info{{version="{model.version}",run_id="{model.run_id}"}} 1',
                  f"# HELP request_latency_seconds Latency over each route's last {LATENCY_WINDOW} requests.",
                  "# TYPE request_latency_seconds summary"]
        for route, window in windows.items():
            quantiles = np.quantile(window, QUANTILES)
            lines += [f'request_latency_seconds{{route="{route}",quantile="{q}"}} {value:.6f}'
                      for q, value in zip(QUANTILES, quantiles)]
            lines += [f'request_latency_seconds_sum{{route="{route}"}} {sums[route]:.6f}',
                      f'request_latency_seconds_count{{route="{route}"}} {totals[route]}']
        return "\n".join(lines) + "\n"


class Service:
    """The service's state: the model serving now, the explorer, the log, the metrics."""

    def __init__(self, source: ModelSource, decision_log: DecisionLog, explorer: exploration.Explorer,
                 reward_range: tuple[float, float], max_body_bytes: int):
        self.source = source
        self.log = decision_log
        self.explorer = explorer
        self.reward_range = reward_range
        self.max_body_bytes = max_body_bytes
        self.metrics = Metrics()
        self.model = source.load(source.version())  # swapped whole by the Follower
        settle_heap()

    def app(self):
        routes = [Route("/recommend", self.recommend, methods=["POST"]),
                  Route("/feedback", self.feedback, methods=["POST"]),
                  Route("/health", self.health, methods=["GET"]),
                  Route("/metrics", self.prometheus, methods=["GET"])]
        return _timed(Starlette(routes=routes, exception_handlers={HTTPException: _refused}), self.metrics)

    def follow(self, every_s: float) -> Follower:
        follower = Follower(self, every_s)
        if self.source.follows:
            follower.start()
        return follower

    async def recommend(self, request: Request) -> JSONResponse:
        ask = _parsed(RecommendRequest, await self._body(request))
        model = self.model  # one version decides the whole request, whatever a reload swaps in meanwhile
        if ask.k > model.size:
            raise HTTPException(422, f"k must be at most {model.size}, the movies in the catalogue, got {ask.k}")
        try:
            context = (model.catalogue.observations_of([ask.user_id])[0] if ask.user_id is not None
                       else np.asarray(ask.features, np.float32))
            # On the event loop: about 1 ms of TensorFlow, which at 200 requests/s keeps the loop a fifth
            # busy, without a hop to a worker thread per request. A policy that draws its pick decides
            # for the user again in the same call, its redraws estimating the pick's propensity.
            repeats = 1 + self.explorer.redraws_for(model.own)
            picks, scores = model.policy.decide(np.repeat(context[None], repeats, axis=0), model.catalogue)
        except UserError as error:
            raise HTTPException(422, str(error)) from None
        scores = None if scores is None else scores[0][:model.size]
        action, propensity = self.explorer.choose(int(picks[0]), scores, model.own, model.size, picks[1:])
        slate = self.explorer.slate(action, scores, ask.k, model.size) if ask.k > 1 else None
        decision = Decision(uuid.uuid4().hex, ask.user_id, np.asarray(context, np.float32), action,
                            int(model.catalogue.movie_ids[action]), propensity, self.source.uri, model.version,
                            time.time(), slate)
        await self._logged(self.log.submit_decision(decision))
        self.metrics.count("decisions_total")
        answer = {"decision_id": decision.decision_id, "movie_id": decision.movie_id,
                  "title": str(model.catalogue.titles[action]),
                  "propensity": None if math.isnan(propensity) else propensity, "model_version": model.version}
        if slate is not None:
            answer["slate"] = [{"movie_id": int(model.catalogue.movie_ids[column]),
                                "title": str(model.catalogue.titles[column])} for column in slate]
        return JSONResponse(answer)

    async def feedback(self, request: Request) -> JSONResponse:
        given = _parsed(FeedbackRequest, await self._body(request))
        low, high = self.reward_range
        if not low <= given.reward <= high:
            raise HTTPException(422, f"reward must be in [{low}, {high}] (serve.reward_range), got {given.reward}")
        try:
            recorded = await self._logged(self.log.submit_feedback(given.decision_id, given.reward))
        except UnknownDecision as error:
            self.metrics.count("feedback_unknown_total")
            raise HTTPException(404, str(error)) from None
        self.metrics.count("feedback_total" if recorded else "feedback_duplicates_total")
        return JSONResponse({"status": "recorded" if recorded else "duplicate"})

    async def health(self, request: Request) -> JSONResponse:
        counts = await self._counts()
        model = self.model
        return JSONResponse({"status": "ok", "model_uri": self.source.uri, "model_version": model.version,
                             "run_id": model.run_id, **counts})

    async def prometheus(self, request: Request) -> PlainTextResponse:
        return PlainTextResponse(self.metrics.render(await self._counts(), self.model), media_type=PROMETHEUS_TEXT)

    async def _counts(self) -> dict[str, int]:
        try:
            return await run_in_threadpool(self.log.counts)
        except UserError as error:
            raise HTTPException(503, str(error)) from None

    async def _body(self, request: Request) -> dict:
        """The JSON object in the body, read no further than `max_body_bytes`."""
        too_large = HTTPException(413, f"the body exceeds {self.max_body_bytes} bytes (serve.max_body_bytes)",
                                  headers={"Connection": "close"})
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            raise too_large
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_body_bytes:
                raise too_large
        try:
            value = json.loads(body)
        except RecursionError:
            raise HTTPException(422, "the body nests too deeply") from None
        except ValueError as error:
            raise HTTPException(422, f"the body is not JSON: {error}") from None
        if not isinstance(value, dict):
            raise HTTPException(422, f"the body must be a JSON object, got {type(value).__name__}")
        return value

    @staticmethod
    async def _logged(written: Future):
        """What the log answers once the write is committed; a log that fails is a 503."""
        try:
            return await asyncio.wrap_future(written)
        except UnknownDecision:
            raise
        except UserError as error:
            raise HTTPException(503, str(error)) from None


class Follower(threading.Thread):
    """Re-resolves the model URI every `every_s` and swaps in a new version once it is loaded."""

    def __init__(self, service: Service, every_s: float):
        super().__init__(name="registry-follower", daemon=True)
        self.service = service
        self.every_s = every_s
        self._stopped = threading.Event()
        self._last_problem = None

    def run(self) -> None:
        while not self._stopped.wait(self.every_s):
            self.check()

    def check(self) -> None:
        service = self.service
        try:
            version = service.source.version()
            if version == service.model.version:
                return
            started = time.monotonic()
            service.model = service.source.load(version)
            settle_heap()
        # Anything a reload meets (a server away, a broken version) must leave the served model serving.
        except Exception as error:
            problem = one_line(error)
            if problem != self._last_problem:
                log.warning("cannot follow %s, still serving version %s: %s", service.source.uri,
                            service.model.version, problem)
            self._last_problem = problem
            return
        self._last_problem = None
        service.metrics.count("model_reloads_total")
        log.info("%s now names version %s: serving it (loaded in %.1f s)", service.source.uri, version,
                 time.monotonic() - started)

    def stop(self) -> None:
        self._stopped.set()
        if self.is_alive():
            self.join(timeout=60)


def settle_heap() -> None:
    """Exempt every object alive now from the garbage collector's full collections. With
    TensorFlow and MLflow loaded those walk some 600,000 objects, 270 ms during which no request
    is answered (the p99 of a load test rose from 20 ms to 120-500 ms). Unfrozen and collected
    first, so that the cycles of a model just replaced are freed: one such pause per new version."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


async def _refused(request: Request, refusal: HTTPException) -> JSONResponse:
    """Every refusal as `{"detail": one line}` (Starlette's default answers plain text)."""
    return JSONResponse({"detail": refusal.detail}, refusal.status_code, refusal.headers)


def _parsed(model: type[BaseModel], body: dict):
    try:
        return model.model_validate(body)
    except ValidationError as error:
        raise HTTPException(422, _problems(error)) from None


def _problems(error: ValidationError) -> str:
    """Every problem in one line, each naming its field: `features.2: Input should be a finite number`."""
    problems = []
    for problem in error.errors(include_url=False):
        field = ".".join(str(part) for part in problem["loc"])
        if problem["type"] == "extra_forbidden":
            problems.append(f"unknown field '{field}'")
        else:
            message = problem["msg"].removeprefix("Value error, ")
            problems.append(f"{field}: {message}" if field else message)
    return "; ".join(problems)


def _timed(app, metrics: Metrics):
    """`app`, with each request's latency (to the end of its answer) observed in `metrics`."""

    async def timed(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        started = time.perf_counter()
        try:
            await app(scope, receive, send)
        finally:
            metrics.observe(scope["path"], time.perf_counter() - started)

    return timed
