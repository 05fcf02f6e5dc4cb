"""The leaderboard pages under docs/ made again from what they keep (leaderboard.csv,
curves.csv, the page's command and wall time, about.md): their text and figures, without the
hour of runs behind them or their MLflow store.

    uv run python -m docs.rebuild_leaderboards
"""

from __future__ import annotations

import logging
from pathlib import Path

from src.leaderboard import rebuild

PAGES = [Path(__file__).resolve().parent / name for name in ("leaderboard", "environments", "time")]

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for page in PAGES:
        rebuild(page)
