"""Synthetic data in MovieLens 100K's file formats, with a planted low-rank taste structure.

`data=synthetic` lets anyone try every command without the real files (whose licence forbids
shipping them); the tests and benchmarks use the same generator. The files go through the
same parser as the real ones, so they are held to the same rules.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from pathlib import Path

import numpy as np

from src.data.movielens import GENRES, MovieLens, parse
from src.errors import require

log = logging.getLogger(__name__)

FILES = ("u.data", "u.item", "u.user")


def planted_ratings(num_users: int, num_movies: int, rank: int, density: float, seed: int):
    """(users, movies, ratings) of the rated pairs: 0-based indices and 1-5 stars from a rank-`rank`
    taste structure, every user rating the first movie."""
    rng = np.random.default_rng(seed)
    taste = rng.normal(size=(num_users, rank))
    appeal = rng.normal(size=(num_movies, rank))
    scores = taste @ appeal.T
    ratings = np.clip(np.round(3 + 1.2 * scores / scores.std()), 1, 5).astype(int)
    rated = rng.random((num_users, num_movies)) < density
    rated[:, 0] = True  # everyone rates something among the first movies
    users, movies = np.nonzero(rated)
    return users, movies, ratings[users, movies]


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


def write_movielens_1m(directory: Path, num_users: int = 60, num_movies: int = 30, rank: int = 3,
                       density: float = 0.6, seed: int = 0) -> None:
    """The same planted ratings in MovieLens 1M's layout (ratings.dat, movies.dat, users.dat,
    '::'-separated, Latin-1 titles with colons and accents, genres joined by '|')."""
    users, movies, stars = planted_ratings(num_users, num_movies, rank, density, seed)
    directory.mkdir(parents=True, exist_ok=True)
    lines = [f"{u + 1}::{m + 1}::{r}::{978300000 + i}" for i, (u, m, r) in enumerate(zip(users, movies, stars))]
    (directory / "ratings.dat").write_text("\n".join(lines) + "\n")
    titles = [f"Synthétique: Movie {m + 1} (199{m % 10})::{GENRES[m % len(GENRES)]}|Drama" for m in range(num_movies)]
    (directory / "movies.dat").write_bytes(("\n".join(f"{m + 1}::{t}" for m, t in enumerate(titles)) + "\n")
                                           .encode("latin-1"))
    people = [f"{u + 1}::{'MF'[u % 2]}::{18 + u % 40}::{u % 21}::{10000 + u}" for u in range(num_users)]
    (directory / "users.dat").write_text("\n".join(people) + "\n")


def checksum_override(checksums: dict[str, str]) -> str:
    """The command-line override that makes `data=movielens` accept files with these sha256."""
    return "data.sha256={" + ",".join(f"{k}:{v}" for k, v in checksums.items()) + "}"


def load(num_users: int, num_movies: int, rank: int, density: float, seed: int) -> MovieLens:
    """Generate and parse a dataset as `conf/data/synthetic.yaml` describes it."""
    require(isinstance(num_users, int) and num_users >= 2, "data.num_users", num_users, "an integer >= 2")
    require(isinstance(num_movies, int) and num_movies >= 2, "data.num_movies", num_movies, "an integer >= 2")
    require(isinstance(rank, int) and 1 <= rank <= min(num_users, num_movies), "data.rank", rank,
            "an integer between 1 and min(data.num_users, data.num_movies)")
    require(0 < density <= 1, "data.density", density, "in (0, 1]")
    log.info("Synthetic MovieLens-format data: %d users, %d movies, taste rank %d, %.0f%% rated",
             num_users, num_movies, rank, 100 * density)
    with tempfile.TemporaryDirectory() as scratch:
        write_movielens(Path(scratch), num_users, num_movies, rank, density, seed)
        return parse(Path(scratch))
