"""MovieLens 1M (data=movielens_1m) on small files written in its layout: parsed, trained on,
downloaded and checked by the archive's MD5, and other layouts refused in one line."""

from __future__ import annotations

import hashlib

import mlflow
import pytest

from src import config, data
from src.data import movielens_1m
from src.data.synthetic import write_movielens, write_movielens_1m
from src.errors import UserError
from tests.conftest import SMALL
from tests.test_data import serve_bytes, zip_directory  # noqa: F401  (serve_bytes: a fixture)


@pytest.fixture
def ml_1m(tmp_path):
    directory = tmp_path / "ml-1m"
    write_movielens_1m(directory)
    return directory


def test_the_layout_is_read_with_latin_1_titles_and_genres(ml_1m):
    parsed = movielens_1m.parse(ml_1m)
    assert parsed.num_users == 60 and parsed.num_movies == 30
    assert parsed.movies.loc[1, "title"] == "Synthétique: Movie 1 (1990)"  # a colon in the title, an accent
    assert parsed.movies.loc[1, "genres"] == ("unknown", "Drama")
    assert list(parsed.ratings.columns) == ["user_id", "item_id", "rating", "timestamp"]
    # The same planted ratings as the 100K layout's.
    hundred_k = ml_1m.parent / "ml-100k"
    write_movielens(hundred_k)
    assert (data.movielens.parse(hundred_k).ratings_matrix() != parsed.ratings_matrix()).nnz == 0


def test_a_quick_linucb_run_on_movielens_1m_finishes(ml_1m, tmp_path):
    from src.training import train  # here: only this test needs the whole training stack

    cfg = config.compose(["data=movielens_1m", f"data.dir={ml_1m}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
                          "tracking.save_policy=false", *SMALL, "agent=linucb"])
    final, run_id = train(cfg)
    assert final["train/cumulative_regret"] > 0
    run = mlflow.MlflowClient(cfg.tracking.uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["data.name"] == "movielens_1m"


def test_the_download_is_checked_by_its_md5_and_a_failed_one_caches_nothing(ml_1m, tmp_path, serve_bytes):
    archive = zip_directory(ml_1m, "ml-1m")
    url = serve_bytes(archive)
    cache = tmp_path / "cache"
    with pytest.raises(UserError, match="is not the MovieLens 1M release"):
        movielens_1m.load(None, str(cache), url, "0" * 32)
    assert not (cache / "ml-1m").exists()
    loaded = movielens_1m.load(None, str(cache), url, hashlib.md5(archive).hexdigest())
    assert loaded.num_users == 60 and (cache / "ml-1m" / "ratings.dat").is_file()


@pytest.mark.parametrize("make, message", [
    (lambda folder: write_movielens(folder), "holds u.data, the layout of MovieLens 100K (data=movielens); "
                                             "data=movielens_1m expects ml-1m's ratings.dat, movies.dat, users.dat"),
    (lambda folder: (folder.mkdir(), (folder / "ratings.csv").write_text("userId,movieId,rating,timestamp\n")),
     "holds ratings.csv, the layout of MovieLens 20M or later"),
    (lambda folder: (write_movielens_1m(folder), (folder / "users.dat").unlink()), "lacks users.dat"),
    (lambda folder: (write_movielens_1m(folder), (folder / "ratings.dat").write_text("1,2,5,978300760\n")),
     "is not in MovieLens 1M's layout: each line UserID::MovieID::Rating::Timestamp"),
    (lambda folder: (write_movielens_1m(folder), (folder / "ratings.dat").write_text("1::2::9::978300760\n")),
     "has ratings outside 1..5"),
])
def test_other_layouts_are_named_in_one_line(tmp_path, make, message):
    folder = tmp_path / "given"
    make(folder)
    cfg = config.compose(["data=movielens_1m", f"data.dir={folder}"])
    with pytest.raises(UserError) as refused:
        data.load(cfg.data)
    assert message in str(refused.value) and "\n" not in str(refused.value)
