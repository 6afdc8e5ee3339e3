"""A model folder's card read with its promotion record, and the version that follows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chestct.modelcard import card_version, with_promotion

CARD = {"name": "chestct", "model_sha256": "ab" * 32, "classes": ["a"]}


def test_promotion_adds_the_registry_version_and_the_card_wins(tmp_path: Path) -> None:
    promotion = {"version": "3", "mlflow_run_ids": {"train": "t"}, "name": "other"}
    (tmp_path / "promotion.json").write_text(json.dumps(promotion), encoding="utf-8")
    card, raw = with_promotion(tmp_path, CARD)
    assert card["version"] == "3" and card["mlflow_run_ids"] == {"train": "t"}
    assert card["name"] == "chestct"  # the card's own keys are never overridden
    assert raw == (tmp_path / "promotion.json").read_bytes()
    assert card_version(card) == "3"


def test_without_promotion_the_version_is_the_model_digest(tmp_path: Path) -> None:
    """A model/ pulled from a DVC remote: every replica and report names it alike."""
    card, raw = with_promotion(tmp_path, CARD)
    assert card == CARD and raw == b""
    assert card_version(card) == "sha256-" + "ab" * 6


@pytest.mark.parametrize("content", [b"{", b"[1]"])
def test_a_broken_promotion_record_is_refused(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "promotion.json").write_bytes(content)
    with pytest.raises(ValueError, match=r"promotion\.json is not"):
        with_promotion(tmp_path, CARD)


def test_a_promotion_record_of_another_model_is_ignored(tmp_path: Path) -> None:
    """After `dvc checkout` restores an older model/, promotion.json (not tracked by DVC) is
    the experiment's: its version must not be reported for the restored model."""
    stale = {"model_sha256": "cd" * 32, "version": "7"}
    (tmp_path / "promotion.json").write_text(json.dumps(stale), encoding="utf-8")
    card, raw = with_promotion(tmp_path, CARD)
    assert card == CARD and raw == b""
    assert card_version(card) == "sha256-" + "ab" * 6
    own = {"model_sha256": CARD["model_sha256"], "version": "8"}
    (tmp_path / "promotion.json").write_text(json.dumps(own), encoding="utf-8")
    assert card_version(with_promotion(tmp_path, CARD)[0]) == "8"


def test_model_card_types_a_card_and_gives_it_back_unchanged(tmp_path: Path) -> None:
    from chestct.modelcard import ModelCard

    card = {
        **CARD,
        "image_size": 64,
        "temperature": 1.5,
        "thresholds": {"abstain_entropy": 0.8, "abstain_rule": "q"},
        "ood": {"method": "mahalanobis_gap", "file": "ood.npz", "sha256": "cd" * 32}
        | {"threshold": 9},
        "display_names": {"a": "A"},
        "future_key": [1, 2],
    }
    typed = ModelCard.from_dict(card)
    assert typed.classes == ("a",) and typed.image_size == 64 and typed.temperature == 1.5
    assert typed.abstain_entropy == 0.8 and typed.display_name("a") == "A"
    assert typed.ood is not None and typed.ood.file == "ood.npz" and typed.ood.sha256 == "cd" * 32
    assert typed.ood.number("threshold", "ood") == 9.0
    assert typed.cam is None and typed.version == "sha256-" + "ab" * 6
    assert typed.to_dict() == card  # cards round-trip, keys it does not type included


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"classes": None}, "classes"),
        ({"temperature": "1.5"}, "temperature must be a number"),
        ({"thresholds": {"abstain_entropy": True}}, "thresholds.abstain_entropy"),
        ({"cam": "cam_head.npz"}, "cam must be an object"),
    ],
)
def test_model_card_names_the_bad_key(change: dict, message: str) -> None:
    from chestct.modelcard import ModelCard

    card = {**CARD, "image_size": 64, **change}
    if change.get("classes", "") is None:
        del card["classes"]
    with pytest.raises(ValueError, match=message):
        ModelCard.from_dict(card)
