"""The slate environment (env=movielens_ranking): slate worth and regret, NDCG@k, precision@k and
the cascade click model against NumPy references, the exact random-slate regret, the slate
agents, a tracked run served as a ranked slate, and its one-line errors."""

from __future__ import annotations

import subprocess
import sys

import mlflow
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from sklearn.metrics import ndcg_score
from tf_agents.bandits.agents import ranking_agent

from src import data, experiment, metrics, predict, training
from src.envs import build_environment
from src.errors import UserError
from src.paths import PROJECT_ROOT

SLATE = 3
CANDIDATES = 6
THRESHOLD = 3.0


@pytest.fixture
def make_env(make_config):
    def make(*overrides: str):
        cfg = make_config(*ranking(*overrides))
        return build_environment(cfg, data.load(cfg.data))

    return make


def ranking(*overrides: str) -> list[str]:
    return ["env=movielens_ranking", f"env.num_actions={CANDIDATES}", f"env.slate_size={SLATE}",
            f"env.click_threshold={THRESHOLD}", *overrides]


def random_slates(batch_size: int, seed: int) -> tf.Tensor:
    keys = np.random.default_rng(seed).random((batch_size, CANDIDATES))
    return tf.constant(np.argsort(keys, axis=1)[:, :SLATE], tf.int32)


def test_slate_metrics_and_feedback_match_numpy(make_env):
    scores_env, cascade_env = make_env("training.batch_size=200", "env.feedback=scores"), make_env(
        "training.batch_size=200", "env.position_bias=0.7")
    for env in (scores_env, cascade_env):
        env.reset()
        slate = random_slates(env.batch_size, 3)
        rewards = env.reward_model.rewards[env._users.numpy()[:, None], env._candidates.numpy()]
        chosen = np.take_along_axis(rewards, slate.numpy(), axis=1)
        worth, best = (t.numpy() for t in env.outcome(slate))
        np.testing.assert_allclose(worth, chosen.sum(axis=1))
        np.testing.assert_allclose(best, -np.sort(-rewards, axis=1)[:, :SLATE].sum(axis=1))
        # NDCG@k of the slate: the slate's positions scored k..1, the other candidates 0.
        ranks = np.zeros_like(rewards)
        np.put_along_axis(ranks, slate.numpy(), np.arange(SLATE, 0, -1), axis=1)
        gains = np.maximum(rewards, 0)
        expected_ndcg = [ndcg_score(g[None], r[None], k=SLATE) if g.any() else 0.0 for g, r in zip(gains, ranks)]
        looked_at = env._looked_at.numpy()
        clicks = looked_at & (chosen >= THRESHOLD)
        position = np.where(clicks.any(axis=1), clicks.argmax(axis=1), SLATE)
        extras = env.extra_metrics(slate).numpy()
        np.testing.assert_allclose(extras[:, 0], expected_ndcg, atol=1e-9)
        np.testing.assert_allclose(extras[:, 1], (chosen >= THRESHOLD).mean(axis=1))
        np.testing.assert_array_equal(extras[:, 2], position < SLATE)
        assert 0 < extras[:, 2].mean() < 1
        feedback = env.feedback(slate, None)
        if env is scores_env:
            np.testing.assert_allclose(feedback.numpy(), chosen, rtol=1e-6)
        else:
            np.testing.assert_array_equal(feedback[ranking_agent.CHOSEN_INDEX].numpy(), position)
            np.testing.assert_array_equal(feedback[ranking_agent.CHOSEN_VALUE].numpy(), position < SLATE)


def test_positions_are_looked_at_with_the_position_bias(make_env):
    env = make_env("training.batch_size=1000", "env.position_bias=1.5")
    looked_at = np.concatenate([(env.reset(), env._looked_at.numpy())[1] for _ in range(4)])
    expected = np.arange(1, SLATE + 1) ** -1.5
    assert np.abs(looked_at.mean(axis=0) - expected).max() < 4 * np.sqrt(0.25 / len(looked_at))


def test_random_slate_regret_matches_monte_carlo(make_config):
    cfg = make_config(*ranking("agent=random", "training.batch_size=250", "training.loops=80",
                               "training.steps_per_loop=1", "training.chunk_loops=80"))
    engine = experiment.assemble(cfg, data.load(cfg.data))
    (loops,) = engine.run(80, 80)
    per_visit = loops.regret / engine.interactions_per_loop
    standard_error = per_visit.std() / np.sqrt(len(per_visit))
    assert abs(per_visit.mean() - engine.environment.reward_model.random_policy_regret) < 4 * standard_error


@pytest.mark.parametrize("agent", ["linucb", "lints", "ranking"])  # epsilon-greedy: the ranking scorer
def test_slate_agents_beat_the_random_slate(make_config, agent):
    """Over the last half of training every slate agent's regret is clearly below the random
    slate's exact regret; with the movies' products with the user (the reward is u . m) the
    linear agents fit the rewards, the neural ones learn from the whole slate's scores."""
    features = "env.arm_features=interaction" if agent in ("linucb", "lints") else "env.feedback=scores"
    cfg = make_config(*ranking(f"agent={agent}", features, "training.loops=400", "training.chunk_loops=400"))
    engine = experiment.assemble(cfg, data.load(cfg.data))
    (loops,) = engine.run(400, 400)
    per_visit = loops.regret[200:].mean() / engine.interactions_per_loop
    assert per_visit < 0.5 * engine.environment.reward_model.random_policy_regret


def test_a_tracked_slate_run_logs_its_metrics_and_serves_a_ranked_slate(make_config, tracking_uri):
    cfg = make_config(*ranking("agent=epsilon_greedy", "tracking.save_policy=true"))
    final, run_id = training.train(cfg)
    client = mlflow.MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    for name in (metrics.NDCG, metrics.PRECISION, metrics.CLICK_THROUGH_RATE):
        history = [point.value for point in client.get_metric_history(run_id, name)]
        assert history and all(0 <= value <= 1 for value in history), name
    assert {"regret.png", "metrics.csv", "policy"} <= {entry.path for entry in client.list_artifacts(run_id)}
    user = int(build_environment(cfg, data.load(cfg.data)).reward_model.user_ids[2])
    answer = mlflow.pyfunc.load_model(f"runs:/{run_id}/model").predict(pd.DataFrame({"user_id": [user]}))
    scores = answer.scores[0]
    slate = sorted(scores, key=scores.get, reverse=True)[:SLATE]
    assert answer.slate_movie_ids[0] == [int(movie) for movie in slate] and len(answer.slate[0]) == SLATE
    report = predict.recommend(predict.parse([f"run_id={run_id}", f"user_id={user}", f"tracking.uri={tracking_uri}"]))
    assert f"its slate: the top {SLATE} ranked" in report
    assert [line.split()[0] for line in report.splitlines()[-SLATE:]] == ["1", "2", "3"]
    model = build_environment(cfg, data.load(cfg.data)).reward_model
    ratings = model.rewards[list(model.user_ids).index(user)]
    column = {movie_id: column for column, movie_id in enumerate(model.movie_ids)}
    worth = sum(ratings[column[movie]] for movie in answer.slate_movie_ids[0])
    best = np.sort(ratings)[-SLATE:].sum()
    assert (f"slate of {SLATE} for user {user}: true ratings sum to {worth:.3f}, the best slate's to {best:.3f} "
            f"(slate regret {best - worth:.3f})") in report


@pytest.mark.parametrize("overrides, message", [
    (["env.slate_size=7"], r"env.slate_size must be an integer between 1 and the 6 candidates offered"),
    (["env.feedback=stars"], r"env.feedback must be one of scores, cascade"),
    (["env.position_bias=-1"], r"env.position_bias must be >= 0"),
    (["agent=neural_linucb"], r"agent=neural_linucb cannot recommend slates; agents that can: epsilon_greedy, "
                              r"lints, linucb, random, ranking"),
])
def test_bad_slate_settings_are_one_line_user_errors(make_config, overrides, message):
    cfg = make_config(*ranking(*overrides))
    with pytest.raises(UserError, match=message) as error:
        experiment.assemble(cfg, data.load(cfg.data))
    assert "\n" not in str(error.value)


def test_the_ranking_agent_needs_a_slate_environment(make_config):
    cfg = make_config("env=movielens_per_arm", "env.num_actions=4", "agent=ranking")
    with pytest.raises(UserError, match=r"agent=ranking cannot take .* \(it recommends slates: use it with "
                                        r"env=movielens_ranking\); agents that can: .*linucb") as error:
        experiment.assemble(cfg, data.load(cfg.data))
    assert "ranking" not in str(error.value).split("agents that can:")[1]


def test_building_a_slate_agent_prints_no_tensorflow_probability_warning():
    """TFP warned in 25 lines, twice a run, about a distribution TF-Agents' ranking policies define."""
    probe = ("from src import config, data, experiment; "
             "cfg = config.compose(['env=movielens_ranking', 'agent=ranking', 'data=synthetic', 'data.num_users=50']); "
             "engine = experiment.assemble(cfg, data.load(cfg.data)); list(engine.run(2, 2))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Distribution subclass" not in done.stderr
