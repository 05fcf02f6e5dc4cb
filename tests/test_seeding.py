"""Each run's random streams (src.seeding): the seeds' and the purposes' streams share no draws,
where `tf.random.Generator.from_seed` streams of neighbouring seeds are shifted copies of each
other; and neighbouring seeds' environments draw unrelated users."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from src import data, experiment, seeding

PURPOSES = (seeding.USERS, seeding.POLICY, seeding.DELAYS, seeding.XLA)
DRAWS = 256


def shared_draws(generators: list[tf.random.Generator]) -> int:
    """How many of the generators' 64-bit draws another one (or itself) drew too: ~2^-64 x
    draws^2 by chance, so any is a stream's overlap with another's."""
    values = np.concatenate([generator.uniform_full_int([DRAWS], tf.uint64).numpy() for generator in generators])
    return len(values) - len(np.unique(values))


def test_neighbouring_seeds_from_seed_share_draws():
    """The trap: from_seed(s) is key 0 at counter s, so seed s + 1 draws what s drew one block on."""
    assert shared_draws([tf.random.Generator.from_seed(seed) for seed in range(2)]) > DRAWS // 2


def test_no_two_streams_of_seeds_and_purposes_share_a_draw():
    generators = [seeding.stream(seed, purpose) for seed in range(10) for purpose in PURPOSES]
    assert shared_draws(generators) == 0


def test_a_stream_starts_again_from_its_seed_and_purpose():
    first, again = seeding.stream(7, seeding.USERS), seeding.stream(7, seeding.USERS)
    np.testing.assert_array_equal(first.normal([8]).numpy(), again.normal([8]).numpy())


@pytest.mark.parametrize("env", [["env=movielens"], ["env=movielens_per_arm", "env.num_actions=5"]])
def test_neighbouring_seeds_draw_unrelated_users(make_config, env):
    """Seed 1's users were seed 0's four draws on (on movielens each user's row less 4, per arm
    the user four places on in the batch): now at no shift of place nor offset of row do the two
    seeds' users agree on more than chance (~1 / users each)."""

    def users_drawn(seed: int) -> np.ndarray:
        cfg = make_config(*env, f"training.seed={seed}")
        environment = experiment.assemble(cfg, data.load(cfg.data)).environment
        features = environment.reward_model.user_features.astype(np.float32)
        drawn = []
        for _ in range(20):
            observation = tf.nest.flatten(environment.reset().observation)[0].numpy()  # the users' own features
            drawn.append([np.flatnonzero((features == row).all(axis=1))[0] for row in observation])
        return np.concatenate(drawn)

    seed_0, seed_1 = users_drawn(0), users_drawn(1)
    agreeing = [np.mean(seed_1[:len(seed_1) - shift] == seed_0[shift:] + offset)
                for shift in range(9) for offset in range(-8, 9)]
    assert max(agreeing) < 0.2, agreeing
