"""`training.jit_compile`: the stand-in draws of a loop compiled by XLA keep their distributions
and repeat from their seed (a compiled run repeating itself: tests/test_engine.py), a compiled
run is tracked as any other, and what XLA cannot compile is refused in one line."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import tensorflow as tf

from src import config, metrics, seeding, training, xla_draws
from src.errors import UserError

N = 40_000  # draws per distribution: a mean's standard error is then ~0.5% of the spread


def draws_of(seed: int, draw) -> np.ndarray:
    """`draw()` traced inside `drawn_from` a generator of `seed`, then run (without XLA)."""
    generator = seeding.stream(seed, seeding.XLA)

    @tf.function(autograph=False)
    def drawn():
        with xla_draws.drawn_from(generator):
            values = draw()
        xla_draws.check_repeatable(tf.compat.v1.get_default_graph())
        return values

    return drawn().numpy()


# Each bound is ~5 standard errors of N draws.
def test_the_stand_ins_draw_from_the_distributions_they_replace():
    uniform = draws_of(0, lambda: tf.random.uniform([N]))
    assert abs(uniform.mean() - 0.5) < 0.008 and 0 <= uniform.min() and uniform.max() < 1
    integers = draws_of(0, lambda: tf.random.uniform([N], maxval=5, dtype=tf.int32))
    np.testing.assert_allclose(np.bincount(integers, minlength=5) / N, 0.2, atol=0.011)
    normal = draws_of(0, lambda: tf.random.normal([N], dtype=tf.float64))
    assert abs(normal.mean()) < 0.025 and abs(normal.std() - 1) < 0.02
    truncated = draws_of(0, lambda: tf.random.truncated_normal([N]))
    assert np.abs(truncated).max() <= 2 and abs(truncated.std() - 0.8796) < 0.02  # N(0, 1) cut at 2
    logits = np.log([[0.1, 0.3, 0.6], [0.5, 0.25, 0.25]])
    picks = draws_of(0, lambda: tf.random.categorical(tf.constant(logits, tf.float32), N))
    for row, probabilities in zip(picks, np.exp(logits)):
        np.testing.assert_allclose(np.bincount(row, minlength=3) / N, probabilities, atol=0.013)


def test_the_stand_ins_repeat_from_their_seed_and_only_from_it():
    def draw():
        return tf.concat([tf.random.uniform([5]), tf.cast(tf.random.categorical([[0.0, 0.0, 0.0]], 5)[0], tf.float32)], 0)

    np.testing.assert_array_equal(draws_of(3, draw), draws_of(3, draw))
    assert not np.array_equal(draws_of(4, draw), draws_of(3, draw))


def test_another_thread_keeps_tensorflows_own_draws():
    def random_ops_traced() -> set[str]:
        graph = tf.function(lambda: tf.random.uniform([2])).get_concrete_function().graph
        return {op.type for op in graph.get_operations()} & xla_draws.STATEFUL_RANDOM_OPS

    seen = {}
    with xla_draws.drawn_from(seeding.stream(0, seeding.XLA)):
        worker = threading.Thread(target=lambda: seen.update(other=random_ops_traced()))
        worker.start()
        worker.join()
        seen["inside"] = random_ops_traced()
    seen["after"] = random_ops_traced()
    assert seen == {"other": {"RandomUniform"}, "inside": set(), "after": {"RandomUniform"}}


def test_a_loop_left_with_a_stateful_draw_is_refused():
    graph = tf.function(lambda: tf.random.shuffle(tf.range(3))).get_concrete_function().graph
    with pytest.raises(RuntimeError, match="RandomShuffle"):
        xla_draws.check_repeatable(graph)


def test_a_compiled_run_is_tracked_like_any_other(make_config):
    import mlflow

    final, run_id = training.train(make_config("agent=epsilon_greedy", "training.jit_compile=true"))
    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["training.jit_compile"] == "True"
    assert np.isfinite(final[metrics.CUMULATIVE_REGRET])


@pytest.mark.parametrize("overrides, message", [
    (["agent=linucb"], "cannot compile agent=linucb's loop; agents it can: dropout_ts, epsilon_greedy"),
    (["agent=epsilon_greedy", "env=movielens_switch_delayed"], "the pending feedback of env.delay=geometric"),
    (["agent=epsilon_greedy", "env.feedback_drop=0.3"], "the pending feedback of env.feedback_drop=0.3"),
    (["agent=epsilon_greedy", "env=movielens_timeline"], "env=movielens_timeline's loop"),
    (["agent=epsilon_greedy", "objective=ope/dr", "offline.logs_run_id=abc"], "learns from logged interactions"),
])
def test_what_xla_cannot_compile_is_refused_in_one_line(overrides, message):
    with pytest.raises(UserError, match=message) as refusal:
        config.check_run(config.compose(["training.jit_compile=true", *overrides]))
    assert "\n" not in str(refusal.value)
    config.check_run(config.compose(["training.jit_compile=true", "agent=random", "env=movielens_ranking"]))
