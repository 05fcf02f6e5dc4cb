"""The MovieLens releases after 100K: 1M, 10M, 20M, 25M, 32M and latest-small (GroupLens).

Two layouts. 1M and 10M: `ratings.dat` (UserID::MovieID::Rating::Timestamp) and `movies.dat`
(MovieID::Title::Genres, genres joined by `|`), '::'-separated; 1M adds `users.dat` and writes
titles in Latin-1, 10M rates in half stars. 20M on: CSV with a header, `ratings.csv`
(userId,movieId,rating,timestamp, half stars) and `movies.csv` (movieId,title,genres; UTF-8,
titles quoted where they hold commas). Users and movies are renumbered 1..n in id order among
those rated, each keeping its MovieLens id (`users.id`, `movies.id`): the later releases' ids
have gaps, which would be empty columns of the ratings matrix.

A download is checked against the archive's checksum (GroupLens' published MD5, pinned in each
`conf/data/movielens_*.yaml`, or with `checksum: published` the MD5 file beside the archive) and
unpacked whole from a scratch folder, so a failed read caches nothing; a local copy
(`data.dir`) is checked by its layout, and its rating count against the release's.
"""

from __future__ import annotations

import logging
import re
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

from src.data.movielens import MovieLens, check_consistency, renumbered
from src.errors import UserError, one_line, require
from src.paths import resolve

log = logging.getLogger(__name__)

SEPARATOR = "::"
CSV_RATINGS = ("userId", "movieId", "rating", "timestamp")
NO_GENRES = "(no genres listed)"
# A checksum of "published": the MD5 file GroupLens puts beside the archive, fetched at download.
PUBLISHED = "published"


@dataclass(frozen=True)
class Release:
    title: str
    folder: str  # what the archive unpacks into
    layout: str  # "dat" or "csv"
    ratings: int  # in the published release
    half_stars: bool
    with_users: bool = False

    @property
    def files(self) -> tuple[str, ...]:
        if self.layout == "csv":
            return "ratings.csv", "movies.csv"
        return ("ratings.dat", "movies.dat", "users.dat") if self.with_users else ("ratings.dat", "movies.dat")

    @property
    def scale(self) -> tuple[float, float]:
        return (0.5, 5.0) if self.half_stars else (1.0, 5.0)


RELEASES = {
    "1m": Release("MovieLens 1M", "ml-1m", "dat", 1_000_209, half_stars=False, with_users=True),
    "10m": Release("MovieLens 10M", "ml-10M100K", "dat", 10_000_054, half_stars=True),
    "20m": Release("MovieLens 20M", "ml-20m", "csv", 20_000_263, half_stars=True),
    "25m": Release("MovieLens 25M", "ml-25m", "csv", 25_000_095, half_stars=True),
    "32m": Release("MovieLens 32M", "ml-32m", "csv", 32_000_204, half_stars=True),
    "latest_small": Release("MovieLens latest-small", "ml-latest-small", "csv", 100_836, half_stars=True),
}
# What a folder holding these files is, to name a layout given to the wrong `data=` choice.
LAYOUTS = (({"u.data"}, "MovieLens 100K (data=movielens)"),
           ({"ratings.dat", "users.dat"}, "MovieLens 1M (data=movielens_1m)"),
           ({"ratings.dat"}, "MovieLens 10M (data=movielens_10m)"),
           ({"ratings.csv"}, "MovieLens 20M or later (data=movielens_20m, _25m, _32m, _latest_small)"))


def check_layout(directory: Path, release: Release, choice: str) -> None:
    """Refuse a folder that is not the release's, naming what it is and what is expected."""
    expected = f"data={choice} expects {release.folder}'s {', '.join(release.files)}"
    present = {path.name for path in directory.iterdir()} if directory.is_dir() else set()
    if set(release.files) <= present:
        if release.layout == "dat" and not release.with_users and "users.dat" in present:  # 1M has 10M's files too
            raise UserError(f"data.dir={directory} holds users.dat, the layout of MovieLens 1M (data=movielens_1m); "
                            f"{expected}")
        return
    for files, other in LAYOUTS:
        if files <= present:
            raise UserError(f"data.dir={directory} holds {', '.join(sorted(files))}, the layout of {other}; {expected}")
    missing = [name for name in release.files if name not in present]
    raise UserError(f"data.dir={directory} lacks {', '.join(missing)}: {expected}")


def published_md5(url: str) -> str:
    """The MD5 GroupLens publishes beside an archive, `<url>.md5`, in either tool's form: BSD's
    "MD5 (name) = <hex>" or md5sum's "<hex>  name"."""
    try:
        response = requests.get(f"{url}.md5", timeout=30)
        response.raise_for_status()
    except requests.RequestException as error:
        raise UserError(f"could not fetch the published checksum {url}.md5 ({one_line(error)}); pass "
                        f"data.dir=/path/to/the/unpacked/release instead") from None
    digest = re.search(r"\b[0-9a-fA-F]{32}\b", response.text)
    if digest is None:
        raise UserError(f"{url}.md5 does not hold an MD5: {one_line(response.text[:80])}")
    return f"md5:{digest.group().lower()}"


def download(release: Release, choice: str, url: str, cache_dir: Path, checksum: str) -> Path:
    """Fetch the archive, check it, unpack it into `cache_dir`; return the data folder."""
    target = cache_dir / release.folder
    cache_dir.mkdir(parents=True, exist_ok=True)
    known = published_md5(url) if checksum == PUBLISHED else checksum
    log.info("Downloading %s from %s (first use only), checked against %s", release.title, url, known)
    with tempfile.TemporaryDirectory(dir=cache_dir) as scratch:
        try:
            pooch.retrieve(url, known_hash=known, fname=Path(url).name, path=scratch,
                           processor=pooch.Unzip(extract_dir="."),
                           downloader=pooch.HTTPDownloader(progressbar=sys.stderr.isatty(), timeout=30))
        except ValueError as error:  # pooch's hash mismatch
            raise UserError(f"the download from {url} is not the {release.title} release: {one_line(error)}") from None
        except (requests.RequestException, OSError) as error:
            # requests wraps urllib3's retries around the cause (refused, timed out, not found).
            reason = getattr(error.args[0], "reason", error) if error.args else error
            raise UserError(f"could not download {release.title} from {url} ({one_line(reason)}). Offline? Put the "
                            f"unpacked {release.folder} files ({', '.join(release.files)}) in {target} or pass "
                            f"data.dir=/path/to/{release.folder}") from None
        except zipfile.BadZipFile:
            raise UserError(f"the download from {url} is not a valid zip archive") from None
        unpacked = Path(scratch) / release.folder
        check_layout(unpacked, release, choice)
        if target.exists():
            shutil.rmtree(target)
        shutil.move(unpacked, target)
    log.info("%s verified and unpacked into %s", release.title, target)
    return target


def read_dat(path: Path, names: list[str], release: Release) -> pd.DataFrame:
    """A small '::'-separated file (movies, users). Titles hold single colons ("Star Wars: Episode
    IV"), so the separator is the whole '::'; 1M's titles are Latin-1, later ones UTF-8."""
    for encoding in ("utf-8", "latin-1"):
        try:
            frame = pd.read_csv(path, sep=SEPARATOR, engine="python", header=None, names=names, encoding=encoding)
            break
        except UnicodeDecodeError:
            continue
        except (ValueError, pd.errors.ParserError) as error:
            raise UserError(f"cannot parse {release.title} file {path}: {one_line(error)}") from None
    if frame.empty or frame.iloc[:, -1].isna().any():
        raise UserError(f"{path} is not in {release.title}'s layout: each line {SEPARATOR.join(names)}")
    return frame


def read_dat_ratings(path: Path, release: Release) -> pd.DataFrame:
    """ratings.dat in one pass of the C parser: split on ':' the empty fields between each '::' fall out."""
    try:
        frame = pd.read_csv(path, sep=":", header=None, usecols=[0, 2, 4, 6],
                            dtype={0: "int64", 2: "int64", 4: "float64", 6: "int64"})
    except (ValueError, pd.errors.ParserError):
        raise UserError(f"{path} is not in {release.title}'s layout: each line "
                        f"UserID{SEPARATOR}MovieID{SEPARATOR}Rating{SEPARATOR}Timestamp, numbers") from None
    return frame.set_axis(["user_id", "item_id", "rating", "timestamp"], axis=1)


def read_csv_ratings(path: Path, release: Release) -> pd.DataFrame:
    layout = f"{release.title}'s layout: a header {','.join(CSV_RATINGS)}, then numbers"
    try:
        frame = pd.read_csv(path, dtype={"userId": "int64", "movieId": "int64", "rating": "float64",
                                         "timestamp": "int64"})
    except pd.errors.EmptyDataError:
        raise UserError(f"{path} is empty: {layout}") from None
    except (ValueError, pd.errors.ParserError):
        raise UserError(f"{path} is not in {layout}") from None
    if list(frame.columns) != list(CSV_RATINGS):
        raise UserError(f"{path} has columns {','.join(map(str, frame.columns))}, not {layout}")
    return frame.set_axis(["user_id", "item_id", "rating", "timestamp"], axis=1)


def read_csv_movies(path: Path, release: Release) -> pd.DataFrame:
    try:
        frame = pd.read_csv(path, dtype={"movieId": "int64", "title": str, "genres": str}, keep_default_na=False)
    except (ValueError, pd.errors.ParserError) as error:
        raise UserError(f"cannot parse {release.title} file {path} (a header movieId,title,genres): "
                        f"{one_line(error)}") from None
    if list(frame.columns) != ["movieId", "title", "genres"]:
        raise UserError(f"{path} has columns {','.join(map(str, frame.columns))}, not {release.title}'s "
                        f"movieId,title,genres")
    return frame.rename(columns={"movieId": "item_id"})


def parse(directory: Path, release: Release, choice: str) -> MovieLens:
    check_layout(directory, release, choice)
    if release.layout == "csv":
        ratings = read_csv_ratings(directory / "ratings.csv", release)
        movies = read_csv_movies(directory / "movies.csv", release)
    else:
        ratings = read_dat_ratings(directory / "ratings.dat", release)
        movies = read_dat(directory / "movies.dat", ["item_id", "title", "genres"], release)
    movies = movies.assign(genres=[() if genres == NO_GENRES else tuple(genres.split("|")) for genres in movies.genres])
    if release.with_users:
        users = read_dat(directory / "users.dat", ["user_id", "gender", "age", "occupation", "zip_code"], release)
    else:
        users = pd.DataFrame({"user_id": np.unique(ratings.user_id)})
    data = MovieLens(ratings=ratings, movies=movies.set_index("item_id")[["title", "genres"]],
                     users=users.set_index("user_id"), source=directory)
    ratings_file, movies_file = release.files[:2]
    check_consistency(data, (ratings_file, release.files[2] if release.with_users else ratings_file, movies_file),
                      scale=release.scale)
    if len(ratings) != release.ratings:
        log.warning("%s holds %s ratings; the published %s has %s", directory / ratings_file, f"{len(ratings):,}",
                    release.title, f"{release.ratings:,}")
    return renumbered(data)


def load(release: str, dir: str | None, cache_dir: str, url: str, checksum: str) -> MovieLens:
    """Locate (a local folder, the cache, else a download) and parse a MovieLens release as
    `conf/data/movielens_<release>.yaml` describes it."""
    require(release in RELEASES, "data.release", release, f"one of {', '.join(RELEASES)}")
    chosen, name = RELEASES[release], f"movielens_{release}"
    require(isinstance(checksum, str) and (checksum == PUBLISHED or checksum.split(":")[0] in ("md5", "sha256")),
            "data.checksum", checksum, f"md5:<hex>, sha256:<hex> or {PUBLISHED} (the MD5 GroupLens publishes)")
    if dir is not None:
        if not str(dir).strip():
            raise UserError(f"data.dir is empty: give the folder holding {chosen.folder}'s files, or null to "
                            f"download them")
        directory = resolve(dir)
        if not directory.is_dir():
            raise UserError(f"data.dir={dir} is not a directory")
    else:
        cached = resolve(cache_dir) / chosen.folder
        directory = cached if cached.is_dir() else download(chosen, name, url, resolve(cache_dir), checksum)
    log.info("Reading %s from %s", chosen.title, directory)
    return parse(directory, chosen, name)
