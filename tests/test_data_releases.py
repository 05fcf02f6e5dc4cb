"""The MovieLens releases after 100K (data=movielens_1m, _10m, _20m, _25m, _32m, _latest_small) on
small files written in each layout: parsed, trained on, downloaded and checked by the archive's
checksum, and other layouts refused in one line."""

from __future__ import annotations

import hashlib
import shutil

import mlflow
import numpy as np
import pytest

from src import config, data
from src.data import movielens_releases
from src.data.synthetic import write_movielens, write_release
from src.errors import UserError
from tests.conftest import SMALL
from tests.test_data import serve_bytes, zip_directory  # noqa: F401  (serve_bytes: a fixture)

CSV_RELEASES = ("20m", "25m", "32m", "latest_small")


def load(release: str, folder, *overrides: str):
    return data.load(config.compose([f"data=movielens_{release}", f"data.dir={folder}", *overrides]).data)


@pytest.fixture
def planted(tmp_path):
    """The planted ratings as the 100K layout holds them (ids 1..n, whole stars)."""
    write_movielens(tmp_path / "ml-100k")
    return data.movielens.parse(tmp_path / "ml-100k").ratings_matrix().toarray()


@pytest.mark.parametrize("release, layout", [("1m", "1m"), ("10m", "10m"), *((name, "csv") for name in CSV_RELEASES)])
def test_each_layout_is_read_with_its_titles_genres_and_stars(tmp_path, planted, release, layout):
    folder = tmp_path / release
    write_release(folder, layout)
    parsed = load(release, folder)
    assert parsed.num_users == 60 and parsed.num_movies == 30
    assert list(parsed.ratings.columns) == ["user_id", "item_id", "rating", "timestamp"]
    # Renumbered 1..n in id order, each keeping its MovieLens id (spaced ids outside 1M).
    spacing = (1, 1) if release == "1m" else (3, 7)
    assert list(parsed.users.id[:3]) == [spacing[0] * i for i in (1, 2, 3)]
    assert list(parsed.movies.id[:3]) == [spacing[1] * i for i in (1, 2, 3)]
    title = parsed.movies.loc[1, "title"]
    assert title == ("Synthétique, Movie 1 (1990)" if layout == "csv" else "Synthétique: Movie 1 (1990)")
    assert parsed.movies.loc[1, "genres"] == ("unknown", "Drama")
    if layout == "csv":
        assert parsed.movies.loc[30, "genres"] == ()  # "(no genres listed)"
    # The same planted ratings as the 100K layout's, half a star off every other one after 1M.
    matrix = parsed.ratings_matrix().toarray()
    assert np.count_nonzero(matrix) == np.count_nonzero(planted)
    halved = planted - matrix
    assert set(np.unique(halved)) == ({0.0} if release == "1m" else {0.0, 0.5})


@pytest.mark.parametrize("release, layout", [("1m", "1m"), ("25m", "csv")])
def test_a_quick_linucb_run_finishes_and_recommends_by_movielens_ids(tmp_path, release, layout):
    from src import predict  # here: only this test needs the whole training stack
    from src.training import train

    folder = tmp_path / release
    write_release(folder, layout)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = config.compose([f"data=movielens_{release}", f"data.dir={folder}", f"tracking.uri={store}", *SMALL,
                          "agent=linucb"])
    final, run_id = train(cfg)
    assert final["train/cumulative_regret"] > 0
    run = mlflow.MlflowClient(cfg.tracking.uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["data.name"] == f"movielens_{release}"
    # The second user and the first movies by the ids the release gives them (spaced after 1M).
    user = 2 if release == "1m" else 6
    report = predict.recommend(predict.parse([f"run_id={run_id}", f"user_id={user}", f"tracking.uri={store}"]))
    rows = [line.split()[1:] for line in report.splitlines() if line.split() and line.split()[0].isdigit()]
    shown = {int(row[1] if row[0] == "*" else row[0]) for row in rows}  # rank, pick mark, movie_id, ...
    expected = {movie * (1 if release == "1m" else 7) for movie in range(1, 11)}  # SMALL: env.num_movies=10
    assert f"user {user}: recommended movie" in report and shown <= expected and len(shown) == 10


def test_the_download_is_checked_by_its_md5_and_a_failed_one_caches_nothing(tmp_path, serve_bytes):
    write_release(tmp_path / "ml-1m", "1m")
    archive = zip_directory(tmp_path / "ml-1m", "ml-1m")
    url = serve_bytes(archive)
    cache = tmp_path / "cache"
    with pytest.raises(UserError, match="is not the MovieLens 1M release"):
        movielens_releases.load("1m", None, str(cache), url, "md5:" + "0" * 32)
    assert not (cache / "ml-1m").exists()
    loaded = movielens_releases.load("1m", None, str(cache), url, "md5:" + hashlib.md5(archive).hexdigest())
    assert loaded.num_users == 60 and (cache / "ml-1m" / "ratings.dat").is_file()


def test_a_published_checksum_is_fetched_beside_the_archive(tmp_path, serve_bytes):
    write_release(tmp_path / "ml-32m", "csv")
    archive = zip_directory(tmp_path / "ml-32m", "ml-32m")
    cache = tmp_path / "cache"
    wrong = serve_bytes(archive, md5=b"MD5 (ml-32m.zip) = " + b"0" * 32 + b"\n")
    with pytest.raises(UserError, match="is not the MovieLens 32M release"):
        movielens_releases.load("32m", None, str(cache), wrong, "published")
    assert not (cache / "ml-32m").exists()
    missing = serve_bytes(archive)  # no .md5 beside it
    with pytest.raises(UserError, match=r"could not fetch the published checksum .*ml-100k.zip.md5"):
        movielens_releases.load("32m", None, str(cache), missing, "published")
    right = serve_bytes(archive, md5=f"MD5 (ml-32m.zip) = {hashlib.md5(archive).hexdigest()}\n".encode())
    assert movielens_releases.load("32m", None, str(cache), right, "published").num_movies == 30
    shutil.rmtree(cache / "ml-32m")
    md5sum_form = serve_bytes(archive, md5=f"{hashlib.md5(archive).hexdigest().upper()}  ml-32m.zip\n".encode())
    assert movielens_releases.load("32m", None, str(cache), md5sum_form, "published").num_movies == 30


@pytest.mark.parametrize("release, make, message", [
    ("1m", lambda folder: write_movielens(folder), "holds u.data, the layout of MovieLens 100K (data=movielens); "
                                                   "data=movielens_1m expects ml-1m's ratings.dat, movies.dat, users.dat"),
    ("1m", lambda folder: write_release(folder, "csv"), "holds ratings.csv, the layout of MovieLens 20M or later"),
    ("1m", lambda folder: write_release(folder, "10m"), "holds ratings.dat, the layout of MovieLens 10M"),
    ("10m", lambda folder: write_release(folder, "1m"), "holds users.dat, the layout of MovieLens 1M"),
    ("25m", lambda folder: write_release(folder, "1m"), "holds ratings.dat, users.dat, the layout of MovieLens 1M "
                                                        "(data=movielens_1m); data=movielens_25m expects ml-25m's"),
    ("1m", lambda folder: (write_release(folder, "1m"), (folder / "users.dat").unlink()), "the layout of MovieLens 10M"),
    ("20m", lambda folder: (folder.mkdir(), (folder / "movies.csv").write_text("movieId,title,genres\n")),
     "lacks ratings.csv"),
    ("1m", lambda folder: (write_release(folder, "1m"), (folder / "ratings.dat").write_text("1,2,5,978300760\n")),
     "is not in MovieLens 1M's layout: each line UserID::MovieID::Rating::Timestamp"),
    ("1m", lambda folder: (write_release(folder, "1m"), (folder / "ratings.dat").write_text("1::2::9::978300760\n")),
     "has ratings outside 1..5"),
    ("25m", lambda folder: (write_release(folder, "csv"), (folder / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n3,7,0.25,1\n")), "has ratings outside 0.5..5"),
    ("25m", lambda folder: (write_release(folder, "csv"), (folder / "ratings.csv").write_text(
        "user,item,stars,time\n3,7,4,1\n")), "has columns user,item,stars,time, not MovieLens 25M's layout"),
    ("25m", lambda folder: (write_release(folder, "csv"), (folder / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n3,7,good,1\n")), "is not in MovieLens 25M's layout: a header"),
    ("25m", lambda folder: (write_release(folder, "csv"), (folder / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n3,8,4,1\n")), "rates 0 users and 1 movies that ratings.csv/movies.csv "
                                                       "do not list"),
])
def test_other_layouts_are_named_in_one_line(tmp_path, release, make, message):
    folder = tmp_path / "given"
    make(folder)
    with pytest.raises(UserError) as refused:
        load(release, folder)
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_a_local_copy_with_another_count_than_the_release_is_named(tmp_path, caplog):
    write_release(tmp_path / "ml-20m", "csv")
    count = len(load("20m", tmp_path / "ml-20m").ratings)
    assert f"holds {count:,} ratings; the published MovieLens 20M has 20,000,263" in caplog.text


def test_a_user_is_found_by_their_movielens_id_after_renumbering(tmp_path):
    from src.predict import data_row  # here: only this test needs the command's module

    write_release(tmp_path / "ml-10M100K", "10m")
    parsed = load("10m", tmp_path / "ml-10M100K")
    assert data_row(parsed, 6) == 2 and parsed.users.id.loc[2] == 6  # ids are spaced by 3
    with pytest.raises(UserError, match="user_id must be a user id of this data, from 3 to 180 with gaps, got 4"):
        data_row(parsed, 4)
