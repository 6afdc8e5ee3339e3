"""research/ notebooks executed headless (the code they call: tests/unit/test_research.py).

The notebooks are executed headless, top to bottom, with nbclient on a tiny pipeline run in a
temporary copy of the project.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from chestct.labels import CLASSES
from helpers import make_kaggle_folder
from project_copy import project_copy

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
RESEARCH = REPO / "research"

# --------------------------------------------------------------------------- notebooks


@pytest.fixture(scope="module")
def reproduced(tiny_project: tuple[Path, dict[str, str]]) -> Path:
    """The session's tiny pipeline run (see conftest.tiny_project)."""
    return tiny_project[0]


def execute(name: str, env: dict[str, str], monkeypatch: pytest.MonkeyPatch):
    """Run research/<name> headless, top to bottom, from research/ as Jupyter would."""
    import nbclient
    import nbformat

    for key, value in env.items():
        monkeypatch.setenv(key, value)  # the kernel inherits this process's environment
    book = nbformat.read(RESEARCH / name, as_version=4)
    nbclient.NotebookClient(
        book,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(RESEARCH)}},
    ).execute()
    return book


def _text(book) -> str:
    parts = []
    for cell in book.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", "") or out.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


def _pictures(book) -> int:
    return sum(
        "image/png" in out.get("data", {})
        for cell in book.cells
        for out in cell.get("outputs", [])
    )


@pytest.mark.e2e
@pytest.mark.slow
def test_eda_notebook_runs_on_the_embedded_default_and_on_a_data_path(
    reproduced: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    book = execute("01-eda.ipynb", {"CHESTCT_ROOT": str(reproduced)}, monkeypatch)
    text = _text(book)
    assert "source:  synthetic" in text
    assert "56 files, 0 undecodable" in text  # 4 classes x (8 + 3 + 3)
    assert _pictures(book) >= 2  # the class-count chart and the sample grid

    folder = make_kaggle_folder(tmp_path / "kaggle", {"train": 2, "valid": 1, "test": 1})
    first = next((folder / "train").rglob("*.png"))
    shutil.copy2(first, next((folder / "valid").iterdir()) / "leak.png")
    env = {"CHESTCT_ROOT": str(reproduced), "CHESTCT_EDA_DATA": str(folder)}
    text = _text(execute("01-eda.ipynb", env, monkeypatch))
    assert f"source:  {folder}" in text
    assert "same bytes: 1 group(s), 1 across splits, 0 with a label conflict" in text


@pytest.mark.e2e
@pytest.mark.slow
def test_error_analysis_notebook_runs_on_the_promoted_model(
    reproduced: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    book = execute("02-error-analysis.ipynb", {"CHESTCT_ROOT": str(reproduced)}, monkeypatch)
    text = _text(book)
    assert "model chestct v1 (32 px" in text
    assert "12 test images" in text  # 4 classes x 3
    assert _pictures(book) >= 3  # confusion, worst errors, reliability
    for label in CLASSES:
        assert label in text
    # What the served model answers agrees with what evaluate measured on the Keras model.
    metrics = json.loads((reproduced / "reports/evaluate/metrics.json").read_text())
    accuracy = float(text.split("test images; accuracy ")[1].split(",")[0])
    assert accuracy == pytest.approx(metrics["accuracy"], abs=1e-3)


@pytest.mark.e2e
@pytest.mark.slow
def test_acquisition_notebook_shows_no_shortcut_on_synthetic_and_one_on_a_zoomed_class(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from chestct.data.synthetic import generate_synthetic
    from helpers import zoom_out_file

    # CHESTCT_DATA unset: the embedded synthetic default at the tiny project's sizes.
    root = project_copy(tmp_path / "project")
    monkeypatch.delenv("CHESTCT_DATA", raising=False)
    book = execute("03-acquisition-shortcut.ipynb", {"CHESTCT_ROOT": str(root)}, monkeypatch)
    text = _text(book)
    assert "source:  synthetic" in text
    assert "56 slices measured, 0 undecodable" in text  # 4 classes x (8 + 3 + 3)
    assert "-> no shortcut at validate.shortcut_margin 0.15" in text
    assert _pictures(book) >= 2  # the body boxes and the distributions

    # One class drawn at 60 % zoom with a black margin: the notebook shows the shortcut.
    data = tmp_path / "zoomed"
    generate_synthetic(data, 7, {"train": 10, "valid": 2, "test": 2})
    for path in (data / split / "normal" for split in ("train", "valid", "test")):
        for image in path.glob("*.png"):
            zoom_out_file(image, 0.6)
    env = {"CHESTCT_ROOT": str(root), "CHESTCT_DATA": str(data)}
    text = _text(execute("03-acquisition-shortcut.ipynb", env, monkeypatch))
    assert f"source:  {data}" in text
    assert "-> a shortcut at validate.shortcut_margin 0.15" in text
    assert "best single features: body_share" in text


@pytest.mark.e2e
@pytest.mark.slow
def test_near_copies_notebook_runs_on_synthetic_folders_and_shows_the_run(
    reproduced: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No CHESTCT_NEAR_COPY_DATA and no ../shared beside the copy: synthetic folders, as in CI.
    monkeypatch.delenv("CHESTCT_NEAR_COPY_DATA", raising=False)
    book = execute("04-near-copies.ipynb", {"CHESTCT_ROOT": str(reproduced)}, monkeypatch)
    text = _text(book)
    assert "near-copy threshold (base.near_copy_similarity): 0.9" in text
    assert "train: 60 distinct slices; valid: 20 slices after de-duplication" in text
    assert "memorizer accuracy" in text and "novel part:" in text
    assert _pictures(book) >= 1  # the three distributions and the threshold
    # The tiny run's metrics, beside its memorizer.
    metrics = json.loads((reproduced / "reports/evaluate/metrics.json").read_text())
    assert "1 metrics file(s): project test" in text
    assert f"{metrics['baseline']['nearest_neighbour']['macro_f1']:.6f}"[:5] in text
