"""Independent random streams for a run's parts, from the run's seed.

`tf.random.Generator.from_seed(s)` is Philox with key 0 and its counter at s: seed s + 1 draws
what seed s drew one block (four numbers) later, so ten seeds were ten shifted copies of one
sequence, and generators seeded from other numbers could run into the same counters. A stream
here has a key of its own, hashed by NumPy's SeedSequence from the seed and what the stream is
for, with its counter at 0: streams of different seeds, or of one seed's different purposes,
share no key (bar a 2^-64 collision), and Philox's streams under different keys are independent.
"""

from __future__ import annotations

import zlib

import numpy as np
import tensorflow as tf

# What a run draws, each from a stream of its own.
USERS = "users"  # the simulated environments' users (and per-arm candidates)
POLICY = "policy"  # an agent's exploration (LinTS' samples, uniform picks, epsilon's coin)
DELAYS = "delays"  # the delays and losses of the rewards' feedback
XLA = "xla"  # the stateful random ops of a loop XLA compiles (src.xla_draws)


def key(seed: int, purpose: str) -> int:
    """The 64-bit Philox key of `purpose`'s stream in the run of `seed` (an integer >= 0)."""
    entropy = [seed, zlib.crc32(purpose.encode())]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0])


def stream(seed: int, purpose: str) -> tf.random.Generator:
    """A generator of `purpose`'s draws in the run of `seed`, at the start of its stream."""
    return tf.random.Generator.from_key_counter(key=key(seed, purpose), counter=[0, 0], alg="philox")
