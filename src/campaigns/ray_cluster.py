"""Campaign work placed by a Ray cluster's scheduler: a sweep's workers (`multirun.sh --ray`)
and the leaderboard's runs (`benchmarks.leaderboard --ray`) as Ray tasks, one CPU each.

The study stays in its database and the runs on their tracking store, as without Ray: a task is
the same worker or run a process of its own would be, on whichever node Ray gives it. Each node
runs the project from its own checkout at the same path, with its environment synced
(`uv sync --extra ray`), as a worker started by hand on another machine does. A task whose node
dies is run again elsewhere (`retries`); a sweep's trial that died with it is failed and retried
by the study's own recovery (heartbeats, `sweep.grace_s`), so the study still ends with its
exact number of trials. Ray is an optional extra: it is imported only here.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable

from src.errors import UserError, one_line

log = logging.getLogger(__name__)

# Seconds a cluster's address has to accept a connection before the command is refused.
CONNECT_TIMEOUT_S = 5
# How often a task whose node died runs again elsewhere.
RETRIES = 3


def check_address(address: str) -> None:
    """Refuse in one line an address that is not host:port or where nothing answers."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--ray {address}: not a Ray cluster address; give host:port, as `ray start --head` "
                        f"prints it (e.g. 127.0.0.1:6379)")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as error:
        raise UserError(f"--ray {address}: no Ray cluster answers there ({one_line(error)}); start one with "
                        f"./ray_cluster.sh up, or give the address `ray status` shows") from None


def connect(address: str):
    """Join the cluster at `address` as its driver; the `ray` module."""
    check_address(address)
    # Under `uv run`, Ray would start its workers with `uv run` in a copy of this folder, with an
    # environment of their own: they must run the Python of the node's checkout, which
    # `ray start` ran with. Read when Ray is imported.
    os.environ["RAY_ENABLE_UV_RUN_RUNTIME_ENV"] = "0"
    try:
        import ray
    except ImportError:
        raise UserError("--ray needs Ray: uv sync --extra ray") from None
    # Tasks' own lines (a trial's start and end) reach this console, prefixed with their node.
    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
    nodes = [node for node in ray.nodes() if node["Alive"]]
    log.info("Ray cluster at %s: %d node(s), %g CPUs", address, len(nodes), ray.cluster_resources().get("CPU", 0))
    return ray


def run_tasks(address: str, function: Callable, arguments: list[tuple], cpus: float = 1.0,
              describe: Callable[[tuple], str] = str,
              on_done: Callable[[int, object | None, str | None], None] = lambda index, result, error: None,
              ) -> list[tuple[object | None, str | None]]:
    """`function(*args)` for each of `arguments` as a Ray task of `cpus` CPUs; each one's (result,
    None) or (None, why it failed), in order, as they are all done, and to `on_done` with its
    index as each is done."""
    ray = connect(address)
    remote = ray.remote(num_cpus=cpus, max_retries=RETRIES, retry_exceptions=False)(function)
    pending = {remote.remote(*args): index for index, args in enumerate(arguments)}
    outcomes: list[tuple[object | None, str | None]] = [(None, None)] * len(arguments)
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            index = pending.pop(done[0])
            try:
                outcomes[index] = (ray.get(done[0]), None)
            except Exception as error:  # the task's own exception, or its node lost beyond the retries
                cause = getattr(error, "cause", None) or error
                outcomes[index] = (None, one_line(cause))
                log.warning("%s failed on the cluster: %s", describe(arguments[index]), outcomes[index][1])
            on_done(index, *outcomes[index])
    finally:
        for task in pending:  # interrupted: nothing of ours keeps running on the cluster
            ray.cancel(task, force=True)
        ray.shutdown()
    return outcomes
