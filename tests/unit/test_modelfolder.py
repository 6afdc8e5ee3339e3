"""chestct.modelfolder: the one writer of a model folder (promote, the tests' and the bench's
folders), and the stress-set identity a card records."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from chestct.fsutil import sha256_file
from chestct.imaging.preparation import Preprocessing
from chestct.labels import CLASSES
from chestct.model.calibration import Mahalanobis
from chestct.modelcard import ModelCard, read_card
from chestct.modelfolder import (
    OOD_FILE,
    ModelFolderError,
    ood_bytes,
    pin_digests,
    write_model_folder,
)


def card(**extra: Any) -> dict[str, Any]:
    return {
        "classes": list(CLASSES),
        **Preprocessing(32, crop="body", window=(-600.0, 1500.0)).to_card(),
        "model_file": "model.keras",
        "ood": {"method": "mahalanobis_gap", "file": OOD_FILE, "threshold": 3.0},
        **extra,
    }


def parts(tmp_path: Path, text: str = "weights") -> dict[str, Path | bytes]:
    model = tmp_path / f"{text}.keras"
    model.write_text(text, encoding="utf-8")
    stats = Mahalanobis.fit(np.random.default_rng(0).normal(size=(12, 4)))
    return {"model.keras": model, OOD_FILE: ood_bytes(stats)}


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}")]


def test_the_writer_pins_every_file_and_the_card_reads_back(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    written = write_model_folder(folder, card(), parts(tmp_path), promotion={"version": "3"})
    assert sorted(p.name for p in folder.iterdir()) == [
        "model.json",
        "model.keras",
        OOD_FILE,
        "promotion.json",
    ]
    assert written == json.loads((folder / "model.json").read_text(encoding="utf-8"))
    assert written["ood"]["sha256"] == sha256_file(folder / OOD_FILE)
    assert written["model_sha256"] == sha256_file(folder / "model.keras")
    typed, _ = read_card(folder)
    assert typed.version == "3"
    assert typed.preprocessing == Preprocessing(32, crop="body", window=(-600.0, 1500.0))
    assert all((folder / name).stat().st_mode & 0o777 == 0o644 for name in typed.files)
    assert leftovers(folder) == []


def test_the_writer_replaces_a_folder_and_puts_it_back_when_recording_fails(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "model"
    write_model_folder(folder, card(version="1"), parts(tmp_path, "one"))
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def failing() -> None:
        raise RuntimeError("the registry is down")

    with pytest.raises(RuntimeError, match="registry is down"):
        write_model_folder(folder, card(version="2"), parts(tmp_path, "two"), after_swap=failing)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    write_model_folder(folder, card(version="2"), parts(tmp_path, "two"))
    assert (folder / "model.keras").read_text(encoding="utf-8") == "two"
    assert leftovers(folder) == []


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"preprocessing": {"crop": "ribs"}}, "card preprocessing.crop 'ribs'"),
        ({"cam": {"file": "cam_head.npz"}}, "names cam_head.npz, which the folder would not"),
        ({"classes": []}, "at least one class"),
    ],
)
def test_the_writer_refuses_a_card_the_predictor_would_refuse(
    tmp_path: Path, bad: dict[str, Any], message: str
) -> None:
    folder = tmp_path / "model"
    with pytest.raises(ModelFolderError, match=message):
        write_model_folder(folder, {**card(), **bad}, parts(tmp_path))
    assert not folder.exists() and leftovers(folder) == []


def test_ood_file_holds_the_products_fit(tmp_path: Path) -> None:
    features = np.random.default_rng(1).normal(size=(6, 10))  # fewer images than features
    stats = Mahalanobis.fit(features)
    with np.load(io.BytesIO(ood_bytes(stats))) as npz:
        np.testing.assert_array_equal(npz["mean"], stats.mean)
        np.testing.assert_array_equal(npz["precision"], stats.precision)
    # Ledoit-Wolf shrinkage, not a ridge on np.cov: the precision is of the shrunk covariance.
    from sklearn.covariance import LedoitWolf

    np.testing.assert_allclose(stats.precision, LedoitWolf().fit(features).precision_)


def test_pin_digests_names_files_by_the_card_keys(tmp_path: Path) -> None:
    extra = tmp_path / "extra.bin"
    extra.write_bytes(b"x")
    pinned = pin_digests(
        {"files": {"extra.bin": None}, "cam": {"file": "extra.bin"}}, {"extra.bin": extra}
    )
    assert pinned["files"]["extra.bin"] == pinned["cam"]["sha256"] == sha256_file(extra)
    ModelCard.from_dict({**card(), **pinned})  # a card the predictor reads


# --------------------------------------------------------------------------- stress-set identity


def frame(*digests: str) -> pd.DataFrame:
    return pd.DataFrame({"sha256": list(digests)})


def test_the_stress_set_identity_follows_the_items_and_the_conditions(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from chestct.evaluation import scoring
    from chestct.imaging import perturb

    one = scoring.stress_set(frame("a", "b", "c"))
    assert one == scoring.stress_set(frame("c", "a", "b"))  # the order of rows does not count
    assert one["items"] == 3 and one["shifts"] == list(perturb.SHIFT_NAMES)
    assert scoring.stress_set(frame("a", "b"))["digest"] != one["digest"]  # other items
    changed = (perturb.Shift("zoom_80", "slice at 75 % of the frame", perturb.SHIFTS[0].apply),)
    monkeypatch.setattr(scoring, "SHIFTS", changed + perturb.SHIFTS[1:])
    assert scoring.stress_set(frame("a", "b", "c"))["digest"] != one["digest"]  # other conditions
    json.dumps(one)  # recorded in the card as it is
