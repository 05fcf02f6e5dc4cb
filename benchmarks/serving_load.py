"""Load on the recommendation service: the rate and latency it keeps, and that its decision log
holds every write it acknowledged.

    uv run python -m benchmarks.serving_load --data-dir /path/to/ml-100k   # trains and registers LinUCB first
    uv run python -m benchmarks.serving_load --model models:/<name>@champion --tracking-uri <uri> --duration 60

Starts `python -m src.serve` (epsilon exploration) on a fresh SQLite decision log, then drives it
over HTTP from a pool of threads, open loop: request i is due at start + i / rate and its latency
counts from then, so a slow answer shows in the latency instead of slowing the schedule down
("scheduled"); "sent" counts from when a thread sent it. A visit is POST /recommend for a user of
the catalogue, then POST /feedback for that decision. First, GET /health at the same rate is the
baseline measured in the same run: an answer that runs no policy and writes nothing. Last, the
service is stopped and its log checked: decisions in the log = decisions acknowledged, feedback
joined = feedback acknowledged. Target on 2 cores: 200 recommendations/s for 60 s, p99 <= 50 ms.
"""

from __future__ import annotations

import argparse
import gc
import http.client
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil

from src.paths import PROJECT_ROOT

log = logging.getLogger("benchmarks.serving_load")

MODEL = "serving-load"
LATENCY_WINDOW = 2048  # src.serving.service.LATENCY_WINDOW, without loading TensorFlow here


@dataclass
class Outcome:
    route: str
    due: float
    sent: float
    done: float
    status: int
    answer: dict = field(default_factory=dict)


class Client:
    """One kept-alive HTTP connection per thread."""

    def __init__(self, port: int):
        self.port = port
        self.local = threading.local()

    def call(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        connection = getattr(self.local, "connection", None)
        if connection is None:
            connection = self.local.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        # Bytes, so http.client sends headers and body in one packet: as two, Nagle and delayed ACKs
        # hold the body back 40 ms.
        payload = None if body is None else json.dumps(body).encode()
        try:
            connection.request(method, path, payload, {"Content-Type": "application/json"})
            response = connection.getresponse()
            return response.status, json.loads(response.read())
        except (OSError, http.client.HTTPException):
            connection.close()
            self.local.connection = None
            raise


def drive(client: Client, visit, rate: float, duration: float, threads: int) -> list[Outcome]:
    """Run `visit(client, i, due)` for i due at rate per second over `duration` seconds."""
    due: queue.Queue = queue.Queue()
    outcomes: list[Outcome] = []

    def work():
        while (task := due.get()) is not None:
            try:
                outcomes.extend(visit(client, *task))
            except (OSError, http.client.HTTPException) as error:
                outcomes.append(Outcome("error", task[1], task[1], time.perf_counter(), 0, {"error": str(error)}))

    pool = [threading.Thread(target=work, daemon=True) for _ in range(threads)]
    for thread in pool:
        thread.start()
    start = time.perf_counter()
    for i in range(int(rate * duration)):
        at = start + i / rate
        time.sleep(max(0.0, at - time.perf_counter()))
        due.put((i, at))
    for _ in pool:
        due.put(None)
    for thread in pool:
        thread.join()
    return outcomes


def timed(client: Client, route: str, due: float, method: str, body: dict | None = None) -> Outcome:
    sent = time.perf_counter()
    status, answer = client.call(method, route, body)
    return Outcome(route, due, sent, time.perf_counter(), status, answer)


def health(client: Client, i: int, due: float) -> list[Outcome]:
    return [timed(client, "/health", due, "GET")]


def recommend_then_feedback(users: np.ndarray):
    def visit(client: Client, i: int, due: float) -> list[Outcome]:
        decided = timed(client, "/recommend", due, "POST", {"user_id": int(users[i % len(users)])})
        if decided.status != 200:
            return [decided]
        rewarded = timed(client, "/feedback", decided.done, "POST",
                         {"decision_id": decided.answer["decision_id"], "reward": float(i % 5 + 1)})
        rewarded.answer["decision_id"] = decided.answer["decision_id"]
        return [decided, rewarded]

    return visit


def summary(outcomes: list[Outcome], route: str, seconds: float) -> dict:
    mine = [outcome for outcome in outcomes if outcome.route == route and outcome.status == 200]
    scheduled = np.array([outcome.done - outcome.due for outcome in mine]) * 1000
    sent = np.array([outcome.done - outcome.sent for outcome in mine]) * 1000
    return {"route": route, "answered": len(mine), "rate": len(mine) / seconds,
            "p50": np.percentile(scheduled, 50), "p99": np.percentile(scheduled, 99),
            "p50_sent": np.percentile(sent, 50), "p99_sent": np.percentile(sent, 99)}


def train_model(data_dir: str | None, scratch: Path) -> tuple[str, str]:
    """LinUCB (training=quick) registered as `serving-load`@champion in a store in `scratch`:
    (model URI, tracking URI)."""
    import mlflow

    from src import config
    from src.data.synthetic import checksum_override, write_movielens
    from src.training import train

    if data_dir:
        data = [f"data.dir={data_dir}"]
    else:
        (scratch / "ml-100k").mkdir()
        data = [f"data.dir={scratch / 'ml-100k'}", checksum_override(write_movielens(scratch / "ml-100k"))]
    uri = f"sqlite:///{scratch / 'mlflow.db'}"
    _, run_id = train(config.compose(["agent=linucb", "training=quick", *data, f"tracking.uri={uri}",
                                      "tracking.save_policy=true"]))
    mlflow.set_tracking_uri(uri)
    version = mlflow.register_model(f"runs:/{run_id}/model", MODEL).version
    mlflow.MlflowClient().set_registered_model_alias(MODEL, "champion", version)
    return f"models:/{MODEL}@champion", uri


def users_of(model: str, tracking_uri: str, scratch: Path) -> np.ndarray:
    import mlflow

    from src.serving.catalogue import Catalogue

    local = mlflow.artifacts.download_artifacts(model, dst_path=str(scratch / "model"), tracking_uri=tracking_uri)
    return Catalogue.load(Path(local) / "artifacts" / "catalogue.npz").user_ids


def start_service(model: str, tracking_uri: str, decision_log: str, port: int, scratch: Path) -> subprocess.Popen:
    output = open(scratch / "serve.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "src.serve", f"model={model}", f"port={port}",
                                f"tracking.uri={tracking_uri}", f"decision_log={decision_log}", "reload_s=10"],
                               cwd=PROJECT_ROOT, stdout=output, stderr=subprocess.STDOUT)
    client = Client(port)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if client.call("GET", "/health")[0] == 200:
                return process
        except (OSError, http.client.HTTPException):
            time.sleep(0.5)
    process.kill()
    raise SystemExit(f"the service did not come up:\n{(scratch / 'serve.log').read_text()[-3000:]}")


def check_log(decision_log: str, outcomes: list[Outcome]) -> list[str]:
    """Decisions and joined feedback in the log against those acknowledged."""
    from src.serving.decision_log import DecisionLog

    decided = {o.answer["decision_id"] for o in outcomes if o.route == "/recommend" and o.status == 200}
    rewarded = {o.answer["decision_id"] for o in outcomes if o.route == "/feedback" and o.status == 200}
    stored = DecisionLog(decision_log)
    try:
        counts, joined = stored.counts(), set(stored.joined().decision_id)
    finally:
        stored.close()
    return [f"decisions: {counts['decisions']:,} in the log, {len(decided):,} acknowledged "
            f"({'equal' if counts['decisions'] == len(decided) else 'DIFFERENT'})",
            f"feedback: {len(joined):,} joined in the log, {len(rewarded):,} acknowledged "
            f"({'equal' if joined == rewarded else 'DIFFERENT'})"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a registered model URI (default: train LinUCB and register it)")
    parser.add_argument("--tracking-uri", help="the tracking store holding --model")
    parser.add_argument("--data-dir", help="a local ml-100k directory to train on (default: synthetic data)")
    parser.add_argument("--rate", type=float, default=200, help="recommendations per second (default: %(default)s)")
    parser.add_argument("--duration", type=float, default=60, help="seconds of load (default: %(default)s)")
    parser.add_argument("--baseline", type=float, default=10, help="seconds of /health (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=32, help="client threads (default: %(default)s)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("src").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as folder:
        scratch = Path(folder)
        model, tracking_uri = (args.model, args.tracking_uri) if args.model else train_model(args.data_dir, scratch)
        users = users_of(model, tracking_uri, scratch)
        # This process loaded TensorFlow and MLflow to train: frozen, their objects cost the client's
        # threads no 270 ms garbage collections in the middle of the measurement.
        gc.collect()
        gc.freeze()
        decision_log = f"sqlite:///{scratch / 'decisions.db'}"
        port = _free_port()
        service = start_service(model, tracking_uri, decision_log, port, scratch)
        client, cpu, own = Client(port), psutil.Process(service.pid), psutil.Process()
        try:
            log.info("Service up; warming up, then %.0f s of /health, then %.0f s of recommendations at %.0f/s",
                     args.baseline, args.duration, args.rate)
            warm = drive(client, recommend_then_feedback(users), args.rate, 3, args.threads)
            baseline = drive(client, health, args.rate, args.baseline, args.threads)
            before = [sum(times[:2]) for times in (cpu.cpu_times(), own.cpu_times())] + [_machine_busy()]
            started = time.perf_counter()
            loaded = drive(client, recommend_then_feedback(users), args.rate, args.duration, args.threads)
            seconds = time.perf_counter() - started
            after = [sum(times[:2]) for times in (cpu.cpu_times(), own.cpu_times())] + [_machine_busy()]
            service_s, client_s, machine_s = (end - start for start, end in zip(before, after))
            used = (service_s, client_s, machine_s - service_s - client_s)
            inside = served_latency(port)
        finally:
            service.send_signal(signal.SIGTERM)
            service.wait(timeout=60)
        report(args, baseline, loaded, seconds, used, inside)
        errors = [o for o in warm + baseline + loaded if o.status != 200]
        print(f"errors: {len(errors)}" + (f" (first: {errors[0].route} {errors[0].status} {errors[0].answer})"
                                          if errors else ""))
        for line in check_log(decision_log, warm + loaded):
            print(line)


def served_latency(port: int) -> dict[str, float]:
    """The service's own /recommend latency quantiles (its /metrics, over its last requests), in ms."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=60) as response:
        text = response.read().decode()
    prefix = 'request_latency_seconds{route="/recommend",quantile="'
    return {line[len(prefix):].split('"')[0]: float(line.split()[-1]) * 1000
            for line in text.splitlines() if line.startswith(prefix)}


def report(args, baseline: list[Outcome], loaded: list[Outcome], seconds: float,
           cpu_s: tuple[float, float, float], inside: dict[str, float]) -> None:
    """The table; `cpu_s` is the CPU time the service, this client and everything else on the
    machine used while loaded."""
    base = summary(baseline, "/health", args.baseline)
    rows = [base, summary(loaded, "/recommend", seconds), summary(loaded, "/feedback", seconds)]
    print(f"\n{args.rate:.0f} recommendations/s due for {args.duration:.0f} s, each followed by its feedback; "
          f"{os.cpu_count()} cores; CPU while loaded: service {cpu_s[0] / seconds:.2f} cores, client "
          f"{cpu_s[1] / seconds:.2f}, other work on the machine {cpu_s[2] / seconds:.2f}\n")
    print("| route | answered | rate (/s) | p50 ms | p99 ms | p99 sent ms | p50 / baseline | p99 / baseline |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['route']} | {row['answered']:,} | {row['rate']:.1f} | {row['p50']:.2f} | {row['p99']:.2f} | "
              f"{row['p99_sent']:.2f} | {row['p50'] / base['p50']:.1f} | {row['p99'] / base['p99']:.1f} |")
    print(f"\n/recommend inside the service (its /metrics, over its last {LATENCY_WINDOW} requests): p50 "
          f"{inside.get('0.5', float('nan')):.2f} ms, p99 {inside.get('0.99', float('nan')):.2f} ms")
    target = rows[1]["rate"] >= 0.98 * args.rate and rows[1]["p99"] <= 50
    print(f"target (>= {args.rate:.0f}/s, p99 <= 50 ms on /recommend): {'met' if target else 'MISSED'}")


def _machine_busy() -> float:
    """CPU seconds every core of the machine has spent busy."""
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


if __name__ == "__main__":
    main()
