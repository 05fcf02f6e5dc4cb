"""MovieLens 1M: 1,000,209 ratings of 3,706 movies by 6,040 users (GroupLens, 2003).

Its layout (the archive's README): `ratings.dat` (UserID::MovieID::Rating::Timestamp),
`movies.dat` (MovieID::Title::Genres, genres joined by `|`, Latin-1 titles) and `users.dat`
(UserID::Gender::Age::Occupation::Zip-code). GroupLens publishes the archive's MD5
(`ml-1m.zip.md5` beside it), not its files', so a download is verified as a whole and a local
copy (`data.dir`) by its layout only. Movie ids run to 3,952 with gaps: a movie nobody rated is
an empty column of the ratings matrix, which the environments' movie selection never picks
first by count.
"""

from __future__ import annotations

import logging
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

import pandas as pd
import pooch
import requests

from src.data.movielens import MovieLens, check_consistency
from src.errors import UserError, one_line, require
from src.paths import resolve

log = logging.getLogger(__name__)

FILES = ("ratings.dat", "movies.dat", "users.dat")
FOLDER = "ml-1m"
SEPARATOR = "::"
# What other MovieLens releases hold instead, to say which one a folder is.
OTHER_LAYOUTS = {"u.data": "MovieLens 100K (data=movielens)",
                 "ratings.csv": "MovieLens 20M or later, or latest (CSV with a header)"}


def check_layout(directory: Path) -> None:
    """Refuse a folder that is not ml-1m's, naming what it is and what is expected."""
    if all((directory / name).is_file() for name in FILES):
        return
    expected = f"data=movielens_1m expects ml-1m's {', '.join(FILES)} ('{SEPARATOR}'-separated)"
    for name, release in OTHER_LAYOUTS.items():
        if (directory / name).is_file():
            raise UserError(f"data.dir={directory} holds {name}, the layout of {release}; {expected}")
    missing = [name for name in FILES if not (directory / name).is_file()]
    raise UserError(f"data.dir={directory} lacks {', '.join(missing)}: {expected}")


def download(url: str, cache_dir: Path, md5: str) -> Path:
    """Fetch `ml-1m.zip`, check its MD5, unpack it into `cache_dir`; return the data folder.
    Unpacked in a scratch folder and moved whole: a failed read caches nothing."""
    target = cache_dir / FOLDER
    cache_dir.mkdir(parents=True, exist_ok=True)
    log.info("Downloading MovieLens 1M from %s (first use only)", url)
    with tempfile.TemporaryDirectory(dir=cache_dir) as scratch:
        try:
            pooch.retrieve(url, known_hash=f"md5:{md5}", fname="ml-1m.zip", path=scratch,
                           processor=pooch.Unzip(extract_dir="."),
                           downloader=pooch.HTTPDownloader(progressbar=sys.stderr.isatty(), timeout=30))
        except ValueError as error:  # pooch's hash mismatch
            raise UserError(f"the download from {url} is not the MovieLens 1M release: {one_line(error)}") from None
        except (requests.RequestException, OSError) as error:
            reason = getattr(error.args[0], "reason", error) if error.args else error
            raise UserError(f"could not download MovieLens 1M from {url} ({one_line(reason)}). Offline? Put the "
                            f"unpacked ml-1m files ({', '.join(FILES)}) in {target} or pass "
                            f"data.dir=/path/to/ml-1m") from None
        except zipfile.BadZipFile:
            raise UserError(f"the download from {url} is not a valid zip archive") from None
        unpacked = Path(scratch) / FOLDER
        check_layout(unpacked)
        if target.exists():
            shutil.rmtree(target)
        shutil.move(unpacked, target)
    log.info("MovieLens 1M verified and unpacked into %s", target)
    return target


def _read(path: Path, names: list[str]) -> pd.DataFrame:
    try:
        # Titles hold single colons ("Star Wars: Episode IV"), so the separator is the whole "::".
        frame = pd.read_csv(path, sep=SEPARATOR, engine="python", header=None, names=names, encoding="latin-1")
    except (ValueError, pd.errors.ParserError) as error:
        raise UserError(f"cannot parse MovieLens 1M file {path}: {one_line(error)}") from None
    if frame.empty or frame.iloc[:, -1].isna().any():
        raise UserError(f"{path} is not in MovieLens 1M's layout: each line {SEPARATOR.join(names)}")
    return frame


def _ratings(path: Path) -> pd.DataFrame:
    """ratings.dat in one pass of the C parser: split on ':' the empty fields between each '::' fall out."""
    try:
        frame = pd.read_csv(path, sep=":", header=None, usecols=[0, 2, 4, 6], dtype="int64")
    except (ValueError, pd.errors.ParserError):
        raise UserError(f"{path} is not in MovieLens 1M's layout: each line "
                        f"UserID{SEPARATOR}MovieID{SEPARATOR}Rating{SEPARATOR}Timestamp, whole numbers") from None
    frame.columns = ["user_id", "item_id", "rating", "timestamp"]
    return frame


def parse(directory: Path) -> MovieLens:
    check_layout(directory)
    ratings = _ratings(directory / "ratings.dat")
    movies = _read(directory / "movies.dat", ["item_id", "title", "genres"])
    movies = movies.assign(genres=[tuple(genres.split("|")) for genres in movies.genres]).set_index("item_id")
    users = _read(directory / "users.dat", ["user_id", "gender", "age", "occupation", "zip_code"]).set_index("user_id")
    data = MovieLens(ratings=ratings, movies=movies[["title", "genres"]], users=users, source=directory)
    check_consistency(data, ("ratings.dat", "users.dat", "movies.dat"))
    return data


def load(dir: str | None, cache_dir: str, url: str, md5: str) -> MovieLens:
    """Locate (a local folder, the cache, else a download) and parse MovieLens 1M as
    `conf/data/movielens_1m.yaml` describes it."""
    require(isinstance(md5, str) and len(md5) == 32, "data.md5", md5, "the archive's 32-digit MD5")
    if dir is not None:
        if not str(dir).strip():
            raise UserError("data.dir is empty: give the folder holding ml-1m's files, or null to download them")
        directory = resolve(dir)
        if not directory.is_dir():
            raise UserError(f"data.dir={dir} is not a directory")
    else:
        cached = resolve(cache_dir) / FOLDER
        directory = cached if cached.is_dir() else download(url, resolve(cache_dir), md5)
    log.info("Reading MovieLens 1M from %s", directory)
    return parse(directory)
