"""The tour of the MLflow UI in docs/metrics.md, made again from the product's own runs.

    uv run python docs/screenshots.py --data-dir /path/to/ml-100k    # about 5 minutes on 2 cores

In a temporary store: LinUCB, LinTS and epsilon-greedy (quick, seeds 0 and 1), a 4-trial
LinUCB sweep, and the default comparison report (`src.compare` without filters). Then
`mlflow server` on that store and Debian's Chromium (driven by Playwright) photograph the runs
table with the sweep opened, a run's regret plot, and its metric charts, into docs/.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import mlflow
from playwright.sync_api import sync_playwright

DOCS = Path(__file__).resolve().parent
PROJECT_ROOT = DOCS.parent
sys.path.insert(0, str(PROJECT_ROOT))

from tests.conftest import mlflow_ui  # noqa: E402  (after the project is importable)


def train(store: Path, data: list[str], *args: str) -> None:
    """A Hydra multirun of quick runs into the store."""
    print("python -m src.train -m", *args, flush=True)
    subprocess.run([sys.executable, "-m", "src.train", "-m", *args, *data, "training=quick",
                    f"tracking.uri=sqlite:///{store / 'mlflow.db'}"], cwd=PROJECT_ROOT, check=True,
                   stdout=subprocess.DEVNULL)


def make_runs(store: Path, data: list[str]) -> None:
    train(store, data, "agent=linucb,lints,epsilon_greedy", "training.seed=0,1",
          f"hydra.sweep.dir={store / 'runs'}")
    train(store, data, "hparams_search=linucb", "hydra.sweeper.study_name=linucb-tour",
          "hydra.sweeper.n_trials=4", f"hydra.sweeper.storage=sqlite:///{store / 'optuna.db'}",
          f"hydra.sweep.dir={store / 'sweep'}")
    subprocess.run([sys.executable, "-m", "src.compare", "--tracking-uri", f"sqlite:///{store / 'mlflow.db'}",
                    "--out", str(store / "report")], cwd=PROJECT_ROOT, check=True, stdout=subprocess.DEVNULL)
    shutil.copy(store / "report" / "comparison.png", DOCS / "comparison.png")


def photograph(store: Path) -> None:
    with mlflow_ui(store) as (base, experiment_id):
        client = mlflow.MlflowClient(base)
        (run,) = client.search_runs([experiment_id], "attributes.run_name = 'linucb·s0'")
        with sync_playwright() as driver:
            browser = driver.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 800})
            page.set_default_timeout(90_000)
            page.goto(f"{base}/#/experiments/{experiment_id}/runs")
            page.locator("[role=gridcell]", has_text="linucb-tour·sweep").get_by_role("button").first.click()
            page.get_by_text("linucb·s0·t3", exact=True).wait_for()
            close_assistant(page)
            page.screenshot(path=DOCS / "ui_runs.png")
            page.goto(f"{base}/#/experiments/{experiment_id}/runs/{run.info.run_id}/artifacts/regret.png")
            page.locator("img[src^='blob:']").first.wait_for()
            close_assistant(page)
            page.screenshot(path=DOCS / "ui_run_regret.png")
            page.goto(f"{base}/#/experiments/{experiment_id}/runs/{run.info.run_id}/model-metrics")
            page.get_by_text("train/cumulative_regret").first.wait_for()
            page.wait_for_timeout(3000)  # the charts draw after their titles
            close_assistant(page)
            page.screenshot(path=DOCS / "ui_run_metrics.png")
            browser.close()


def close_assistant(page) -> None:
    """MLflow 3.17 opens an "Assistant" side panel on every page; it hides a third of the view."""
    page.wait_for_timeout(1500)
    closer = page.locator("button[aria-label='Close']")
    if closer.count():
        closer.first.click()
        page.wait_for_timeout(500)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", help="a local ml-100k directory (default: synthetic MovieLens-format data)")
    args = parser.parse_args()
    data = [f"data.dir={args.data_dir}"] if args.data_dir else ["data=synthetic"]
    with tempfile.TemporaryDirectory() as scratch:
        make_runs(Path(scratch), data)
        photograph(Path(scratch))
    print(f"wrote {DOCS}/ui_runs.png, ui_run_regret.png, ui_run_metrics.png and comparison.png")


if __name__ == "__main__":
    main()
