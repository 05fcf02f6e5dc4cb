"""One XLA compilation for runs alike but for their seeds (`training.jit_compile`, src.replicas).

XLA compiles a loop in 2-3 s at MovieLens' default size (a third of a 20,000-loop epsilon-greedy
run), and TensorFlow compiles every traced function anew: ten seeds paid it ten times. Runs alike
but for their seed trace one program over variables of their own (their environment's and
draws' generators, their networks' initial weights), so one compiled loop, the host's, serves
them all: each run keeps an engine of its own, traced as its run alone's but never compiled,
and trains its chunks on the host, its variables copied in before and out after. `paired_variables`
holds the runs to it: their traced graphs equal but for names, their captured constants equal,
so that nothing of a seed that is not in a variable is shared.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tensorflow as tf
from omegaconf import DictConfig
from tensorflow.core.framework import node_def_pb2

from src import experiment
from src.engine import Engine

_CHUNK_SIZE = tf.TensorSpec([], tf.int32)


class Unshareable(Exception):
    """Runs whose traced loops differ otherwise than by their variables' values."""


@dataclass
class Traced:
    """A run's engine with its loop traced: what the loop reads, in the order it captured it."""

    engine: Engine
    # Per capture: the run's own variable, a tensor the loop holds as a constant, or None for a
    # variable made before the engine (process-wide, as TF-Agents' global step), shared as it is.
    captures: list[tf.Variable | tf.Tensor | None]
    handles: list[tf.Tensor]
    program: list[str]


def traced(cfg: DictConfig, dataset) -> Traced:
    """`cfg`'s engine, assembled and its loop traced (not compiled) as its run alone's."""
    made: list[tf.Variable] = []

    def recorded(next_creator, **kwargs):
        made.append(variable := next_creator(**kwargs))
        return variable

    # Optimizers make their slots as the loop is traced: the scope sees those too.
    with tf.variable_creator_scope(recorded):
        engine = experiment.assemble(cfg, dataset)
        loop = engine.run_chunk.get_concrete_function(_CHUNK_SIZE)
    own = {id(variable.handle): variable for variable in made}
    captures = [own.get(id(handle)) if handle.dtype == tf.resource else handle for handle in loop.captured_inputs]
    return Traced(engine, captures, list(loop.captured_inputs), canonical_program(loop.graph.as_graph_def()))


def paired_variables(host: Traced, run: Traced) -> list[tuple[tf.Variable, tf.Variable]]:
    """The host's variables and the run's that its compiled loop reads in their place; raises
    Unshareable where the host's loop cannot train `run`."""
    if host.program != run.program or len(host.captures) != len(run.captures):
        raise Unshareable("their traced loops differ")
    pairs = []
    for mine, theirs, my_handle, their_handle in zip(host.captures, run.captures, host.handles, run.handles):
        if my_handle is their_handle:
            continue  # one variable of the process's (TF-Agents' global step), as in runs alone one after another
        if isinstance(mine, tf.Variable) and isinstance(theirs, tf.Variable):
            if mine.dtype != theirs.dtype or mine.shape != theirs.shape:
                raise Unshareable(f"variable {mine.name} is {mine.dtype.name}{mine.shape} in one loop, "
                                  f"{theirs.dtype.name}{theirs.shape} in the other")
            pairs.append((mine, theirs))
        elif mine is None or theirs is None or isinstance(mine, tf.Variable) or isinstance(theirs, tf.Variable):
            raise Unshareable("their loops read different kinds of tensors")
        elif mine.dtype != theirs.dtype or not _same_values(mine.numpy(), theirs.numpy()):
            raise Unshareable(f"a constant of their loops ({mine.dtype.name}{mine.shape}) differs")
    return pairs


def _same_values(mine: np.ndarray, theirs: np.ndarray) -> bool:
    """Equal, NaN where NaN (the real ratings' table marks the pairs never rated so)."""
    floating = np.issubdtype(mine.dtype, np.inexact)
    return np.array_equal(mine, theirs, equal_nan=floating)


def copier(sources: list[tf.Variable], targets: list[tf.Variable]):
    """Copies each source into its target in one compiled call, not an eager op a variable."""
    def copy():
        for source, target in zip(sources, targets):
            target.assign(source)

    compiled = tf.function(copy, autograph=False)
    compiled._omit_frequent_tracing_warning = True  # one trace each, but many copiers: see Engine.run_chunk
    return compiled


def canonical_program(graph_def) -> list[str]:
    """A traced graph's nodes and functions as text, the names TensorFlow uniquifies per trace
    (`dense_4`, `while_body_3460`) replaced by their places, in the fields that hold names only
    (a node's name and inputs, an argument's name, a called function), so that two traces of one
    program compare equal and any other difference (a constant, an op, an attribute) does not."""
    functions = {function.signature.name: function for function in graph_def.library.function}
    order: dict[str, str] = {}

    def discover(nodes) -> None:
        for node in nodes:
            called = [node.op] + [function.name for _, attr in sorted(node.attr.items())  # a map: no order of its own
                                  for function in ([attr.func] if attr.HasField("func") else attr.list.func)]
            for name in called:
                if name in functions and name not in order:
                    order[name] = f"function{len(order)}"
                    discover(functions[name].node_def)

    discover(graph_def.node)
    top = _places([node.name for node in graph_def.node])
    texts = ["\n".join(_node_text(node, top, order) for node in graph_def.node)]
    for name in order:
        function = functions[name]
        signature = type(function.signature)()
        signature.CopyFrom(function.signature)
        arguments = [*signature.input_arg, *signature.output_arg]
        places = _places([argument.name for argument in arguments] + [node.name for node in function.node_def])
        returned = [_input(function.ret[argument.name], places) for argument in signature.output_arg]
        control = sorted(f"{places.get(output, output)}={places.get(node, node)}"
                         for output, node in function.control_ret.items())
        del signature.control_output[:]  # a set, listed in the order of this trace's names
        signature.name = order[name]
        for argument in arguments:
            argument.name = places[argument.name]
        texts.append("\n".join([str(signature), *(_node_text(node, places, order) for node in function.node_def),
                                *returned, *control]))
    return texts


def _places(names: list[str]) -> dict[str, str]:
    """Each name TensorFlow gave this trace, by its place among them."""
    return {name: f"name{index}" for index, name in enumerate(names)}


def _input(name: str, places: dict[str, str]) -> str:
    """An input as `node`, `node:output:index` or `^node` (a control input), its node placed."""
    control = name.startswith("^")
    node, colon, output = name.removeprefix("^").partition(":")
    return ("^" if control else "") + places.get(node, node) + colon + output


def _node_text(node, places: dict[str, str], functions: dict[str, str]) -> str:
    placed = node_def_pb2.NodeDef()
    placed.CopyFrom(node)
    placed.name = places.get(node.name, node.name)
    placed.op = functions.get(node.op, node.op)  # a call of one of the graph's functions
    # Control inputs are a set, listed in the order of this trace's names.
    del placed.input[:]
    placed.input.extend(_input(name, places) for name in node.input if not name.startswith("^"))
    control = sorted(_input(name, places) for name in node.input if name.startswith("^"))
    placed.attr.pop("_class", None)  # colocation hints, naming nodes of outer graphs
    for attr in placed.attr.values():
        for function in [attr.func] if attr.HasField("func") else attr.list.func:
            function.name = functions.get(function.name, function.name)
    return "\n".join([str(placed), *control])
