"""The docs site (mkdocs.yml, docs/) builds with `mkdocs build --strict` and fetches nothing.

--strict turns every warning into a failure: a broken link or anchor, a page missing from
`nav`, a snippet file that does not exist. The built pages must not load anything from another
host (fonts, scripts, styles): the site is read offline as well.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def build_site(site: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )


def test_the_docs_site_builds_strictly_and_loads_nothing_from_elsewhere(tmp_path: Path) -> None:
    site = tmp_path / "site"
    done = build_site(site)
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stderr[-6000:]}"
    pages = sorted(site.rglob("*.html"))
    assert (site / "index.html") in pages
    external = re.compile(
        r"""<(?:script|link|img|iframe)\b[^>]*(?:src|href)=["']?(?:https?:)?//"""
    )
    loading = {
        str(p.relative_to(site)): external.findall(p.read_text(encoding="utf-8")) for p in pages
    }
    assert not {k: v for k, v in loading.items() if v}, loading
    assert "fonts.googleapis.com" not in (site / "index.html").read_text(encoding="utf-8")
