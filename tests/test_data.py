"""Download, verification and parsing of MovieLens-format files (synthetic, never the real ones)."""

from __future__ import annotations

import http.server
import io
import shutil
import threading
import zipfile
from pathlib import Path

import mlflow
import pytest

from src import config, data
from src.data import movielens
from src.data.synthetic import write_movielens
from src.errors import UserError


def zip_directory(directory: Path, folder: str = "ml-100k") -> bytes:
    """The bytes of a zip holding `directory`'s files under `folder/`, as GroupLens' archives do."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        for path in sorted(directory.iterdir()):
            bundle.write(path, f"{folder}/{path.name}")
    return buffer.getvalue()


@pytest.fixture
def serve_bytes():
    """Serve a payload at http://127.0.0.1:<port>/ml-100k.zip, and its published checksum file at
    .../ml-100k.zip.md5 if one is given; yield a function setting them."""
    payload = {"body": b"", "md5": None}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's naming)
            body = payload["md5"] if self.path.endswith(".md5") else payload["body"]
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def serve(body: bytes, md5: bytes | None = None) -> str:
        payload["body"], payload["md5"] = body, md5
        return f"http://127.0.0.1:{server.server_address[1]}/ml-100k.zip"

    yield serve
    server.shutdown()


def test_parse_reads_ratings_titles_genres_and_users(movielens_dir):
    directory, _ = movielens_dir
    data = movielens.parse(directory)
    assert data.num_users == 60 and data.num_movies == 30
    assert data.movies.loc[1, "title"] == "Synthetic Movie 1 (1990)"
    assert data.movies.loc[2, "genres"] == ("Action",)
    matrix = data.ratings_matrix()
    first = data.ratings.iloc[0]
    assert matrix[first.user_id - 1, first.item_id - 1] == first.rating
    assert (matrix > 0).sum() == len(data.ratings)


def test_local_directory_is_verified_by_checksum(movielens_dir, tmp_path):
    directory, checksums = movielens_dir
    assert movielens.locate(str(directory), "unused", str(tmp_path), checksums) == directory
    copy = tmp_path / "copy"
    shutil.copytree(directory, copy)
    with open(copy / "u.data", "a") as handle:
        handle.write("1\t2\t3\t4\n")
    with pytest.raises(UserError, match="u.data is corrupt"):
        movielens.locate(str(copy), "unused", str(tmp_path), checksums)
    (copy / "u.item").unlink()
    with pytest.raises(UserError, match="missing"):
        movielens.verify(copy, {"u.item": checksums["u.item"]})


def test_download_verifies_and_unpacks_then_reuses_the_cache(movielens_dir, tmp_path, serve_bytes):
    directory, checksums = movielens_dir
    url = serve_bytes(zip_directory(directory))
    located = movielens.locate(None, url, str(tmp_path / "cache"), checksums)
    assert located == tmp_path / "cache" / "ml-100k"
    assert movielens.parse(located).num_users == 60
    # A second call must not touch the network: the server now serves garbage.
    serve_bytes(b"not a zip")
    assert movielens.locate(None, url, str(tmp_path / "cache"), checksums) == located


def test_download_of_corrupt_files_is_refused_and_leaves_no_cache(movielens_dir, tmp_path, serve_bytes):
    directory, checksums = movielens_dir
    tampered = tmp_path / "tampered"
    write_movielens(tampered, seed=1)  # same format, other content: checksums differ
    url = serve_bytes(zip_directory(tampered))
    with pytest.raises(UserError, match="corrupt"):
        movielens.locate(None, url, str(tmp_path / "cache"), checksums)
    assert not (tmp_path / "cache" / "ml-100k").exists()
    with pytest.raises(UserError, match="not a valid zip"):
        movielens.locate(None, serve_bytes(b"garbage"), str(tmp_path / "cache"), checksums)


def test_offline_without_a_copy_says_where_to_put_the_files(tmp_path):
    with pytest.raises(UserError, match=r"could not download .* data\.dir="):
        movielens.locate(None, "http://127.0.0.1:9/ml-100k.zip", str(tmp_path), {})


def test_unparsable_file_is_a_user_error(tmp_path):
    write_movielens(tmp_path)
    (tmp_path / "u.data").write_text("1\tnot-a-number\t5\t0\n")
    with pytest.raises(UserError, match="cannot parse"):
        movielens.parse(tmp_path)


@pytest.mark.parametrize("directory", ["", "  "])
def test_an_empty_data_dir_is_refused_not_taken_for_a_download(directory, tmp_path):
    with pytest.raises(UserError, match="data.dir is empty: give the folder holding ml-100k's files, or null"):
        movielens.locate(directory, "http://127.0.0.1:9/ml-100k.zip", str(tmp_path), {})


def test_generated_ratings_are_logged_as_made_by_code(tmp_path):
    from src import training  # here: only this test needs the training stack

    cfg = config.compose(["data=synthetic", "data.num_users=20", "data.num_movies=10"])
    store, previous = f"sqlite:///{tmp_path / 'mlflow.db'}", mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(store)
    try:
        with mlflow.start_run() as run:
            training.log_ratings(cfg, data.load(cfg.data))
    finally:
        mlflow.set_tracking_uri(previous)
    (logged,) = mlflow.MlflowClient(store).get_run(run.info.run_id).inputs.dataset_inputs
    assert (logged.dataset.name, logged.dataset.source_type) == ("synthetic", "code")
