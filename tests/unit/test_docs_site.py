"""The docs site (mkdocs.yml, docs/) builds with `mkdocs build --strict` and fetches nothing.

--strict turns every warning into a failure: a broken link or anchor, a page missing from
`nav`, a snippet file that does not exist. The built pages must not load anything from another
host (fonts, scripts, styles): the site is read offline as well.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

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


# --------------------------------------------------------------------------- measured figures

sys.path.insert(0, str(REPO / "bench"))
import docsgen  # noqa: E402  (bench/ scripts import each other by name)
import results  # noqa: E402

INCLUDE = re.compile(r'^--8<-- "docs/generated/([\w-]+)\.md"$', re.M)


def test_generated_tables_match_their_results_files() -> None:
    assert not docsgen.stale(), (
        f"docs/generated/ is out of date for {docsgen.stale()}: run `python bench/docsgen.py`"
    )


def test_every_results_file_is_shown_and_every_included_table_exists() -> None:
    included = {
        name
        for page in (REPO / "docs").rglob("*.md")
        for name in INCLUDE.findall(page.read_text(encoding="utf-8"))
    }
    recorded = {p.stem for p in (REPO / "docs" / "results").glob("*.json")}
    references = {Path(name).stem for name in docsgen.reference.REFERENCES}
    assert included == recorded | references, (
        f"results or references no page includes: {sorted((recorded | references) - included)}; "
        f"included tables without a source: {sorted(included - recorded - references)}"
    )
    for name in recorded:
        record = results.read_result(REPO / "docs" / "results" / f"{name}.json")
        assert re.match(r"\d{4}-\d{2}-\d{2}", record["measured"]), (name, record["measured"])


def test_a_results_file_without_its_machine_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("TF_NUM_INTRAOP_THREADS", raising=False)
    path = results.write_result(tmp_path / "t.json", "a table", ["a", "b"], [["1", "2"]])
    record = results.read_result(path)
    assert record["source"] == "script" and "cores" in record["machine"]
    assert record["command"].startswith("OMP_NUM_THREADS=1 python ")  # timings depend on it
    assert "| 1 | 2 |" in results.render(record, "t")
    data = json.loads(path.read_text(encoding="utf-8"))
    del data["machine"]
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ValueError, match="missing machine"):
        results.read_result(path)


def test_record_run_tables_the_shift_stress_of_the_last_evaluate(tmp_path: Path) -> None:
    shift = {
        name: {"macro_f1": 0.5 + i / 100, "balanced_accuracy": 0.6, "ece_calibrated": 0.07}
        for i, name in enumerate(docsgen.SHIFT_ORDER)
    }
    shift |= {"worst_macro_f1": 0.5, "worst_shift": "zoom_80", "mean_macro_f1": 0.54}
    metrics = {
        "macro_f1": 0.9,
        "balanced_accuracy": 0.91,
        "ece_calibrated": 0.02,
        "robust_macro_f1": 0.7,
        "shift": shift,
    }
    (tmp_path / "reports" / "evaluate").mkdir(parents=True)
    (tmp_path / "reports" / "evaluate" / "metrics.json").write_text(json.dumps(metrics))
    out = docsgen.record_run(tmp_path, tmp_path / "results" / "default-run.json")
    record = results.read_result(out)
    assert record["rows"][0] == ["clean test split", "0.900", "0.910", "0.020"]
    assert [r[0] for r in record["rows"][1:]] == [f"`{n}`" for n in docsgen.SHIFT_ORDER]
    assert "`robust_macro_f1` 0.700" in record["note"]
    assert f"holds {4 + 3 * 9 + 2} numbers" in record["note"]
    rendered = docsgen.expected(tmp_path / "results")["default-run.md"]
    assert rendered.startswith("| condition | macro-F1 |")


def test_record_run_without_a_pipeline_run_says_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="run `make run`"):
        docsgen.record_run(tmp_path, tmp_path / "x.json")


MEASURED = re.compile(
    r"macro-f1|ece|accuracy|latency|ratio|seconds|req/s|images/s|\bms\b|\bmb\b|vmrss|p50|"
    r"result|count|failures|load|time",
    re.I,
)


def test_tables_of_measured_figures_are_included_not_typed() -> None:
    typed = []
    for page in sorted((REPO / "docs").glob("*.md")):
        lines = page.read_text(encoding="utf-8").splitlines()
        for header, rule in itertools.pairwise(lines):
            if header.startswith("|") and rule.startswith("|---") and MEASURED.search(header):
                typed.append(f"{page.relative_to(REPO)}: {header}")
    assert not typed, (
        "tables of measured figures typed into a page; put them in docs/results/<name>.json "
        "(bench/results.py) and include docs/generated/<name>.md:\n" + "\n".join(typed)
    )


def test_record_run_tables_the_promoted_model(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "artifacts" / "train").mkdir(parents=True)
    (tmp_path / "model" / "model.keras").write_bytes(b"k" * 1234)
    (tmp_path / "model" / "model.tflite").write_bytes(b"t" * 567)
    card = {
        "model_file": "model.keras",
        "inference": {"file": "model.tflite", "parity_max_abs_diff": 4.2e-7, "parity_images": 9},
    }
    (tmp_path / "model" / "model.json").write_text(json.dumps(card))
    details = {
        "trainable_parameters": 393844,
        "members": [{"epochs_run": 12, "best_epoch": 11}],
    }
    (tmp_path / "artifacts" / "train" / "pointer.json").write_text(
        json.dumps({"details": details})
    )
    record = results.read_result(docsgen.record_model(tmp_path, tmp_path / "m.json"))
    rows = dict(record["rows"])
    assert rows["trainable parameters"] == "393 844"
    assert rows["epochs run (best epoch)"] == "12 (11)"
    assert rows["`model.keras`"] == "1 234 bytes"
    assert rows["`model.tflite` (float32)"] == "567 bytes"
    assert "4.2e-07 on 9 test images" in rows.values()
