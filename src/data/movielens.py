"""MovieLens 100K: download on first use, verify, parse.

F. Maxwell Harper and Joseph A. Konstan. 2015. The MovieLens Datasets: History and
Context. ACM TiiS 5, 4. The licence forbids redistribution, so the files are fetched
from GroupLens (or read from a local copy) and never shipped with this project.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pooch
import requests
from scipy import sparse

from src.errors import UserError, one_line, require
from src.paths import resolve

log = logging.getLogger(__name__)
pooch.get_logger().setLevel(logging.WARNING)  # our own lines say what is downloaded, and where

GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western",
)


@dataclass(frozen=True)
class MovieLens:
    """The parsed dataset. Ids are MovieLens' own (1-based)."""

    ratings: pd.DataFrame  # user_id, item_id, rating, timestamp
    movies: pd.DataFrame  # indexed by item_id: title, genres (tuple of names)
    users: pd.DataFrame  # indexed by user_id: age, gender, occupation, zip_code
    source: Path

    @property
    def num_users(self) -> int:
        return int(self.users.index.max())

    @property
    def num_movies(self) -> int:
        return int(self.movies.index.max())

    def ratings_matrix(self) -> sparse.csr_array:
        """[num_users, num_movies] float64, sparse: MovieLens 25M's would take 80 GB dense. An
        absent entry is a movie the user has not rated."""
        return sparse.csr_array(
            (self.ratings.rating.to_numpy(np.float64),
             (self.ratings.user_id.to_numpy() - 1, self.ratings.item_id.to_numpy() - 1)),
            shape=(self.num_users, self.num_movies))


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(directory: Path, checksums: dict[str, str]) -> None:
    """Raise a `UserError` unless every expected file is present with its sha256."""
    for name, expected in checksums.items():
        path = directory / name
        if not path.is_file():
            raise UserError(f"MovieLens file {path} is missing")
        if sha256(path) != expected:
            raise UserError(
                f"MovieLens file {path} is corrupt or not the MovieLens 100K release "
                f"(sha256 mismatch); replace it with a fresh copy of ml-100k"
            )


def download(url: str, cache_dir: Path, checksums: dict[str, str]) -> Path:
    """Fetch and unpack `ml-100k.zip` into `cache_dir`, verified; return the data directory."""
    target = cache_dir / "ml-100k"
    cache_dir.mkdir(parents=True, exist_ok=True)
    log.info("Downloading MovieLens 100K from %s (first use only)", url)
    with tempfile.TemporaryDirectory(dir=cache_dir) as scratch:
        try:
            # GroupLens publishes no hash of the archive, only of its files: those are checked
            # below, as they are for a local copy.
            pooch.retrieve(url, known_hash=None, fname="ml-100k.zip", path=scratch,
                           processor=pooch.Unzip(extract_dir="."),
                           downloader=pooch.HTTPDownloader(progressbar=sys.stderr.isatty(), timeout=30))
        except (requests.RequestException, OSError) as error:
            # requests wraps urllib3's retries around the cause (refused, timed out, not found).
            reason = getattr(error.args[0], "reason", error) if error.args else error
            raise UserError(
                f"could not download MovieLens 100K from {url} ({one_line(reason)}). Offline? Put the "
                f"unpacked ml-100k files (u.data, u.item, u.user) in {target} or pass "
                f"data.dir=/path/to/ml-100k"
            ) from None
        except zipfile.BadZipFile:
            raise UserError(f"the download from {url} is not a valid zip archive") from None
        unpacked = Path(scratch) / "ml-100k"
        verify(unpacked, checksums)
        if target.exists():
            shutil.rmtree(target)
        shutil.move(unpacked, target)
    log.info("MovieLens 100K verified and unpacked into %s", target)
    return target


def locate(directory: str | None, url: str, cache_dir: str, checksums: dict[str, str]) -> Path:
    """The verified data directory: `directory` when given, else the cache, else a download."""
    if directory is not None:
        if not str(directory).strip():
            raise UserError("data.dir is empty: give the folder holding ml-100k's files, or null to download them")
        path = resolve(directory)
        if not path.is_dir():
            raise UserError(f"data.dir={directory} is not a directory")
        verify(path, checksums)
        return path
    cached = resolve(cache_dir) / "ml-100k"
    if cached.is_dir():
        verify(cached, checksums)
        return cached
    return download(url, resolve(cache_dir), checksums)


def _read(path: Path, **kwargs) -> pd.DataFrame:
    try:
        return pd.read_csv(path, header=None, encoding="latin-1", **kwargs)
    except (ValueError, pd.errors.ParserError) as error:
        raise UserError(f"cannot parse MovieLens file {path}: {error}") from None


def parse(directory: Path) -> MovieLens:
    """Read `u.data`, `u.item` and `u.user` from a verified directory."""
    ratings = _read(
        directory / "u.data", sep="\t",
        names=["user_id", "item_id", "rating", "timestamp"], dtype="int64",
    )
    movies = _read(
        directory / "u.item", sep="|",
        names=["item_id", "title", "release_date", "video_release_date", "imdb_url", *GENRES],
    )
    users = _read(
        directory / "u.user", sep="|",
        names=["user_id", "age", "gender", "occupation", "zip_code"],
    )
    genre_flags = movies[list(GENRES)].to_numpy(dtype=bool)
    movies = movies.assign(
        genres=[tuple(g for g, on in zip(GENRES, row) if on) for row in genre_flags]
    )[["item_id", "title", "genres"]].set_index("item_id")
    users = users.set_index("user_id")
    data = MovieLens(ratings=ratings, movies=movies, users=users, source=directory)
    check_consistency(data, ("u.data", "u.user", "u.item"))
    return data


def check_consistency(data: MovieLens, files: tuple[str, str, str], scale: tuple[float, float] = (1, 5)) -> None:
    """Ratings there are, on the release's `scale` of stars, by users and of movies the release
    lists; `files`: its (ratings, users, movies) file names, for the messages."""
    ratings_file, users_file, movies_file = files
    ratings = data.ratings
    if ratings.empty:
        raise UserError(f"{data.source}/{ratings_file} holds no ratings")
    if not ratings.rating.between(*scale).all():
        raise UserError(f"{data.source}/{ratings_file} has ratings outside {scale[0]:g}..{scale[1]:g}")
    unknown_users = set(ratings.user_id) - set(data.users.index)
    unknown_movies = set(ratings.item_id) - set(data.movies.index)
    if unknown_users or unknown_movies:
        raise UserError(
            f"{data.source}/{ratings_file} rates {len(unknown_users)} users and {len(unknown_movies)} "
            f"movies that {users_file}/{movies_file} do not list"
        )


def renumbered(data: MovieLens) -> MovieLens:
    """Users and movies that have ratings, numbered 1..n in id order (the environments' rows and
    columns), each keeping its id in an `id` column."""
    user_ids, item_ids = np.unique(data.ratings.user_id), np.unique(data.ratings.item_id)
    ratings = data.ratings.assign(user_id=np.searchsorted(user_ids, data.ratings.user_id) + 1,
                                  item_id=np.searchsorted(item_ids, data.ratings.item_id) + 1)

    def numbered(table: pd.DataFrame, ids: np.ndarray, name: str) -> pd.DataFrame:
        kept = table.loc[ids]
        return kept.reset_index(drop=True).assign(id=ids).set_axis(pd.RangeIndex(1, len(ids) + 1, name=name))

    return MovieLens(ratings=ratings, movies=numbered(data.movies, item_ids, "item_id"),
                     users=numbered(data.users, user_ids, "user_id"), source=data.source)


def load(dir: str | None, cache_dir: str, url: str, sha256: dict[str, str]) -> MovieLens:
    """Locate, verify and parse MovieLens 100K as `conf/data/movielens.yaml` describes it."""
    require(isinstance(sha256, dict) and len(sha256) > 0, "data.sha256", sha256,
            "a mapping from each MovieLens file to its sha256")
    directory = locate(dir, url, cache_dir, sha256)
    log.info("Reading MovieLens 100K from %s", directory)
    return parse(directory)
