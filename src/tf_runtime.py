"""TensorFlow, TensorFlow Probability and TF-Agents, imported once, quietly and without the
garbage collector (`src.cli.uncollected`).

Every module of ours that uses them imports this one first. TensorFlow's C++ runtime writes
to file descriptor 2 directly and gym prints a notice to `sys.stderr` (not always fd 2, e.g.
under a test runner), both before any logging setting applies; an import error still
surfaces once both are restored.
"""

import contextlib
import logging
import os
import sys

from src.cli import uncollected

# TF-Agents' ranking policies subclass a TensorFlow Probability distribution in a way TFP warns
# about, 25 lines on the root logger each time; they only sample from it, which works.
logging.getLogger().addFilter(
    lambda record: "Distribution subclass NoPenaltyPlackettLuce" not in record.getMessage())


@contextlib.contextmanager
def _silenced_stderr():
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            with contextlib.redirect_stderr(devnull):
                yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


with _silenced_stderr(), uncollected():
    import tensorflow as _tf
    import tensorflow_probability  # noqa: F401  (registers TypeSpecs SavedModels need)
    import tf_agents.agents  # noqa: F401  (imports gym, which prints a notice)

    _tf.config.list_physical_devices()  # probes for CUDA, which logs when there is none

# TensorFlow's logger made its handler while stderr was the null device, closed since: each of its
# warnings (a retrace, a deprecation) would print logging's "I/O operation on closed file" trace.
for _handler in _tf.get_logger().handlers:
    if isinstance(_handler, logging.StreamHandler) and getattr(_handler.stream, "closed", False):
        _handler.stream = sys.stderr  # not setStream, which flushes the closed one first
