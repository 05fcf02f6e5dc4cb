"""What a person sees in MLflow's UI, in a real browser: Debian's Chromium driven by Playwright,
on `mlflow server` over a store of the product's own runs (two runs and a two-trial sweep)."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess

import mlflow
import pytest

from src import config, training
from src.campaigns import worker
from src.data.synthetic import checksum_override
from src.paths import PROJECT_ROOT
from tests.conftest import SMALL, mlflow_ui

pytestmark = pytest.mark.slow
playwright = pytest.importorskip("playwright.sync_api", reason="Playwright is a dev dependency (uv sync)")

BROWSER_LOCK = PROJECT_ROOT / ".stack" / "chromium.lock"
WAIT_MS = 90_000  # the UI's first page, on 2 busy cores
# The fixture's runs, named by what sets them apart from the defaults (the test sizes).
LINUCB, RANDOM = (training.run_name(config.compose([f"agent={agent}", *SMALL]), {}) for agent in ("linucb", "random"))


def chromium() -> str:
    """Debian's Chromium, installed (as root) when missing, one test worker at a time."""
    BROWSER_LOCK.parent.mkdir(exist_ok=True)
    with open(BROWSER_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if shutil.which("chromium") is None and os.geteuid() == 0:
            subprocess.run("apt-get update -qq && apt-get install -y -qq chromium", shell=True, check=True,
                           capture_output=True, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    found = shutil.which("chromium")
    if found is None:
        pytest.fail("the browser tests need Debian's chromium: apt-get install chromium (.ci/run does)")
    return found


@pytest.fixture(scope="module")
def ui(tmp_path_factory, movielens_dir):
    """`mlflow server` on a store holding LINUCB, RANDOM and a sweep `tiny·sweep`
    with trials `linucb·s0·t0` and `linucb·s0·t1`, all made in this process by the product's
    own code (a process per run would load TensorFlow again); yields (URL, experiment id)."""
    store = tmp_path_factory.mktemp("ui")
    directory, checksums = movielens_dir
    common = [f"data.dir={directory}", checksum_override(checksums), f"tracking.uri=sqlite:///{store / 'mlflow.db'}",
              "tracking.system_metrics_every_s=0", "tracking.save_policy=false", *SMALL]
    # The first run creates the store; the server starts on it while the others train.
    training.train(config.compose(["agent=linucb", *common]))

    def the_other_runs():
        training.train(config.compose(["agent=random", *common]))
        worker.work(["hparams_search=linucb", "hydra.sweeper.study_name=tiny", "hydra.sweeper.n_trials=2",
                     f"hydra.sweeper.storage=sqlite:///{store / 'optuna.db'}", "env.reward_rank=4", *common,
                     "env.rank_k=choice(2, 3)"])

    with mlflow_ui(store, meanwhile=the_other_runs) as served:
        yield served


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as driver:
        # Chromium's sandbox needs user namespaces, which containers (and root) lack.
        launched = driver.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture
def page(browser):
    opened = browser.new_page(viewport={"width": 1400, "height": 900})
    opened.set_default_timeout(WAIT_MS)
    yield opened
    opened.close()


def row_names(page) -> list[str]:
    """The runs table's run names, top to bottom (the grid's DOM order need not be)."""
    rows = page.locator("[role=row][row-index]", has=page.locator("[col-id*='Run Name'] a")).all()
    named = {int(row.get_attribute("row-index")): row.locator("[col-id*='Run Name'] a").inner_text().strip()
             for row in rows}
    return [named[index] for index in sorted(named)]


def test_the_runs_table_names_runs_readably_and_nests_a_sweeps_trials(ui, page):
    base, experiment_id = ui
    page.goto(f"{base}/#/experiments/{experiment_id}/runs")
    for name in (LINUCB, RANDOM, "tiny·sweep"):
        page.get_by_text(name, exact=True).wait_for()
    # Trials are folded under their parent until it is opened.
    assert page.get_by_text("linucb·s0·t0", exact=True).count() == 0
    page.locator("[role=gridcell]", has_text="tiny·sweep").get_by_role("button").first.click()
    page.get_by_text("linucb·s0·t1", exact=True).wait_for()
    names = row_names(page)
    parent = names.index("tiny·sweep")
    assert sorted(names[parent + 1:parent + 3]) == ["linucb·s0·t0", "linucb·s0·t1"], names
    assert {LINUCB, RANDOM} <= set(names) - set(names[parent:parent + 3]), names


def test_a_run_page_shows_its_regret_plot(ui, page):
    base, experiment_id = ui
    client = mlflow.MlflowClient(base)
    (run,) = client.search_runs([experiment_id], f"attributes.run_name = '{LINUCB}'")
    page.goto(f"{base}/#/experiments/{experiment_id}/runs/{run.info.run_id}/artifacts/regret.png")
    page.get_by_text(LINUCB, exact=True).first.wait_for()
    plot = page.locator("img[src^='blob:']").first
    plot.wait_for()
    assert plot.evaluate("image => image.complete && image.naturalWidth") > 500  # the figure, drawn
