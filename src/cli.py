"""Process concerns shared by the entry points: exit codes, one-line errors, signals."""

from __future__ import annotations

import atexit
import contextlib
import gc
import logging
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from src.errors import UserError

log = logging.getLogger(__name__)


# Handled like Ctrl-C: a scheduler's or multirun.sh's stop, a closed terminal.
TERMINATION = (signal.SIGTERM, signal.SIGHUP)


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, handled like Ctrl-C but exiting with 128 + the signal's number, as
    shells and schedulers expect."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def stopped_by(signum: int) -> KeyboardInterrupt:
    return KeyboardInterrupt() if signum == signal.SIGINT else Terminated(signum)


@contextlib.contextmanager
def exit_on_user_error():
    """Turn a `UserError` into one log line and exit status 2, Ctrl-C into status 130 and
    SIGTERM or SIGHUP into 143 or 129."""
    try:
        yield
    except UserError as error:
        log.error("%s", error)
        sys.exit(2)
    except KeyboardInterrupt as stop:
        log.warning("Interrupted")
        sys.exit(128 + stop.signum if isinstance(stop, Terminated) else 130)


@contextlib.contextmanager
def uncollected():
    """Imports without the cyclic garbage collector, what they made then frozen out of its reach
    (`gc.freeze`). TensorFlow's, MLflow's and our imports make about a million objects that live
    as long as the process, and each collection of the oldest generation walks all of them: a
    default run spent 2.0-2.4 s of its wall time in collections, most during its imports, and
    0.6 s with them made this way. The garbage uncollected by then is frozen too, once (~12,000
    objects after TensorFlow's import; collecting it first took 0.6 s); nothing is frozen where the
    block imported nothing new (a multirun's later jobs), or each job's garbage would stay. Nested,
    the outermost turns the collector back on."""
    collecting, modules = gc.isenabled(), len(sys.modules)
    gc.disable()
    try:
        yield
    finally:
        if len(sys.modules) > modules:
            gc.freeze()
        if collecting:
            gc.enable()


def run_and_exit(command: Callable[[], object]) -> NoReturn:
    """Run `command`, then exit with its status once the exit handlers have run (logs flushed,
    MLflow's and TensorFlow's handlers), without the interpreter's teardown: freeing TensorFlow's
    and the loop's objects one by one took 2.1 s after a tracked run had finished, on every
    command, as long as a quick run's training. An unexpected error still ends as Python ends
    it, with its traceback. Threads still running are not waited for: each command shuts down its
    own executors (the history logger, replica groups) before it returns."""
    try:
        command()
        status = 0
    except SystemExit as stop:
        status = stop.code
    if status is None:
        status = 0
    elif not isinstance(status, int):  # sys.exit("message"), as Python itself reports it
        print(status, file=sys.stderr)
        status = 1
    atexit._run_exitfuncs()  # what the interpreter's own exit runs first; the teardown after it is skipped
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a reader gone (| head), or the stream closed
            stream.flush()
    os._exit(status)


def writable_folder(path: Path, name: str) -> Path:
    """`path`, made if missing, once it is known to take files: a folder that cannot is one line
    naming the option (`--out`, `hydra.run.dir`) before any work, not a traceback after it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise UserError(f"{name}={path} cannot hold files: {error.strerror or error}") from None
    return path


def stop_on_termination_signals() -> None:
    """Treat SIGTERM and SIGHUP like Ctrl-C, so the run in progress is marked KILLED instead of
    left RUNNING by a process killed outright."""

    def terminate(signum, frame):
        raise Terminated(signum)

    for signum in TERMINATION:
        signal.signal(signum, terminate)


class Interrupts:
    """Ctrl-C and SIGTERM during a run only ask it to stop; it stops where its state is
    consistent and no write to the tracking store is under way: at the end of the chunk of
    loops in progress, after logging it, or without logging it on a second Ctrl-C. (An
    interrupt landing inside a write can leave a SQLite store locked; the run's end then waits
    on that lock and fails, leaving the run RUNNING.) Signals during the clean-up that follows
    are ignored, so it completes however often a user presses."""

    def __init__(self, stopping: str):
        self.received: list[int] = []
        self._stopping = stopping

    def _receive(self, signum, frame) -> None:
        if not self.received:
            log.warning("Stopping %s", self._stopping)
        self.received.append(signum)

    def check(self, urgent_only: bool = False) -> None:
        """Stop here if asked to (`urgent_only`: if asked twice)."""
        if len(self.received) > (1 if urgent_only else 0):
            raise stopped_by(self.received[0])


@contextlib.contextmanager
def interrupts_handled(stopping: str = "after the current chunk of loops (Ctrl-C again to stop without logging it)"):
    """Inside, Ctrl-C and SIGTERM go to the `Interrupts` it yields, the first said as `stopping`
    when it comes; one that came too late for its last `check()` stops the process on leaving.
    Only the main thread may handle signals; a background job's ignored SIGINT stays ignored."""
    interrupts = Interrupts(stopping)
    if threading.current_thread() is not threading.main_thread():
        yield interrupts
        return
    signals = [s for s in (signal.SIGINT, *TERMINATION) if signal.getsignal(s) is not signal.SIG_IGN]
    previous = {s: signal.signal(s, interrupts._receive) for s in signals}
    try:
        yield interrupts
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    interrupts.check()
