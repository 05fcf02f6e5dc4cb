"""Process concerns shared by the entry points: exit codes, one-line errors, signals."""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading

from src.errors import UserError

log = logging.getLogger(__name__)


@contextlib.contextmanager
def exit_on_user_error():
    """Turn a `UserError` into one log line and exit status 2, Ctrl-C into status 130."""
    try:
        yield
    except UserError as error:
        log.error("%s", error)
        sys.exit(2)
    except KeyboardInterrupt:
        log.warning("Interrupted")
        sys.exit(130)


def interrupt_on_sigterm() -> None:
    """Treat SIGTERM (multirun.sh stopping its workers, a scheduler's kill) like Ctrl-C, so the
    run in progress is marked KILLED instead of left RUNNING."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


@contextlib.contextmanager
def interrupt_between_chunks():
    """Inside, Ctrl-C or SIGTERM stops the work at the next `check()`, where its state is
    consistent (an interrupt landing inside MLflow's or TensorFlow's calls can surface as
    their own error instead); a second Ctrl-C stops at once. Yields `check`."""
    requested = []

    def request(signum, frame):
        if requested:
            raise KeyboardInterrupt
        requested.append(signum)
        log.warning("Stopping after the current chunk of loops (Ctrl-C again to stop at once)")

    def check():
        if requested:
            raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield check  # only the main thread may handle signals
        return
    # A job started in the background ignores SIGINT; it keeps doing so.
    signals = [s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) is not signal.SIG_IGN]
    previous = {s: signal.signal(s, request) for s in signals}
    try:
        yield check
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)

