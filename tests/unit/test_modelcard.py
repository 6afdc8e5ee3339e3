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
