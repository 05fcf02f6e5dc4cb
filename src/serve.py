"""Serve a registered policy over HTTP: recommendations with exploration, every decision and
its feedback in the decision log, new model versions followed from the registry.

    uv run python -m src.serve model=models:/<name>@champion
    uv run python -m src.serve model=models:/<name>@champion exploration=softmax temperature=0.5 port=8080

Options are in `conf/serve.yaml`; the API, the propensities and the log: docs/serving.md.
SIGTERM or Ctrl-C stop it once the requests in progress are answered.
"""

from __future__ import annotations

import logging
import math
import socket
import sys
from urllib.parse import urlsplit

from omegaconf import DictConfig, ListConfig

from src import config, tracking
from src.cli import exit_on_user_error, stop_on_termination_signals
from src.errors import UserError, require
from src.serving.exploration import MODES, MOST_DRAWS  # numpy only: known before TensorFlow loads

log = logging.getLogger(__name__)

USAGE = ("usage: python -m src.serve model=models:/<name>@<alias> [port=8000] "
         "[exploration=none|epsilon|softmax] [decision_log=<url>] (conf/serve.yaml)")
MODEL_SCHEMES = ("models:/", "runs:/")
SMALLEST_BODY = 256  # room for a feedback body or a short feature vector


def parse(overrides: list[str]) -> DictConfig:
    """`conf/serve.yaml` with the command line's key=value overrides, checked."""
    cfg = config.compose_command(overrides, "serve", USAGE)
    require(isinstance(cfg.model, str) and cfg.model.startswith(MODEL_SCHEMES), "model", cfg.model,
            "a model URI: models:/<name>@<alias>, models:/<name>/<version> or runs:/<run id>/model")
    require(isinstance(cfg.host, str) and cfg.host != "", "host", cfg.host, "a host name or address")
    require(_integer(cfg.port) and 0 <= cfg.port <= 65535, "port", cfg.port, "an integer in [0, 65535]")
    require(cfg.exploration in MODES, "exploration", cfg.exploration, f"one of {', '.join(MODES)}")
    require(_number(cfg.epsilon) and 0 <= cfg.epsilon <= 1, "epsilon", cfg.epsilon, "in [0, 1]")
    require(_integer(cfg.propensity_draws) and 0 <= cfg.propensity_draws <= MOST_DRAWS, "propensity_draws",
            cfg.propensity_draws, f"an integer in [0, {MOST_DRAWS}]")
    require(_number(cfg.temperature) and 0 < cfg.temperature <= config.LARGEST_NUMBER, "temperature",
            cfg.temperature, f"> 0 and at most {config.LARGEST_NUMBER:g}")
    require(_integer(cfg.seed) and 0 <= cfg.seed <= config.LARGEST_INTEGER, "seed", cfg.seed,
            f"an integer in [0, {config.LARGEST_INTEGER}]")
    require(_number(cfg.reload_s) and 0 < cfg.reload_s <= 86_400, "reload_s", cfg.reload_s,
            "> 0 and at most 86400 seconds")
    require(cfg.decision_log is None or (isinstance(cfg.decision_log, str) and cfg.decision_log != ""),
            "decision_log", cfg.decision_log, "null or a sqlite:///<file> or postgresql://... URL")
    bounds = cfg.reward_range
    require(isinstance(bounds, ListConfig) and len(bounds) == 2 and all(map(_number, bounds))
            and bounds[0] < bounds[1], "reward_range", bounds, "[low, high], two numbers with low < high")
    require(_integer(cfg.max_body_bytes) and SMALLEST_BODY <= cfg.max_body_bytes <= config.LARGEST_INTEGER,
            "max_body_bytes", cfg.max_body_bytes, f"an integer in [{SMALLEST_BODY}, {config.LARGEST_INTEGER}]")
    return cfg


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, so that a port in use is refused before the model loads."""
    try:
        family, kind, protocol, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                                proto=socket.IPPROTO_TCP)[0]
        # With the protocol named, asyncio sets TCP_NODELAY on each connection; without it, Nagle's
        # algorithm and the client's delayed ACK hold every answer's body back 40 ms.
        bound = socket.socket(family, kind, protocol)
        bound.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        bound.bind(address)
    except OSError as error:
        raise UserError(f"cannot listen on {host}:{port}: {error.strerror or error} (set host= or port=)") from None
    return bound


def check_tracking_store(uri: str) -> None:
    """Refuse a SQLite store that is not there (MLflow would create an empty one and then find no
    model), and a tracking server nothing answers at, before the decision log is opened."""
    tracking.check_http_settings()
    tracking.check_sqlite_store(uri)
    tracking.check_store_exists(uri)
    server = urlsplit(uri)
    if server.scheme in ("http", "https"):
        try:
            socket.create_connection((server.hostname, server.port or (443 if server.scheme == "https" else 80)),
                                     timeout=10).close()
        except OSError as error:
            raise UserError(f"cannot reach the MLflow tracking server at {uri} ({error.strerror or error}): is it "
                            f"running? (set tracking.uri= or MLFLOW_TRACKING_URI)") from None


def serve(cfg: DictConfig) -> None:
    """Load the model, open the decision log and answer requests until stopped."""
    sock = listen(cfg.host, cfg.port)
    uri = tracking.tracking_uri(cfg.tracking.uri)
    check_tracking_store(uri)
    from src.serving import decision_log

    # Before TensorFlow loads: a log that cannot be opened (PostgreSQL down, another schema) is
    # one line in a second, not after half a minute of imports.
    decisions = decision_log.DecisionLog(cfg.decision_log or decision_log.default_url(uri))
    try:
        log.info("Loading TensorFlow and MLflow...")
        import mlflow

        from src.serving import exploration, service

        mlflow.set_tracking_uri(uri)
        explorer = exploration.Explorer(cfg.exploration, cfg.epsilon, cfg.temperature, cfg.seed,
                                        cfg.propensity_draws)
        server = service.Service(service.ModelSource(cfg.model), decisions, explorer,
                                 tuple(cfg.reward_range), cfg.max_body_bytes)
        run(server, sock, cfg)
    finally:
        decisions.close()


def run(server, sock: socket.socket, cfg: DictConfig) -> None:
    import uvicorn

    follower = server.follow(cfg.reload_s)
    host, port = sock.getsockname()[:2]
    exploring = {"none": "no exploration", "epsilon": f"epsilon {cfg.epsilon}",
                 "softmax": f"softmax at temperature {cfg.temperature}"}[cfg.exploration]
    log.info("Serving %s (version %s, %s) on http://%s:%d; decisions go to %s", server.source.uri,
             server.model.version, exploring, host, port, server.log.shown)
    logging.getLogger("uvicorn").setLevel(logging.WARNING)  # our lines say where it listens and when it stops
    settings = uvicorn.Config(server.app(), log_config=None, access_log=False, lifespan="off",
                              timeout_graceful_shutdown=10)
    try:
        uvicorn.Server(settings).run(sockets=[sock])
    finally:
        follower.stop()
        metrics = server.metrics
        log.info("Stopped: recorded %d decisions and %d feedback (%d duplicate, %d for unknown decisions) in %s",
                 metrics["decisions_total"], metrics["feedback_total"], metrics["feedback_duplicates_total"],
                 metrics["feedback_unknown_total"], server.log.shown)


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with exit_on_user_error():
        cfg = parse(argv)
        stop_on_termination_signals()  # uvicorn takes the signals over while it serves
        serve(cfg)


if __name__ == "__main__":
    main(sys.argv[1:])
