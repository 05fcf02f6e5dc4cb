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

import re
from dataclasses import dataclass

import numpy as np
import tensorflow as tf
from omegaconf import DictConfig
from tensorflow.core.framework import node_def_pb2

from src import experiment
from src.engine import Engine

_CHUNK_SIZE = tf.TensorSpec([], tf.int32)
_NAME = re.compile(r"[\w./>-]+")
_COLOCATION = re.compile(r"loc:@[\w./>-]+")


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
        elif mine.dtype != theirs.dtype or not np.array_equal(mine.numpy(), theirs.numpy()):
            raise Unshareable(f"a constant of their loops ({mine.dtype.name}{mine.shape}) differs")
    return pairs


def copier(sources: list[tf.Variable], targets: list[tf.Variable]):
    """Copies each source into its target in one compiled call, not an eager op a variable."""
    def copy():
        for source, target in zip(sources, targets):
            target.assign(source)

    compiled = tf.function(copy, autograph=False)
    compiled._omit_frequent_tracing_warning = True  # one trace each, but many copiers: see Engine.run_chunk
    return compiled


def canonical_program(graph_def) -> list[str]:
    """A traced graph's nodes and functions as text, its names (uniquified by TensorFlow per trace:
    `dense_4`, `while_body_3460`) replaced by their places, so that two traces of one program
    compare equal and any other difference (a constant, an op, an attribute) does not."""
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
    texts = [_placed(list(graph_def.node), _places([node.name for node in graph_def.node], order))]
    for name in order:
        function = functions[name]
        signature = type(function.signature)()
        signature.CopyFrom(function.signature)
        del signature.control_output[:]  # a set, listed in the order of this trace's names
        places = _places([arg.name for arg in [*signature.input_arg, *signature.output_arg]]
                         + [node.name for node in function.node_def], order)
        control = sorted(f"{places.get(output, output)}={places.get(node, node)}"
                         for output, node in function.control_ret.items())
        texts.append(_placed([signature, *function.node_def, *(function.ret[arg.name] for arg in signature.output_arg),
                              *control], places))
    return texts


def _places(names: list[str], functions: dict[str, str]) -> dict[str, str]:
    return {**{name: f"name{index}" for index, name in enumerate(names)}, **functions}


def _placed(parts, places: dict[str, str]) -> str:
    def placed(text: str) -> str:
        text = _COLOCATION.sub("loc:@", text)  # hints naming nodes of outer graphs
        return _NAME.sub(lambda match: places.get(match.group(), match.group()), text)

    texts = []
    for part in parts:
        if isinstance(part, node_def_pb2.NodeDef):
            # Control inputs are a set, listed in the order of this trace's names.
            control = sorted(placed(name) for name in part.input if name.startswith("^"))
            part = node_def_pb2.NodeDef.FromString(part.SerializeToString())
            kept = [name for name in part.input if not name.startswith("^")]
            del part.input[:]
            part.input.extend(kept)
            texts.extend([placed(str(part)), *control])
        else:
            texts.append(placed(str(part)))
    return "\n".join(texts)
