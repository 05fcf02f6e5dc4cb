"""Recommend movies with a trained policy.

    uv run python -m src.predict run_id=<run id> user_id=42
    uv run python -m src.predict model_uri=models:/<name>/<version> input=observations.csv top_k=3

The policy is the run's `policy/` SavedModel, or the one its pyfunc `model` bundles. A user's
observation and true ratings are rebuilt from the environment the run logged in its
`config.yaml`, over the same MovieLens data (`data.dir=` says where it lives now). Options
are in `conf/predict.yaml`.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from src import config
from src.cli import exit_on_user_error, run_and_exit
from src.errors import UserError, require

if TYPE_CHECKING:
    from src import serving

log = logging.getLogger(__name__)

USAGE = "usage: python -m src.predict run_id=<id>|model_uri=<uri> user_id=<id>|input=<file> [top_k=<k>]"


def parse(overrides: list[str]) -> DictConfig:
    """`conf/predict.yaml` with the command line's key=value overrides, checked."""
    cfg = config.compose_command(overrides, "predict", USAGE)
    if (cfg.run_id is None) == (cfg.model_uri is None):
        raise UserError(f"give exactly one of run_id= and model_uri= ({USAGE})")
    if (cfg.user_id is None) == (cfg.input is None):
        raise UserError(f"give exactly one of user_id= and input= ({USAGE})")
    for key in ("user_id", "top_k"):
        value = cfg[key]
        require(value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1),
                key, value, "an integer >= 1")
    return cfg


def data_row(dataset, user_id: int) -> int:
    """The data's number of the user whose own id is `user_id`: the later releases and ratings
    files renumber users 1..n and keep each one's id (`users.id`); 100K's are its own."""
    if "id" not in dataset.users:
        require(user_id in dataset.users.index, "user_id", user_id, f"a MovieLens user id, 1..{dataset.num_users}")
        return user_id
    rows = np.flatnonzero(dataset.users.id.to_numpy() == user_id)
    require(len(rows) == 1, "user_id", user_id,
            f"a user id of this data, from {dataset.users.id.min()} to {dataset.users.id.max()} with gaps")
    return int(dataset.users.index[rows[0]])


def user_rewards(reward_model, rows: np.ndarray) -> np.ndarray:
    """[rows, movies] the rewards the environment pays these users: from the factors where it has
    them (a large pool has no whole table), else its table (real ratings, NaN where unrated)."""
    if hasattr(reward_model, "user_factors"):
        return reward_model.user_factors[rows] @ reward_model.movie_factors.T
    return reward_model.rewards[rows]


def read_observations(path: str) -> np.ndarray:
    """Observation vectors, one per row: a JSON list of lists or a CSV file without header."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"input={path} is not a file")
    try:
        if file.suffix.lower() == ".json":
            rows = np.atleast_2d(np.asarray(json.loads(file.read_text()), np.float64))
        else:
            rows = pd.read_csv(file, header=None).to_numpy(np.float64)
    except ValueError as error:
        raise UserError(f"input={path}: expected one vector of numbers per row ({error})") from None
    if rows.ndim != 2:
        raise UserError(f"input={path}: expected one vector of numbers per row")
    return rows


def recommend(cfg: DictConfig) -> str:
    """Run the policy on the user or the observations `cfg` names; return the report."""
    # Here, after the options are checked: TensorFlow and MLflow take seconds to load.
    import mlflow

    from src import artifacts, data, serving, tracking
    from src.envs import build_environment

    tracking.open_to_read(cfg.tracking.uri)
    log.info("Fetching the policy and its run's config from %s", mlflow.get_tracking_uri())
    with tempfile.TemporaryDirectory() as scratch:
        run_id, policy_path = artifacts.fetch_policy(cfg.run_id, cfg.model_uri, Path(scratch))
        run_cfg = artifacts.logged_config(run_id, Path(scratch))
        policy = serving.Policy(policy_path)
    if cfg.data.dir is not None:
        run_cfg.data.dir = cfg.data.dir
    dataset = data.load(run_cfg.data)
    reward_model = build_environment(run_cfg, dataset).reward_model
    catalogue = serving.Catalogue.of(reward_model, dataset.movies, run_cfg.env)
    if cfg.user_id is not None:
        user = data_row(dataset, cfg.user_id)
        observations = catalogue.observations_of([user])
        ratings = user_rewards(reward_model, np.flatnonzero(reward_model.user_ids == user))
        rated = dataset.ratings_matrix()[[user - 1]][:, catalogue.movie_ids - 1].toarray()
        labels = [f"user {cfg.user_id}"]
    else:
        observations = read_observations(cfg.input)
        ratings = rated = None
        labels = [f"row {row}" for row in range(1, len(observations) + 1)]
    actions, scores = policy.decide(observations, catalogue)
    if policy.movies_arrived is not None:  # what it serves: the movies arrived by the end of its training
        served = policy.movies_arrived
        catalogue = catalogue.first(served)
        scores, ratings, rated = (None if table is None else table[:, :served] for table in (scores, ratings, rated))
    top_k = cfg.top_k or policy.slate_size  # a slate policy's ranked slate, unless told otherwise
    if scores is None and cfg.top_k is not None:
        raise UserError(f"top_k needs predicted rewards, which the {run_cfg.agent.name} policy "
                        f"does not report")
    header = (f"run {run_id}: {run_cfg.agent.name} on {run_cfg.env.name} (seed "
              f"{run_cfg.training.seed}), {len(catalogue.movie_ids)} candidate movies"
              + (f"; its slate: the top {policy.slate_size} ranked" if policy.slate_size else ""))
    slates = policy.slates(scores) if policy.slate_size and scores is not None else None
    # Renumbered data (the later releases, ratings files) shows each movie by its own id.
    movie_ids = (dataset.movies.id.reindex(catalogue.movie_ids).to_numpy() if "id" in dataset.movies
                 else catalogue.movie_ids)
    blocks = [describe(label, catalogue, movie_ids, actions[i], None if scores is None else scores[i],
                       None if ratings is None else ratings[i], top_k, None if slates is None else slates[i],
                       None if rated is None else rated[i])
              for i, label in enumerate(labels)]
    return "\n\n".join([header, *blocks])


def describe(label: str, catalogue: serving.Catalogue, movie_ids: np.ndarray, action: int, scores, ratings, top_k,
             slate: np.ndarray | None = None, rated: np.ndarray | None = None) -> str:
    """One observation's recommendation, its true rating (the reward the environment pays) and
    the best movie when known (for a slate policy's `slate`, the columns of its movies, also
    what it is worth against the best slate), and the candidates ranked by predicted reward
    (which LinUCB's pick may not top: it adds an exploration bonus). `rated`: the user's own
    MovieLens rating of each movie, 0 where they gave none; `movie_ids`: each catalogue movie's id
    as the data names it."""
    def movie(index: int) -> str:
        return f"movie {movie_ids[index]} \"{catalogue.titles[index]}\""

    # With real ratings (env=movielens_ratings) only the movies a user rated have one (NaN elsewhere).
    known = ratings is not None and np.isfinite(ratings[action])
    facts = []
    if scores is not None:
        facts.append(f"predicted reward {scores[action]:.3f}")
    if known:
        facts.append(f"true rating {ratings[action]:.3f}"
                     + (", a movie they never rated" if rated is not None and not rated[action] else ""))
    lines = [f"{label}: recommended {movie(action)}" + (f" ({', '.join(facts)})" if facts else "")]
    if ratings is not None and np.isfinite(ratings).any():
        best = int(np.nanargmax(ratings))
        # env=movielens_ratings rewards with the ratings it held out from the features: the pick may
        # have a rating of theirs among the features' (the table's `rated`) yet none to reward with.
        outcome = (f"regret {ratings[best] - ratings[action]:.3f}" if known
                   else "the pick has no held-out rating of theirs to reward it with")
        lines.append(f"best for {label}: {movie(best)} (true rating {ratings[best]:.3f}, {outcome})")
    if slate is not None and ratings is not None:
        # As the environment scores a slate: the sum of its movies' ratings.
        worth, best_worth = ratings[slate].sum(), np.sort(ratings)[-len(slate):].sum()
        if np.isfinite([worth, best_worth]).all():
            lines.append(f"slate of {len(slate)} for {label}: true ratings sum to {worth:.3f}, the best slate's to "
                         f"{best_worth:.3f} (slate regret {best_worth - worth:.3f})")
    if scores is None:
        lines.append("(this policy reports no predicted rewards per movie)")
        return "\n".join(lines)
    table = pd.DataFrame({
        "pick": np.where(np.arange(len(scores)) == action, "*", ""),
        "movie_id": movie_ids,
        "predicted": scores,
        **({"true_rating": ratings} if ratings is not None else {}),
        # The simulator's true rating of a movie the user never rated is its reconstruction
        # (about 0 at full rank): say so, rather than let 0.000 pass for a rating.
        **({"rated": [f"{r:g}" if r else "not rated" for r in rated]} if rated is not None else {}),
    }).sort_values("predicted", ascending=False, kind="stable").head(top_k or len(scores))
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    # Titles go last and unpadded, so long ones neither stretch nor right-align the table.
    rows = table.to_string(index=False, float_format="{:.3f}".format).splitlines()
    titles = ["title", *catalogue.titles[table.index]]
    lines.extend(f"{row}  {title}" for row, title in zip(rows, titles))
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    # Progress on stderr, the answer alone on stdout.
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with exit_on_user_error():
        print(recommend(parse(argv)))


if __name__ == "__main__":
    run_and_exit(lambda: main(sys.argv[1:]))
