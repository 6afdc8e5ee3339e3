"""`dvc plots show` works offline: its page, opened in headless Chromium with every request
but file:// refused, draws every chart (the Vega scripts are inlined by `make venv`).

The control: DVC's own page (no html_template) asks cdn.jsdelivr.net for its scripts and draws
nothing offline, which is what users met before.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from project_copy import REPO, pipeline_env, project_copy, run

CHROMIUM = Path("/usr/bin/chromium")
TEMPLATE = REPO / "build" / "plots" / "template.html"

if not CHROMIUM.exists() and os.environ.get("CHESTCT_REQUIRE_BROWSER"):
    raise RuntimeError("CHESTCT_REQUIRE_BROWSER is set but /usr/bin/chromium is absent")

pytestmark = [
    pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is absent"),
    pytest.mark.e2e,
]

CLASSES = ("adenocarcinoma", "large_cell_carcinoma", "squamous_cell_carcinoma", "normal")
# The tables the stages write (columns as dvc.yaml's plots read them).
TABLES = {
    "reports/train/history.csv": "member,epoch,phase,loss,val_loss\n"
    + "".join(f"0,{e},1,{1.5 - e / 10:.2f},{1.6 - e / 12:.2f}\n" for e in range(1, 6)),
    "reports/evaluate/confusion.csv": "actual,predicted\n"
    + "".join(f"{a},{p}\n" for a in CLASSES for p in CLASSES),
    "artifacts/evaluate/roc.csv": "fpr," + ",".join(CLASSES) + "\n0,0,0,0,0\n0.5,0.7,0.6,0.8,0.9\n"
    "1,1,1,1,1\n",
    "reports/evaluate/reliability.csv": "bin_mid,count,accuracy,accuracy_calibrated\n"
    "0.5,3,0.4,0.5\n0.9,5,0.8,0.9\n",
    "reports/evaluate/shift.csv": "perturbation,macro_f1\nclean,0.9\nblur,0.7\n",
}


CHARTS = 7  # history and reliability are drawn twice (one column, several columns)


@pytest.fixture(scope="module")
def copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not TEMPLATE.is_file():
        pytest.fail(f"{TEMPLATE} is missing: run `make venv`, which writes it")
    root = project_copy(tmp_path_factory.mktemp("plots"))
    for name, text in TABLES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    env = pipeline_env(root)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "c"]):
        run(cmd, root, env)
    return root


def show(root: Path, out: str, *extra: str) -> Path:
    # The pictures (artifacts/evaluate/*.png) do not exist here; DVC reports them and goes on.
    subprocess.run(
        ["dvc", "plots", "show", "-o", out, *extra],
        cwd=root,
        env=pipeline_env(root),
        capture_output=True,
        text=True,
        timeout=300,
    )
    page = root / out / "index.html"
    assert page.is_file(), f"dvc plots show wrote no {page}"
    return page


def charts_offline(page_file: Path) -> tuple[int, int, list[str]]:
    """(charts on the page, charts drawn, requests refused) with only file:// allowed."""
    from playwright.sync_api import sync_playwright

    refused: list[str] = []

    def gate(route) -> None:
        if route.request.url.startswith("file:"):
            route.continue_()
        else:
            refused.append(route.request.url)
            route.abort()

    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"]
        )
        try:
            page = browser.new_page()
            page.route("**/*", gate)
            page.goto(page_file.as_uri())
            page.wait_for_timeout(1500)  # vega-embed draws asynchronously
            charts = page.locator("body > div[id]").count()
            drawn = page.locator("body > div[id] canvas, body > div[id] svg.marks").count()
        finally:
            browser.close()
    return charts, drawn, refused


def test_dvc_plots_show_draws_every_chart_offline(copy: Path) -> None:
    html = show(copy, "dvc_plots").read_text(encoding="utf-8")
    assert "cdn.jsdelivr.net" not in html
    charts, drawn, refused = charts_offline(copy / "dvc_plots" / "index.html")
    assert refused == []
    # Training curves + validation macro-F1, confusion, shift, reliability + bin counts, ROC.
    assert charts == CHARTS and drawn == charts


def test_dvc_default_page_stays_blank_offline(copy: Path) -> None:
    run(["dvc", "config", "--local", "plots.html_template", ""], copy, pipeline_env(copy))
    try:
        page = show(copy, "dvc_plots_default", "--html-template", "")
    finally:
        run(
            ["dvc", "config", "--local", "--unset", "plots.html_template"],
            copy,
            pipeline_env(copy),
        )
    charts, drawn, refused = charts_offline(page)
    assert any("cdn.jsdelivr.net" in url for url in refused)
    assert charts == CHARTS and drawn == 0
