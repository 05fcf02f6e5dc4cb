"""Any ratings file (data=ratings_file): CSV and Parquet with their own column names, renumbered
ids, duplicates by policy, a tracked run on it, and bad files refused in one line."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from src import config, data
from src.errors import UserError
from tests.conftest import SMALL


def ratings_table(users: int = 15, items: int = 12, seed: int = 0) -> pd.DataFrame:
    """Half-star ratings from rank-2 tastes, text user ids, sparse item ids, a title each."""
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(users, 2)) @ rng.normal(size=(2, items))
    rows = [(f"u{user:02d}", 7 * item + 3, np.clip(np.round(2 * (3 + scores[user, item])) / 2, 0.5, 5),
             1_500_000_000 + user * items + item, f"Film {item}")
            for user in range(users) for item in range(items) if item == 0 or rng.random() < 0.7]
    return pd.DataFrame(rows, columns=["who", "what", "stars", "when", "name"])


COLUMNS = "data.columns={user: who, item: what, rating: stars, timestamp: when, title: name}"


def compose(path, *overrides):
    return config.compose(["data=ratings_file", f"data.path={path}", COLUMNS, *overrides])


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_a_table_is_read_by_its_column_names_and_renumbered(tmp_path, suffix):
    table = ratings_table()
    path = tmp_path / f"ratings{suffix}"
    table.to_csv(path, index=False) if suffix == ".csv" else table.to_parquet(path, index=False)
    parsed = data.load(compose(path).data)
    assert parsed.num_users == 15 and parsed.num_movies == 12
    assert list(parsed.users.id[:2]) == ["u00", "u01"] and list(parsed.movies.id[:3]) == [3, 10, 17]
    assert parsed.movies.title.loc[2] == "Film 1"
    matrix = parsed.ratings_matrix()
    first = table.iloc[0]
    assert matrix[0, 0] == first.stars and (matrix > 0).sum() == len(table)


def test_a_quick_run_on_a_ratings_file_finishes(tmp_path):
    from src.training import train  # here: only this test needs the whole training stack

    path = tmp_path / "ratings.csv"
    ratings_table().to_csv(path, index=False)
    cfg = compose(path, f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "tracking.save_policy=false", *SMALL)
    final, _ = train(cfg)
    assert np.isfinite(final["train/cumulative_regret"])


def test_duplicates_are_refused_or_resolved_as_asked(tmp_path):
    table = ratings_table()
    again = table.iloc[[0]].assign(stars=1.0, when=table["when"].iloc[0] + 1)
    path = tmp_path / "ratings.csv"
    pd.concat([table, again]).to_csv(path, index=False)
    with pytest.raises(UserError, match=r"rates 1 \(user, item\) pairs more than once, e\.g\. user u00 item 3; "
                                        r"set data\.duplicates=last or mean"):
        data.load(compose(path).data)
    assert data.load(compose(path, "data.duplicates=last").data).ratings_matrix()[0, 0] == 1.0
    assert data.load(compose(path, "data.duplicates=mean").data).ratings_matrix()[0, 0] == (table.stars[0] + 1) / 2


@pytest.mark.parametrize("content, overrides, message", [
    ("who,what,stars\nu1,3,4\n", ["data.columns.timestamp=null", "data.columns.title=null",
                                   "data.columns.item=movieId"],
     "has no column 'movieId' (data.columns.item); its columns: who, what, stars"),
    ("who,what,stars,when,name\nu1,3,great,1,A\n", [], "has a rating that is not a finite number, 'great', in row 1"),
    ("", [], "is empty"),
    ("who,what,stars,when,name\n", [], "holds no ratings"),
])
def test_bad_files_are_refused_in_one_line(tmp_path, content, overrides, message):
    path = tmp_path / "ratings.csv"
    path.write_text(content)
    with pytest.raises(UserError) as refused:
        data.load(compose(path, *overrides).data)
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_a_wrong_suffix_is_refused(tmp_path):
    with pytest.raises(UserError, match=r"data.path must be a file ending in \.csv or \.parquet"):
        data.load(compose(tmp_path / "ratings.json").data)
