"""The upload page in headless Chromium (Debian's /usr/bin/chromium driven by Playwright).

.ci/run installs Chromium with apt-get so that this runs in CI; Playwright's own browser
download is not used.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from chestct.labels import CLASSES
from chestct.serving import create_app
from model_folder import ct_slice, encode, slice_png

CHROMIUM = Path("/usr/bin/chromium")

if not CHROMIUM.exists() and os.environ.get("CHESTCT_REQUIRE_BROWSER"):
    # CI sets CHESTCT_REQUIRE_BROWSER after installing Chromium: a silent skip would hide a
    # broken install.
    raise RuntimeError("CHESTCT_REQUIRE_BROWSER is set but /usr/bin/chromium is absent")

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="/usr/bin/chromium is absent: install it with `apt-get install chromium` "
    "(.ci/run does)",
)


@contextlib.contextmanager
def served(model: Path) -> Iterator[str]:
    """The app on a free 127.0.0.1 port in a thread; yields its base URL."""
    from werkzeug.serving import make_server

    app = create_app({"MODEL_DIR": str(model)})
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(timeout=10)


@pytest.fixture
def base_url(model_dir: Path):
    with served(model_dir) as url:
        yield url


@pytest.fixture
def page():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"]
        )
        try:
            yield browser.new_page()
        finally:
            browser.close()


def test_upload_page_shows_label_bars_and_heatmap(base_url: str, page, tmp_path: Path) -> None:
    external: list[str] = []
    page.on(
        "request",
        lambda req: external.append(req.url) if not req.url.startswith(base_url) else None,
    )
    page.goto(base_url + "/")
    image = tmp_path / "slice.png"
    image.write_bytes(slice_png(2, size=160))
    page.set_input_files("#file", str(image))
    page.click("#submit")
    page.wait_for_selector(".row[data-done]", timeout=30_000)
    row = page.query_selector(".row")
    assert row.get_attribute("data-done") == "ok"
    assert row.get_attribute("data-file") == "slice.png"
    assert row.get_attribute("data-label") in CLASSES
    assert row.query_selector(".label").inner_text().strip()
    bars = row.query_selector_all(".bar")
    assert [b.get_attribute("data-class") for b in bars] == sorted(CLASSES)
    heatmap = row.query_selector("img.heatmap")
    assert heatmap.evaluate("img => img.naturalWidth") == 160
    assert heatmap.get_attribute("src").startswith("data:image/png;base64,")
    assert "Model chestct version 1 (litert)" in page.inner_text("#model")
    assert external == [], external  # no CDN, nothing outside the service


def test_upload_page_shows_the_problem_for_a_blank_image(
    base_url: str, page, tmp_path: Path
) -> None:
    page.goto(base_url + "/")
    blank = tmp_path / "blank.png"
    blank.write_bytes(encode(np.zeros((128, 128), np.uint8)))
    page.set_input_files("#file", str(blank))
    page.click("#submit")
    page.wait_for_selector(".row[data-done]")
    row = page.query_selector(".row")
    assert row.get_attribute("data-done") == "error"
    assert row.query_selector(".error").inner_text().startswith("Not a chest CT slice")
    assert row.query_selector("img.heatmap") is None


@pytest.fixture
def monitored_url(monitored_model: Path):
    with served(monitored_model) as url:
        yield url


DROP = """async (files) => {
  const transfer = new DataTransfer();
  for (const [name, b64] of files) {
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    transfer.items.add(new File([bytes], name, { type: "image/png" }));
  }
  const zone = document.getElementById("drop");
  zone.dispatchEvent(new DragEvent("dragover", { dataTransfer: transfer, bubbles: true }));
  zone.dispatchEvent(new DragEvent("drop", { dataTransfer: transfer, bubbles: true }));
}"""


def test_dropped_slices_get_one_row_each_with_warnings_in_words(
    monitored_url: str,
    monitored_model: Path,
    page,
) -> None:
    import base64

    from helpers import zoomed

    missing: list[str] = []
    page.on("response", lambda r: missing.append(r.url) if r.status == 404 else None)
    page.goto(monitored_url + "/")
    page.wait_for_function("() => document.getElementById('model').dataset.version")
    model_line = page.inner_text("#model")
    # Version and the card's test figures, and that they are clean test figures only.
    assert "version 1" in model_line
    assert "accuracy 0.600" in model_line and "macro-F1 0.580" in model_line
    # How uncertain that is, and how far above a memorizer, overall and on novel slices.
    assert "macro-F1 0.580 [95 % interval 0.450–0.700]" in model_line
    assert "memorizer (the label of the most similar training slice) scores macro-F1 0.500" in (
        model_line
    )
    assert "the model is 0.080 above it" in model_line
    assert "on the 12 test slices unlike any training slice: model 0.410, memorizer 0.300" in (
        model_line
    )
    assert "clean test figures only" in model_line
    files = [
        ("a.png", ct_slice(11, "normal", size=96)),
        ("zoomed.png", zoomed(ct_slice(12, "normal", size=96), 0.45)),
        ("blank.png", np.zeros((96, 96), np.uint8)),
    ]
    payload = [(name, base64.b64encode(encode(img)).decode("ascii")) for name, img in files]
    page.evaluate(DROP, payload)
    page.wait_for_function(
        "() => document.querySelectorAll('.row[data-done]').length === 3", timeout=30_000
    )
    rows = page.query_selector_all(".row")
    assert [r.get_attribute("data-file") for r in rows] == ["a.png", "zoomed.png", "blank.png"]
    assert [r.get_attribute("data-done") for r in rows] == ["ok", "ok", "error"]
    ood = rows[1].query_selector(".warn.ood")  # a strong zoom is far from the training set
    assert ood is not None and ood.inner_text().startswith("Unlike the training data")
    assert all(len(r.query_selector_all(".bar")) == len(CLASSES) for r in rows[:2])
    assert rows[2].query_selector(".error").inner_text().startswith("Not a chest CT slice")
    # The warnings, in words, exactly where the API raises the flags.
    client = create_app({"MODEL_DIR": str(monitored_model)}).test_client()
    abstained = 0
    for row, (_, img) in zip(rows[:2], files[:2], strict=True):
        answer = client.post("/predict", data=encode(img), content_type="image/png").get_json()
        warn = row.query_selector(".warn.abstain")
        assert (warn is not None) == bool(answer["uncertainty"]["abstain"])
        heading = row.query_selector(".label").inner_text()
        if warn is not None:
            assert warn.inner_text().startswith("Uncertain:")
            # An abstention is headed as such; the label is only named as "most probable".
            assert heading == "Uncertain: no answer", heading
            assert answer["display_name"] in row.query_selector(".likely").inner_text()
            abstained += 1
        else:
            assert heading == answer["display_name"]
        flagged = row.query_selector(".warn.ood") is not None
        assert flagged == bool(answer["ood"]["out_of_distribution"])
    assert abstained >= 1  # the trained test model abstains on most slices (threshold 0.97)
    # The page and the favicon it names load without a 404.
    assert (
        page.evaluate(
            "() => fetch('/favicon.ico')"
            ".then((r) => r.status + ' ' + r.headers.get('content-type'))"
        )
        == "200 image/svg+xml; charset=utf-8"
    )
    assert not missing, missing


def test_monitor_report_fits_1280_px_with_charts_in_a_grid(
    monitored_model: Path, page, tmp_path: Path
) -> None:
    """The monitor's report.html at 1280 x 800: nothing wider than the screen (the summary
    box wraps), the rule stated, and the charts several to a row (before: the summary box
    overflowed and the charts ran one per row down a long page)."""
    import subprocess
    import sys

    client = create_app(
        {
            "MODEL_DIR": str(monitored_model),
            "AUDIT_LOG": True,
            "AUDIT_DB": str(tmp_path / "audit.sqlite"),
            "MC_DROPOUT_SAMPLES": 0,
        }
    ).test_client()
    for i in range(60):
        resp = client.post(
            "/predict", data=encode(ct_slice(50_000 + i, CLASSES[i % 4])), content_type="image/png"
        )
        assert resp.status_code == 200
    repo = Path(__file__).resolve().parents[2]
    out = tmp_path / "report"
    done = subprocess.run(
        [
            *(
                sys.executable,
                "-m",
                "chestct.monitoring.monitor",
                "--db",
                str(tmp_path / "audit.sqlite"),
            ),
            *("--model-dir", str(monitored_model), "--out", str(out)),
        ],
        env={**os.environ, "PYTHONPATH": str(repo / "src"), "CHESTCT_ROOT": str(repo)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode in (0, 1), done.stdout + done.stderr
    page.set_viewport_size({"width": 1280, "height": 800})
    page.goto((out / "report.html").as_uri())
    layout = page.evaluate(
        """() => {
        const box = (el) => el.getBoundingClientRect();
        const figures = [...document.querySelectorAll('figure')];
        const verdict = document.getElementById('verdict');
        return {
            page: document.documentElement.scrollWidth,
            verdictOverflow: verdict.scrollWidth - verdict.clientWidth,
            rows: new Set(figures.map((f) => Math.round(box(f).top))).size,
            figures: figures.length,
            widest: Math.max(...[...document.querySelectorAll('body *')].map((e) => box(e).right)),
            rule: (document.getElementById("rule") || {innerText: ""}).innerText,
        };
    }"""
    )
    assert layout["page"] <= 1280 and layout["widest"] <= 1280, layout
    assert layout["verdictOverflow"] <= 0, layout
    assert layout["figures"] >= 6 and layout["rows"] <= layout["figures"] / 2, layout
    assert "PSI is at least" in layout["rule"] and "p <" in layout["rule"]


def test_upload_page_header_shows_the_shift_figures_of_the_card(
    monitored_model: Path, page, tmp_path: Path
) -> None:
    """Beside the clean test figures (1.000 on the synthetic default), the header gives the
    card's figures under the synthetic shifts of the test split and the robust macro-F1."""
    import json
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(monitored_model, folder)
    card = json.loads((folder / "model.json").read_text())
    card["metrics"].update(
        robust_macro_f1=0.495, shift={"worst_macro_f1": 0.41, "worst_shift": "zoom_60"}
    )
    (folder / "model.json").write_text(json.dumps(card))
    with served(folder) as url:
        page.goto(url + "/")
        page.wait_for_function("() => document.getElementById('model').dataset.version")
        line = page.inner_text("#model")
    assert "macro-F1 0.580" in line
    assert "under synthetic shifts of that split" in line
    assert "worst macro-F1 0.410 (zoom_60)" in line and "robust macro-F1 0.495" in line
