"""Any ratings file (data=ratings_file): a CSV or Parquet table with a row per rating, its columns
named in the config, as the project's tables.

Users and items are renumbered 1..n in the order of their ids (ids may be sparse, or text), as
the environments take them for rows and columns of the ratings matrix; each keeps its own id
(`users.id`, `movies.id`), and an item is titled by the title column if there is one, else by its
id. A user rating an item twice is refused, or resolved by `duplicates` (`last`: the latest row,
by timestamp where there is one; `mean`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from src.data.movielens import MovieLens, renumbered
from src.errors import UserError, one_line, require
from src.paths import resolve

log = logging.getLogger(__name__)

FORMATS = {".csv": pd.read_csv, ".parquet": pd.read_parquet}
DUPLICATES = ("refuse", "last", "mean")
ROLES = ("user", "item", "rating", "timestamp", "title")
REQUIRED = ("user", "item", "rating")


def read(path: Path) -> pd.DataFrame:
    try:
        return FORMATS[path.suffix.lower()](path)
    except pd.errors.EmptyDataError:
        raise UserError(f"data.path={path} is empty") from None
    except (ValueError, OSError, pd.errors.ParserError) as error:
        raise UserError(f"cannot read data.path={path} as {path.suffix.lstrip('.').upper()}: {one_line(error)}") from None


def select(table: pd.DataFrame, columns: dict, path: Path) -> pd.DataFrame:
    """The table's columns by role, checked: present, ratings numbers."""
    unknown = sorted(set(columns) - set(ROLES))
    require(not unknown, f"data.columns.{unknown[0] if unknown else ''}", columns, f"roles among {', '.join(ROLES)}")
    for role in REQUIRED:
        require(columns.get(role) is not None, f"data.columns.{role}", columns.get(role), "a column name")
    chosen = {role: name for role, name in columns.items() if name is not None}
    for role, name in chosen.items():
        if name not in table:
            raise UserError(f"data.path={path} has no column {name!r} (data.columns.{role}); its columns: "
                            f"{', '.join(map(str, table.columns))}")
    if table.empty:
        raise UserError(f"data.path={path} holds no ratings")
    frame = table[list(chosen.values())].set_axis(list(chosen), axis=1)
    ratings = pd.to_numeric(frame.rating, errors="coerce")
    bad = np.flatnonzero(ratings.isna().to_numpy() | ~np.isfinite(ratings.to_numpy(dtype=float, na_value=np.nan)))
    if len(bad):
        raise UserError(f"data.path={path} has a rating that is not a finite number, {frame.rating.iloc[bad[0]]!r}, "
                        f"in row {bad[0] + 1} (column {chosen['rating']!r})")
    if frame.user.isna().any() or frame.item.isna().any():
        raise UserError(f"data.path={path} has rows without a user or an item")
    return frame.assign(rating=ratings.astype(float))


def resolve_duplicates(frame: pd.DataFrame, policy: str, path: Path) -> pd.DataFrame:
    pair = ["user", "item"]
    repeated = frame.duplicated(pair, keep=False)
    if not repeated.any():
        return frame
    if policy == "refuse":
        user, item = frame.loc[repeated, pair].iloc[0]
        raise UserError(f"data.path={path} rates {int(frame.duplicated(pair).sum())} (user, item) pairs more than once, "
                        f"e.g. user {user} item {item}; set data.duplicates=last or mean")
    if policy == "last":
        ordered = frame.sort_values("timestamp", kind="stable") if "timestamp" in frame else frame
        return ordered.drop_duplicates(pair, keep="last")
    mean = frame.groupby(pair, sort=False, as_index=False).rating.mean()
    rest = frame.drop(columns="rating").drop_duplicates(pair, keep="last")
    return rest.merge(mean, on=pair)


def load(path: str | None, columns: dict, duplicates: str) -> MovieLens:
    """Read, check and renumber the ratings file as `conf/data/ratings_file.yaml` describes it."""
    require(path is not None and str(path).strip() != "", "data.path", path, "a CSV or Parquet file of ratings")
    file = resolve(path)
    require(file.suffix.lower() in FORMATS, "data.path", path, f"a file ending in {' or '.join(FORMATS)}")
    if not file.is_file():
        raise UserError(f"data.path={path} is not a file")
    require(duplicates in DUPLICATES, "data.duplicates", duplicates, f"one of {', '.join(DUPLICATES)}")
    frame = resolve_duplicates(select(read(file), dict(columns), file), duplicates, file)
    log.info("Ratings from %s: %d ratings, %d users, %d items", file, len(frame), frame.user.nunique(),
             frame.item.nunique())
    items = frame.drop_duplicates("item").set_index("item")
    titles = items.title if "title" in frame else [f"item {item}" for item in items.index]
    return renumbered(MovieLens(
        ratings=pd.DataFrame({"user_id": frame.user.to_numpy(), "item_id": frame.item.to_numpy(),
                              "rating": frame.rating.to_numpy(),
                              "timestamp": frame.timestamp.to_numpy() if "timestamp" in frame else 0}),
        movies=pd.DataFrame({"title": titles, "genres": [()] * len(items)}, index=items.index),
        users=pd.DataFrame(index=pd.Index(frame.user.unique())), source=file))
