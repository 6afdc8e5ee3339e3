"""The upload page in headless Chromium (Debian's /usr/bin/chromium driven by Playwright).

.ci/run installs Chromium with apt-get so that this runs in CI; Playwright's own browser
download is not used.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest

from chestct.labels import CLASSES
from chestct.serving import create_app
from test_serving_support import encode, model_dir, slice_png  # noqa: F401

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


@pytest.fixture
def base_url(model_dir: Path):  # noqa: F811
    from werkzeug.serving import make_server

    app = create_app({"MODEL_DIR": str(model_dir)})
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(timeout=10)


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
    page.wait_for_function(
        "() => document.getElementById('heatmap').complete && "
        "document.getElementById('heatmap').naturalWidth > 0",
        timeout=30_000,
    )
    label = page.get_attribute("#label", "data-label")
    assert label in CLASSES
    assert page.inner_text("#label").strip()
    bars = page.query_selector_all("#bars .bar")
    assert [b.get_attribute("data-class") for b in bars] == sorted(CLASSES)
    assert page.eval_on_selector("#heatmap", "img => img.naturalWidth") == 160
    assert page.get_attribute("#heatmap", "src").startswith("data:image/png;base64,")
    assert page.is_visible("#result")
    assert external == [], external  # no CDN, nothing outside the service


def test_upload_page_shows_the_problem_for_a_blank_image(
    base_url: str, page, tmp_path: Path
) -> None:
    page.goto(base_url + "/")
    blank = tmp_path / "blank.png"
    blank.write_bytes(encode(np.zeros((128, 128), np.uint8)))
    page.set_input_files("#file", str(blank))
    page.click("#submit")
    page.wait_for_function("() => document.getElementById('error').textContent.length > 0")
    assert page.inner_text("#error").startswith("Not a chest CT slice")
    assert not page.is_visible("#result")
