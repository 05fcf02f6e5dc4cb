"""Synthetic data in MovieLens 100K's file formats, with a planted low-rank taste structure.

`data=synthetic` lets anyone try every command without the real files (whose licence forbids
shipping them); the tests and benchmarks use the same generator. `load` makes the tables the
files would parse into and holds them to the parser's consistency rules.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import sparse

from src.data.movielens import GENRES, MovieLens, check_consistency
from src.errors import require

log = logging.getLogger(__name__)

FILES = ("u.data", "u.item", "u.user")
# Beyond this many (user, movie) cells the rated pairs are drawn directly (`drawn_pairs`).
DENSE_DRAW_CELLS = 50_000_000
# MovieLens 32M's size; more would exhaust this machine's memory.
MOST_RATINGS = 40_000_000


def planted_ratings(num_users: int, num_movies: int, rank: int, density: float, seed: int):
    """(users, movies, ratings) of the rated pairs: 0-based indices and 1-5 stars from a rank-`rank`
    taste structure, every user rating the first movie."""
    rng = np.random.default_rng(seed)
    taste = rng.normal(size=(num_users, rank))
    appeal = rng.normal(size=(num_movies, rank))
    if num_users * num_movies > DENSE_DRAW_CELLS:
        return drawn_pairs(taste, appeal, density, rng)
    scores = taste @ appeal.T
    ratings = np.clip(np.round(3 + 1.2 * scores / scores.std()), 1, 5).astype(int)
    rated = rng.random((num_users, num_movies)) < density
    rated[:, 0] = True  # everyone rates something among the first movies
    users, movies = np.nonzero(rated)
    return users, movies, ratings[users, movies]


def drawn_pairs(taste: np.ndarray, appeal: np.ndarray, density: float, rng: np.random.Generator):
    """`planted_ratings` at sizes where a draw per (user, movie) pair would not fit (MovieLens 25M's
    is 10 billion): pairs drawn uniformly with replacement, repeats merged, as many as leave a
    pair rated with chance `density` (-log(1 - density) draws a pair: a pair is missed by all with
    chance 1 - density), each user's first movie added; scores scaled by their standard deviation
    over every pair, from the factors' Gram matrices, as the small draw scales them."""
    num_users, num_movies = len(taste), len(appeal)
    count = round(-np.log1p(-density) * num_users * num_movies)
    users = np.concatenate([rng.integers(0, num_users, count), np.arange(num_users)])
    movies = np.concatenate([rng.integers(0, num_movies, count), np.zeros(num_users, np.int64)])
    pattern = sparse.csr_array((np.ones(len(users), np.float32), (users, movies)), shape=(num_users, num_movies))
    pattern.sum_duplicates()
    users = np.repeat(np.arange(num_users), np.diff(pattern.indptr))
    movies = pattern.indices.astype(np.int64)
    mean = taste.mean(axis=0) @ appeal.mean(axis=0)
    spread = np.sqrt(np.sum((taste.T @ taste) * (appeal.T @ appeal)) / (num_users * num_movies) - mean ** 2)
    scores = np.zeros(len(users))
    for component in range(taste.shape[1]):  # a component at a time: [ratings, rank] would be 3x the memory
        scores += taste[users, component] * appeal[movies, component]
    return users, movies, np.clip(np.round(3 + 1.2 * scores / spread), 1, 5).astype(np.int8)


def write_movielens(directory: Path, num_users: int = 60, num_movies: int = 30, rank: int = 3,
                    density: float = 0.6, seed: int = 0) -> dict[str, str]:
    """Write u.data, u.item and u.user like ml-100k's; return their sha256 by file name."""
    users, movies, stars = planted_ratings(num_users, num_movies, rank, density, seed)
    directory.mkdir(parents=True, exist_ok=True)
    lines = [f"{u + 1}\t{m + 1}\t{r}\t{880000000 + i}" for i, (u, m, r) in enumerate(zip(users, movies, stars))]
    (directory / "u.data").write_text("\n".join(lines) + "\n")
    items = []
    for m in range(num_movies):
        flags = ["0"] * len(GENRES)
        flags[m % len(GENRES)] = "1"
        items.append("|".join([str(m + 1), f"Synthetic Movie {m + 1} (199{m % 10})", "01-Jan-1995", "", "http://x", *flags]))
    (directory / "u.item").write_bytes(("\n".join(items) + "\n").encode("latin-1"))
    people = [f"{u + 1}|{20 + u % 40}|{'MF'[u % 2]}|other|{10000 + u}" for u in range(num_users)]
    (directory / "u.user").write_text("\n".join(people) + "\n")
    return {name: hashlib.sha256((directory / name).read_bytes()).hexdigest() for name in FILES}


def write_release(directory: Path, release: str, num_users: int = 60, num_movies: int = 30, rank: int = 3,
                  density: float = 0.6, seed: int = 0) -> None:
    """The same planted ratings in a later release's layout (`src.data.movielens_releases`):
    "1m" (ratings.dat, movies.dat, users.dat, '::'-separated, Latin-1 titles with colons and
    accents), "10m" (no users.dat, half stars, UTF-8) or "csv" (20M on: ratings.csv and
    movies.csv with headers, a title quoted for its comma, a movie without genres). Ids are
    spaced (user u is 3u, movie m is 7m) as the later releases' have gaps; half-star layouts
    take half a star off every even-numbered rating."""
    users, movies, stars = planted_ratings(num_users, num_movies, rank, density, seed)
    directory.mkdir(parents=True, exist_ok=True)
    spaced = release != "1m"
    user_ids, movie_ids = (users + 1) * (3 if spaced else 1), (movies + 1) * (7 if spaced else 1)
    stars = stars - 0.5 * (np.arange(len(stars)) % 2 == 0) if spaced else stars
    times = 978300000 + np.arange(len(stars))
    genres = [f"{GENRES[m % len(GENRES)]}|Drama" for m in range(num_movies)]
    if release == "csv":
        pd.DataFrame({"userId": user_ids, "movieId": movie_ids, "rating": stars, "timestamp": times}).to_csv(
            directory / "ratings.csv", index=False)
        titles = [f"Synthétique, Movie {m + 1} (199{m % 10})" for m in range(num_movies)]
        genres[-1] = "(no genres listed)"
        pd.DataFrame({"movieId": (np.arange(num_movies) + 1) * 7, "title": titles, "genres": genres}).to_csv(
            directory / "movies.csv", index=False)
        return
    lines = [f"{u}::{m}::{r:g}::{t}" for u, m, r, t in zip(user_ids, movie_ids, stars, times)]
    (directory / "ratings.dat").write_text("\n".join(lines) + "\n")
    titles = [f"{(m + 1) * (7 if spaced else 1)}::Synthétique: Movie {m + 1} (199{m % 10})::{genres[m]}"
              for m in range(num_movies)]
    (directory / "movies.dat").write_bytes(("\n".join(titles) + "\n").encode("utf-8" if spaced else "latin-1"))
    if not spaced:
        people = [f"{u + 1}::{'MF'[u % 2]}::{18 + u % 40}::{u % 21}::{10000 + u}" for u in range(num_users)]
        (directory / "users.dat").write_text("\n".join(people) + "\n")


def checksum_override(checksums: dict[str, str]) -> str:
    """The command-line override that makes `data=movielens` accept files with these sha256."""
    return "data.sha256={" + ",".join(f"{k}:{v}" for k, v in checksums.items()) + "}"


def as_movielens(users: np.ndarray, movies: np.ndarray, stars: np.ndarray, num_users: int,
                 num_movies: int) -> MovieLens:
    """The tables `write_movielens`'s files parse into, made in memory: writing MovieLens 25M's
    size as text and reading it back would take minutes."""
    ratings = pd.DataFrame({"user_id": users + 1, "item_id": movies + 1, "rating": stars.astype(np.int64),
                            "timestamp": 880000000 + np.arange(len(users), dtype=np.int64)})
    ids = np.arange(1, num_movies + 1)
    titled = pd.DataFrame({"title": [f"Synthetic Movie {m} (199{(m - 1) % 10})" for m in ids],
                           "genres": [(GENRES[(m - 1) % len(GENRES)],) for m in ids]},
                          index=pd.Index(ids, name="item_id"))
    people = np.arange(num_users)
    users_table = pd.DataFrame({"age": 20 + people % 40, "gender": np.array(["M", "F"])[people % 2],
                                "occupation": "other", "zip_code": 10000 + people},
                               index=pd.Index(people + 1, name="user_id"))
    data = MovieLens(ratings=ratings, movies=titled, users=users_table, source=Path("synthetic"))  # no folder
    check_consistency(data, ("ratings", "users", "movies"))
    return data


def load(num_users: int, num_movies: int, rank: int, density: float, seed: int) -> MovieLens:
    """Generate a dataset as `conf/data/synthetic.yaml` describes it."""
    require(isinstance(num_users, int) and num_users >= 2, "data.num_users", num_users, "an integer >= 2")
    require(isinstance(num_movies, int) and num_movies >= 2, "data.num_movies", num_movies, "an integer >= 2")
    require(isinstance(rank, int) and 1 <= rank <= min(num_users, num_movies), "data.rank", rank,
            "an integer between 1 and min(data.num_users, data.num_movies)")
    require(0 < density <= 1, "data.density", density, "in (0, 1]")
    expected = density * num_users * num_movies
    require(expected <= MOST_RATINGS, "data.density", density,
            f"at most {MOST_RATINGS:,} ratings in all ({expected:,.0f} asked: {num_users:,} users x {num_movies:,} "
            f"movies x density); each takes ~100 bytes to generate and factorise")
    log.info("Synthetic MovieLens-format data: %d users, %d movies, taste rank %d, %.2g%% rated",
             num_users, num_movies, rank, 100 * density)
    return as_movielens(*planted_ratings(num_users, num_movies, rank, density, seed), num_users, num_movies)
