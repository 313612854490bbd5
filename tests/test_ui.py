"""The MLflow UI as a researcher sees it: a tiny strategic sweep on a real `mlflow server`, browsed in
headless Chromium.

Needs Debian's Chromium and the Python playwright package (never `playwright install`, which downloads
a browser build):
    apt-get install -y chromium && pip install playwright
Skips, saying so, where either is missing. Screenshots of each step go to the test's tmp_path.
"""

from __future__ import annotations

import re
import shutil
import struct
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipeline.config import preset_configs

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="the UI tests need the playwright package: pip install playwright"
)
CHROMIUM = shutil.which("chromium")
if CHROMIUM is None:
    pytest.skip(
        "the UI tests need Debian's Chromium at /usr/bin/chromium: apt-get install -y chromium",
        allow_module_level=True,
    )

# Fixture served_sweep (one server and sweep per session, shared with test_remote_tracking.py).
pytest_plugins = ["tests.servers"]

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    # This machine has no network: without these Chromium keeps trying Google's services.
    "--disable-background-networking",
    "--disable-component-update",
]
WAIT_MS = 60_000  # the UI's first load compiles a large bundle; generous on a busy 2-core machine
BASELINE = "random·bipolar·l1·relu"


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=WAIT_MS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1600, "height": 1000})
    context.set_default_timeout(WAIT_MS)
    sync_api.expect.set_options(timeout=WAIT_MS)
    try:
        yield context.new_page()
    finally:
        context.close()


@pytest.fixture(scope="module")
def sweep_runs(served_sweep):
    """The experiment id and runs of the served sweep, read through the API."""
    client = MlflowClient(served_sweep.server.uri)
    experiment_id = client.get_experiment_by_name(served_sweep.experiment).experiment_id
    runs = client.search_runs([experiment_id], "", max_results=1000)
    return experiment_id, {run.info.run_name: run for run in runs}


def test_the_experiment_says_it_holds_training_runs(served_sweep, sweep_runs):
    """The experiment tag by which MLflow's UI tells a training experiment from a GenAI one (which UI
    versions heed it: see EXPERIMENT_KIND_TAG in tracking/store.py)."""
    experiment_id, _ = sweep_runs
    tags = MlflowClient(served_sweep.server.uri).get_experiment(experiment_id).tags
    assert tags.get("mlflow.experimentKind") == "custom_model_development"


def test_clicking_the_experiment_on_the_home_page_opens_its_runs_table(
    served_sweep, sweep_runs, page, tmp_path
):
    experiment_id, _ = sweep_runs
    page.goto(served_sweep.server.uri)  # the home page, which lists the experiments
    experiment_link = page.get_by_role("link", name=served_sweep.experiment, exact=True).first
    sync_api.expect(experiment_link).to_be_visible()
    page.screenshot(path=tmp_path / "home.png")
    # From MLflow 3.10 on, the sidebar's "GenAI | Model training" switch decides for every experiment which
    # pages it opens on, whatever its tag, and a new browser starts on GenAI (an experiment's Overview page):
    # a researcher picks "Model training" once, and the browser keeps it. Earlier UIs have no switch.
    model_training = page.get_by_role("button", name="Model training", exact=True)
    if model_training.count():
        model_training.click()
    experiment_link.click()
    sync_api.expect(page).to_have_url(re.compile(rf"#/experiments/{experiment_id}/runs\b"))
    sync_api.expect(page.get_by_role("columnheader", name="Run Name").first).to_be_visible()
    for config in preset_configs("strategic"):
        sync_api.expect(page.get_by_role("link", name=config.name, exact=True)).to_be_visible()
    for genai_page in ("Overview", "Traces"):
        sync_api.expect(page.get_by_role("heading", name=genai_page, exact=True)).to_have_count(0)
    page.screenshot(path=tmp_path / "clicked-experiment.png")


def test_experiment_page_lists_the_ablations_by_their_factors(served_sweep, sweep_runs, page, tmp_path):
    experiment_id, _ = sweep_runs
    page.goto(f"{served_sweep.server.uri}/#/experiments/{experiment_id}/runs")
    for config in preset_configs("strategic"):
        sync_api.expect(page.get_by_role("link", name=config.name, exact=True)).to_be_visible()
    page.screenshot(path=tmp_path / "runs.png")


def test_a_seed_run_is_nested_under_its_ablation(served_sweep, sweep_runs, page, tmp_path):
    experiment_id, runs = sweep_runs
    page.goto(f"{served_sweep.server.uri}/#/experiments/{experiment_id}/runs")
    ablation_link = page.get_by_role("link", name=BASELINE, exact=True)
    sync_api.expect(ablation_link).to_be_visible()
    # The run-name cell of a parent run holds a button that expands its child runs.
    page.get_by_role("gridcell").filter(has=ablation_link).get_by_role("button").first.click()
    seed_links = [page.get_by_role("link", name=f"{BASELINE} seed {seed}", exact=True) for seed in (0, 1)]
    for link in seed_links:
        sync_api.expect(link).to_be_visible()
    page.screenshot(path=tmp_path / "expanded.png")

    seed_links[0].click()
    sync_api.expect(page.get_by_role("heading", name=f"{BASELINE} seed 0")).to_be_visible()
    sync_api.expect(page.get_by_text("Parent run", exact=True)).to_be_visible()
    parent_link = page.get_by_role("link", name=BASELINE, exact=True)
    sync_api.expect(parent_link).to_be_visible()
    assert runs[BASELINE].info.run_id in parent_link.get_attribute("href")
    page.screenshot(path=tmp_path / "seed-run.png")


def test_a_seed_run_page_shows_its_overlap_png(served_sweep, sweep_runs, page, tmp_path):
    experiment_id, runs = sweep_runs
    seed_run = runs[f"{BASELINE} seed 0"]
    client = MlflowClient(served_sweep.server.uri)
    logged = Path(client.download_artifacts(seed_run.info.run_id, "overlap.png", str(tmp_path))).read_bytes()

    page.goto(f"{served_sweep.server.uri}/#/experiments/{experiment_id}/runs/{seed_run.info.run_id}")
    page.get_by_role("tab", name="Artifacts").click()
    with page.expect_response(lambda response: "overlap.png" in response.url) as served:
        page.get_by_text("overlap.png", exact=True).first.click()
    assert served.value.status == 200
    image = page.get_by_alt_text("overlap.png", exact=True).first
    sync_api.expect(image).to_be_visible()
    image.evaluate("element => element.decode()")  # resolves once the image is decoded
    natural = image.evaluate("element => [element.naturalWidth, element.naturalHeight]")
    assert natural[0] > 0 and tuple(natural) == png_size(logged)
    # What the page shows is the logged file itself, byte for byte.
    shown = image.evaluate(
        "async element => Array.from(new Uint8Array(await (await fetch(element.src)).arrayBuffer()))"
    )
    assert bytes(shown) == logged
    page.screenshot(path=tmp_path / "artifacts-tab.png")
