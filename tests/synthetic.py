"""Synthetic MovieLens-format data with planted low-rank structure (never the real files)."""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import numpy as np

GENRE_COUNT = 19


def write_movielens(directory: Path, num_users: int = 60, num_movies: int = 30, rank: int = 3,
                    density: float = 0.6, seed: int = 0) -> dict[str, str]:
    """Write u.data, u.item and u.user like ml-100k's; return their sha256 by file name."""
    rng = np.random.default_rng(seed)
    taste = rng.normal(size=(num_users, rank))
    appeal = rng.normal(size=(num_movies, rank))
    scores = taste @ appeal.T
    ratings = np.clip(np.round(3 + 1.2 * scores / scores.std()), 1, 5).astype(int)
    rated = rng.random((num_users, num_movies)) < density
    rated[:, 0] = True  # everyone rates something among the first movies
    directory.mkdir(parents=True, exist_ok=True)
    users, movies = np.nonzero(rated)
    lines = [f"{u + 1}\t{m + 1}\t{ratings[u, m]}\t{880000000 + i}" for i, (u, m) in enumerate(zip(users, movies))]
    (directory / "u.data").write_text("\n".join(lines) + "\n")
    items = []
    for m in range(num_movies):
        flags = ["0"] * GENRE_COUNT
        flags[m % GENRE_COUNT] = "1"
        items.append("|".join([str(m + 1), f"Synthetic Movie {m + 1} (199{m % 10})", "01-Jan-1995", "", "http://x", *flags]))
    (directory / "u.item").write_bytes(("\n".join(items) + "\n").encode("latin-1"))
    people = [f"{u + 1}|{20 + u % 40}|{'MF'[u % 2]}|other|{10000 + u}" for u in range(num_users)]
    (directory / "u.user").write_text("\n".join(people) + "\n")
    return {name: hashlib.sha256((directory / name).read_bytes()).hexdigest() for name in ("u.data", "u.item", "u.user")}


def zip_directory(directory: Path) -> bytes:
    """The bytes of an ml-100k.zip holding `directory`'s files under `ml-100k/`."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        for path in sorted(directory.iterdir()):
            bundle.write(path, f"ml-100k/{path.name}")
    return buffer.getvalue()


def checksum_override(checksums: dict[str, str]) -> str:
    return "data.sha256={" + ",".join(f"{k}:{v}" for k, v in checksums.items()) + "}"
