"""Worked examples of extending the project (docs/extending.md): a new agent and a new data
source, each written here as a contributor would write it in src/, named by a config node
that stands in for its conf/ YAML, and run through the product's own functions.

The other two worked examples live beside the code they extend: a new environment in
tests/envs/test_contract.py, a new estimator in tests/evaluation/test_estimators.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from omegaconf import OmegaConf
from tf_agents.bandits.agents import greedy_reward_prediction_agent
from tf_agents.networks import q_network

from src import data, experiment
from src.data.movielens import MovieLens
from src.errors import UserError, require
from src.paths import resolve
from src.training import train

# --- A new agent -------------------------------------------------------------------------------
# In a project file: the builder below as src/agents/greedy.py (`build`), GREEDY as
# conf/agent/greedy.yaml with `_target_: src.agents.greedy.build`.


def build_greedy(time_step_spec, action_spec, learning_rate: float, name: str = "greedy"):
    """Greedy on a learnt reward model: one linear model per movie over the user features,
    fitted by Adam on the rewards of the movies picked, never exploring. TF-Agents'
    `GreedyRewardPredictionAgent` with a network of no hidden layers."""
    require(learning_rate > 0, "agent.learning_rate", learning_rate, "> 0")
    network = q_network.QNetwork(time_step_spec.observation, action_spec, fc_layer_params=())
    return greedy_reward_prediction_agent.GreedyRewardPredictionAgent(
        time_step_spec, action_spec, reward_network=network,
        optimizer=tf.compat.v1.train.AdamOptimizer(learning_rate=learning_rate),
        # src.predict and the served model show each movie's predicted reward from this.
        emit_policy_info=("predicted_rewards_mean",), name=name)


GREEDY = {
    "_target_": f"{__name__}.build_greedy",
    "name": "greedy",
    "per_arm": False,  # one output per movie: it cannot score candidates by their features
    "slate": False,
    "learning_rate": 0.2,
}


def with_agent(cfg, **changes):
    """`cfg` with GREEDY (and `changes` to it) in place of its agent, as `agent=greedy` would compose it."""
    cfg.agent = OmegaConf.create({**GREEDY, **changes})
    return cfg


def trained(cfg, dataset) -> tuple[np.ndarray, float]:
    """Each loop's regret per interaction, and uniform random's, after `cfg.training.loops` loops."""
    engine = experiment.assemble(cfg, dataset)
    regret = np.concatenate([chunk.regret for chunk in engine.run(cfg.training.loops, cfg.training.chunk_loops)])
    return regret / engine.interactions_per_loop, engine.environment.reward_model.random_policy_regret


def test_a_new_agent_learns_in_the_compiled_engine(make_config):
    cfg = with_agent(make_config())
    dataset = data.load(cfg.data)
    regret, random_regret = trained(cfg, dataset)
    # The bar tests/test_agents.py sets the project's agents. Never exploring, it can settle on a
    # movie that is not a user's best: over seeds 0-3 its last 20 loops' regret was 0.18-0.57 of
    # uniform random's.
    assert np.isfinite(regret).all() and regret[-20:].mean() < 0.75 * random_regret
    # The run's seed fixes everything the agent draws (its network's first weights): the same again.
    np.testing.assert_array_equal(trained(cfg, dataset)[0], regret)


def test_a_new_agent_is_held_to_its_yaml(make_config):
    cfg = make_config()
    dataset = data.load(cfg.data)
    # Its own checks name the file it is configured in.
    with pytest.raises(UserError, match=r"^agent.learning_rate must be > 0, got -1.0 \(conf/agent/greedy.yaml\)$"):
        experiment.assemble(with_agent(cfg, learning_rate=-1.0), dataset)
    # `per_arm: false` keeps it off environments whose candidates come with features.
    cfg = make_config("env=movielens_per_arm", "env.num_actions=4")
    with pytest.raises(UserError, match="^agent=greedy cannot take this environment's per-arm features"):
        experiment.assemble(with_agent(cfg), dataset)


# --- A new data source -------------------------------------------------------------------------
# In a project file: the loader below as src/data/ratings_csv.py (`load`), and
# conf/data/ratings_csv.yaml with `_target_: src.data.ratings_csv.load`, `name: ratings_csv` and
# `dir: null` for the user to fill in (`data=ratings_csv data.dir=/path/to/ml-latest-small`).
# The folder goes in `dir`, as MovieLens' does: the run's dataset names it as its source, and
# run names leave it out (src.config.DATA_WHEREABOUTS).


def load_ratings_csv(dir: str) -> MovieLens:
    """`ratings.csv` in folder `dir`, as the newer MovieLens releases write it (ml-latest, ml-25m:
    a header line, then userId,movieId,rating,timestamp with half-star ratings), as the
    project's tables. The environments take ids as rows and columns of the ratings matrix
    (`MovieLens.ratings_matrix`), and these movieIds are sparse (past 200,000 in ml-latest),
    so movies are renumbered 1..n in the order of their ids, each titled with its own."""
    folder = None if dir is None else resolve(dir)
    require(folder is not None and (folder / "ratings.csv").is_file(), "data.dir", dir, "a folder holding ratings.csv")
    raw = pd.read_csv(folder / "ratings.csv")
    movie_ids = np.sort(raw.movieId.unique())
    ratings = pd.DataFrame({"user_id": raw.userId, "item_id": np.searchsorted(movie_ids, raw.movieId) + 1,
                            "rating": raw.rating, "timestamp": raw.timestamp})
    movies = pd.DataFrame({"title": [f"movieId {movie}" for movie in movie_ids], "genres": [()] * len(movie_ids)},
                          index=pd.RangeIndex(1, len(movie_ids) + 1, name="item_id"))
    # No demographics in these releases: the users are their ids.
    users = pd.DataFrame(index=pd.Index(np.sort(raw.userId.unique()), name="user_id"))
    return MovieLens(ratings=ratings, movies=movies, users=users, source=folder)


def write_ratings_csv(folder: Path, users: int = 12, movie_ids=(1, 2, 3, 5, 10, 47, 2571, 4993)) -> pd.DataFrame:
    """A small ratings.csv in the newer releases' shape: rank-2 tastes, half stars, each user
    rating 6 of the movies."""
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(users, 2)) @ rng.normal(size=(2, len(movie_ids)))
    rows = [(user + 1, movie_ids[movie], np.clip(np.round(2 * (3 + scores[user, movie])) / 2, 0.5, 5), 1_500_000_000)
            for user in range(users) for movie in sorted(rng.choice(len(movie_ids), 6, replace=False))]
    frame = pd.DataFrame(rows, columns=["userId", "movieId", "rating", "timestamp"])
    frame.to_csv(folder / "ratings.csv", index=False)
    return frame


def test_a_new_data_source_feeds_the_environment_and_a_tracked_run(make_config, tmp_path):
    csv = write_ratings_csv(tmp_path)
    cfg = make_config("env.num_movies=8", "env.rank_k=2", "training.loops=20", "training.chunk_loops=10")
    cfg.data = OmegaConf.create({"_target_": f"{__name__}.load_ratings_csv", "name": "ratings_csv",
                                 "dir": str(tmp_path)})

    dataset = data.load(cfg.data)
    model = experiment.assemble(cfg, dataset).environment.reward_model
    np.testing.assert_array_equal(model.user_ids, np.unique(csv.userId))
    assert list(dataset.movies.title.loc[model.movie_ids]) == [f"movieId {movie}" for movie in np.unique(csv.movieId)]

    final, run_id = train(cfg)
    assert np.isfinite(final["train/cumulative_regret"])
    run = mlflow.MlflowClient(cfg.tracking.uri).get_run(run_id)
    assert run.info.status == "FINISHED"
    (logged,) = run.inputs.dataset_inputs
    assert logged.dataset.name == "ratings_csv"
    assert json.loads(logged.dataset.source) == {"uri": tmp_path.as_uri()}


def test_a_new_data_source_is_held_to_its_yaml(make_config, tmp_path):
    cfg = make_config()
    cfg.data = OmegaConf.create({"_target_": f"{__name__}.load_ratings_csv", "name": "ratings_csv",
                                 "dir": str(tmp_path)})
    with pytest.raises(UserError, match=r"^data.dir must be a folder holding ratings.csv, got .* "
                                        r"\(conf/data/ratings_csv.yaml\)$"):
        data.load(cfg.data)
