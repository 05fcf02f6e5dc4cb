"""Random draws that a loop compiled by XLA repeats from the run's seed (`training.jit_compile`).

XLA seeds TensorFlow's stateful random ops (`RandomUniform`, `Multinomial`, ...) not from their
op seeds but from a process-wide counter advanced at every compiled call (TensorFlow's
`GetXLARandomSeed`): TF-Agents' epsilon-greedy, Boltzmann and dropout policies, compiled, drew
otherwise at each run of one config in one process (cumulative regrets 16,793 and 14,977). While
the engine traces its loop for XLA, `drawn_from` has the ops TensorFlow builds in that thread
draw from a `tf.random.Generator` of the run instead, from the same distributions: the
generator's state is a variable of the loop, which XLA reads and advances like any other.
"""

from __future__ import annotations

import contextlib
import threading

import ml_dtypes
import tensorflow as tf
from tensorflow.python.ops import gen_random_ops

# TensorFlow's stateful random ops: `drawn_from` builds others in place of those `_STAND_INS`
# names; a loop left with any of them would not repeat itself (`check_repeatable`).
STATEFUL_RANDOM_OPS = frozenset({"RandomUniform", "RandomUniformInt", "RandomStandardNormal", "TruncatedNormal",
                                 "Multinomial", "RandomGamma", "RandomPoisson", "RandomPoissonV2", "RandomShuffle",
                                 "ParameterizedTruncatedNormal"})

_tracing = threading.local()  # the generator of the loop this thread traces, if any
_install_lock = threading.Lock()


@contextlib.contextmanager
def drawn_from(draws: tf.random.Generator):
    """While open, the stateful random ops this thread builds draw from `draws`; other threads,
    and this one afterwards, build TensorFlow's own."""
    _install()
    outer, _tracing.generator = getattr(_tracing, "generator", None), draws
    try:
        yield
    finally:
        _tracing.generator = outer


def check_repeatable(graph: tf.Graph) -> None:
    """Raise if the traced `graph` (its functions included) still holds a stateful random op."""
    graph_def = graph.as_graph_def()
    nodes = [*graph_def.node, *(node for function in graph_def.library.function for node in function.node_def)]
    left = sorted({node.op for node in nodes} & STATEFUL_RANDOM_OPS)
    if left:
        raise RuntimeError(f"the compiled loop still draws with {', '.join(left)}, which XLA seeds per process: "
                           "its runs would not repeat (src.xla_draws replaces only some of TensorFlow's random ops)")


def _uniform(draws, shape, dtype, seed=0, seed2=0, name=None):
    return draws.uniform(shape, dtype=dtype, name=name)


def _uniform_int(draws, shape, minval, maxval, seed=0, seed2=0, name=None):
    return draws.uniform(shape, minval, maxval, dtype=tf.convert_to_tensor(minval).dtype, name=name)


def _standard_normal(draws, shape, dtype, seed=0, seed2=0, name=None):
    return draws.normal(shape, dtype=dtype, name=name)


def _truncated_normal(draws, shape, dtype, seed=0, seed2=0, name=None):
    return draws.truncated_normal(shape, dtype=dtype, name=name)


def _multinomial(draws, logits, num_samples, seed=0, seed2=0, output_dtype=tf.int64, name=None):
    """The Gumbel-max trick (argmax of logits plus Gumbel noise is a draw of their softmax): XLA's
    stateless multinomial takes int32 seeds only, the generator's are int64."""
    shape = tf.concat([tf.shape(logits)[:1], [num_samples], tf.shape(logits)[1:]], axis=0)
    tiny = ml_dtypes.finfo(logits.dtype.as_numpy_dtype).tiny  # log(0) would be a pick of -inf noise
    uniform = draws.uniform(shape, minval=tiny, maxval=1.0, dtype=logits.dtype)
    return tf.argmax(logits[:, None, :] - tf.math.log(-tf.math.log(uniform)), axis=-1, output_type=output_dtype,
                     name=name)


_STAND_INS = {"random_uniform": _uniform, "random_uniform_int": _uniform_int,
              "random_standard_normal": _standard_normal, "truncated_normal": _truncated_normal,
              "multinomial": _multinomial}


def _install() -> None:
    """Route TensorFlow's op builders (which `tf.random.*`, Keras' dropout and TF-Agents' policies
    all call) through the stand-ins once a process; a thread that traces no compiled loop keeps
    TensorFlow's own ops."""
    with _install_lock:
        if getattr(gen_random_ops, "_xla_draws_installed", False):
            return
        for name, stand_in in _STAND_INS.items():
            setattr(gen_random_ops, name, _routed(getattr(gen_random_ops, name), stand_in))
        gen_random_ops._xla_draws_installed = True


def _routed(original, stand_in):
    def build(*args, **kwargs):
        draws = getattr(_tracing, "generator", None)
        return original(*args, **kwargs) if draws is None else stand_in(draws, *args, **kwargs)

    return build
