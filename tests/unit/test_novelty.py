"""chestct.evaluation.novelty: the memorizer baseline and the near-copy / novel split, on slices
built
here: near-copies are noisy copies of training slices, novel slices are new drawings."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from chestct.data.similarity import thumbnails
from chestct.evaluation import novelty
from chestct.labels import CLASSES


def _slice(seed: int, side: int = 96) -> np.ndarray:
    """A dark frame holding an ellipse 'body' filled with smooth random anatomy: two seeds
    correlate below 0.8 (other patients), as chestct.data.similarity measures it."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:side, :side]
    body = ((yy - side / 2) / (side * 0.35)) ** 2 + ((xx - side / 2) / (side * 0.42)) ** 2 < 1
    field = cv2.GaussianBlur(rng.normal(0, 1, (side, side)), (0, 0), 5)
    field = (field - field.mean()) / field.std()
    grey = np.zeros((side, side), np.uint8)
    grey[body] = np.clip(128 + 60 * field[body], 0, 255)
    return grey


def _near_copy(grey: np.ndarray, seed: int) -> np.ndarray:
    """Another 'slice of the same series': the same anatomy, a little noise and a grey gain."""
    noise = np.random.default_rng(seed).normal(0, 4, grey.shape)
    return np.clip(grey.astype(np.float64) * 0.9 + 10 + noise, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def world() -> dict:
    train = [_slice(s) for s in range(12)]
    labels = [CLASSES[s % 4] for s in range(12)]
    reference = novelty.TrainReference(thumbnails(train), labels, threshold=0.9)
    # 6 near-copies of train slices 0..5, then 4 novel slices (new seeds).
    query = [_near_copy(train[s], 100 + s) for s in range(6)] + [
        _slice(1000 + s) for s in range(4)
    ]
    y = np.asarray([s % 4 for s in range(6)] + [0, 1, 2, 3])
    return {"reference": reference, "query": query, "y": y, "train": train}


def _onehot(indices: np.ndarray) -> np.ndarray:
    return np.eye(len(CLASSES))[indices] * 0.9 + 0.025


def test_assess_splits_near_copies_from_novel_slices(world) -> None:
    thumbs = thumbnails(world["query"])
    y = world["y"]
    model = y.copy()
    model[6:8] = (y[6:8] + 1) % 4  # the model misses 2 of the 4 novel slices
    groups = novelty.item_groups(None, thumbs, 0.9)
    found = novelty.assess(world["reference"], thumbs, y, _onehot(model), _onehot(model), groups)
    sim = found.columns["nearest_train_similarity"]
    assert (sim[:6] >= 0.9).all() and (sim[6:] < 0.9).all()
    assert found.columns["near_copy"].tolist() == [True] * 6 + [False] * 4
    m = found.metrics
    assert m["near_copy_share"] == pytest.approx(0.6)
    assert m["near_copy"]["n"] == 6 and m["novel"]["n"] == 4
    # The memorizer copies the label of the training slice a near-copy came from.
    assert m["near_copy"]["baseline"]["nearest_neighbour"]["accuracy"] == 1.0
    assert found.columns["memorizer"][:6] == [CLASSES[s % 4] for s in range(6)]
    assert m["near_copy"]["accuracy"] == 1.0
    assert m["novel"]["accuracy"] == pytest.approx(0.5)
    overall_memo = m["baseline"]["nearest_neighbour"]["accuracy"]
    assert m["baseline"]["model_above"]["accuracy"] == pytest.approx(0.8 - overall_memo)
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "ece", "ece_calibrated"):
        assert m["ci"][key]["low"] <= m["ci"][key]["high"]
    assert m["ci"]["resamples"] == 1000 and m["ci"]["groups"] == len(set(groups))
    json.dumps(m)  # plain JSON: what metrics.json and MLflow get


def test_all_novel_set_reports_an_empty_near_copy_part(world) -> None:
    thumbs = thumbnails(world["query"][6:])
    y = world["y"][6:]
    found = novelty.assess(
        world["reference"], thumbs, y, _onehot(y), _onehot(y), [str(i) for i in range(4)]
    )
    assert found.metrics["near_copy_share"] == 0.0
    assert found.metrics["near_copy"] == {"n": 0}
    assert found.metrics["novel"]["macro_f1"] == 1.0
    assert "novel part (4)" in novelty.describe(found.metrics)


def test_assess_checks_lengths(world) -> None:
    thumbs = thumbnails(world["query"])
    with pytest.raises(ValueError, match="10 thumbnails for 3 scored items"):
        novelty.assess(world["reference"], thumbs, world["y"][:3], None, None, [])


def test_item_groups_prefer_the_manifest_then_series(world) -> None:
    series = [world["train"][0], _near_copy(world["train"][0], 1), *world["train"][5:8]]
    thumbs = thumbnails(series)
    by_similarity = novelty.item_groups(pd.DataFrame({"path": list("abcde")}), thumbs, 0.9)
    assert by_similarity[0] == by_similarity[1] != by_similarity[2]
    assert len(set(by_similarity)) == 4
    assert by_similarity[0].startswith("series:")
    frame = pd.DataFrame({"group": [7, 8, 8, 9, 9]})
    expected = ["manifest:7", "manifest:8", "manifest:8", "manifest:9", "manifest:9"]
    assert novelty.item_groups(frame, thumbs, 0.9) == expected
    # One component over most of the set is no series (the threshold does not separate this
    # data): every slice is resampled alone.
    alike = thumbnails([_near_copy(world["train"][0], s) for s in range(4)] + [series[2]])
    assert novelty.item_groups(None, alike, 0.9) == [f"slice:{i}" for i in range(5)]


def test_frame_thumbnails_read_the_ingested_originals(world, tmp_path: Path) -> None:
    """The memorizer sees what serving sees: the original slice, not the resized copy."""
    original, resized = tmp_path / "orig.png", tmp_path / "small.png"
    cv2.imwrite(str(original), world["train"][3])
    cv2.imwrite(str(resized), np.zeros((16, 16), np.uint8))
    frame = pd.DataFrame({"path": ["small.png"], "original": ["orig.png"]})
    thumbs = novelty.frame_thumbnails(frame, tmp_path)
    assert float(thumbs[0] @ world["reference"].thumbs[3]) == pytest.approx(1.0, abs=1e-5)


def test_measure_cli_reports_memorizer_and_near_copy_share(world, tmp_path: Path, capsys) -> None:
    for split, slices, labels in (
        ("train", world["train"], [s % 4 for s in range(12)]),
        ("query", world["query"], list(world["y"])),
    ):
        for i, (grey, c) in enumerate(zip(slices, labels, strict=True)):
            folder = tmp_path / split / CLASSES[c]
            folder.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(folder / f"{i}.png"), grey)
    # A byte-identical copy of a train file is dropped from the query, as de-duplication does.
    (tmp_path / "query" / CLASSES[0] / "copy.png").write_bytes(
        (tmp_path / "train" / CLASSES[0] / "0.png").read_bytes()
    )
    assert (
        novelty.main([str(tmp_path / "train"), str(tmp_path / "query"), "--resamples", "50"]) == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["query_files"] == 10
    assert report["near_copy_share"] == pytest.approx(0.6)
    assert report["train_to_other_class"]["median"] < 0.9
    with pytest.raises(SystemExit):
        novelty.main([str(tmp_path / "nowhere"), str(tmp_path / "query")])


def test_research_structure_and_run_rows(world, tmp_path: Path) -> None:
    from chestct.research import near_copies as nc

    for split, slices, labels in (
        ("train", world["train"], [s % 4 for s in range(12)]),
        ("valid", world["query"], list(world["y"])),
    ):
        for i, (grey, c) in enumerate(zip(slices, labels, strict=True)):
            folder = tmp_path / split / CLASSES[c]
            folder.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(folder / f"{i}.png"), grey)
    s = nc.structure(tmp_path / "train", tmp_path / "valid", 0.9)
    assert len(s.train_to_train) == 12 and len(s.query_to_train) == 10
    shares = nc.threshold_table(s)
    assert shares.loc["query -> train", ">= 0.90"] == pytest.approx(0.6)
    assert shares.loc["train -> train of another class", ">= 0.90"] == 0.0
    table = nc.memorizer_table(s)
    assert table.loc["near_copy", "accuracy"] == 1.0 and table.loc["novel", "n"] == 4
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"n": 10, "macro_f1": 0.8, **s.memorizer}), encoding="utf-8")
    rows = nc.run_rows({"run": metrics, "missing": tmp_path / "none.json"})
    assert list(rows.index) == ["run"]
    assert rows.loc["run", "near_copy_share"] == pytest.approx(0.6)
    assert rows.loc["run", "novel n"] == 4
