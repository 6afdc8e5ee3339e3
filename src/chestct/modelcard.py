"""What a model folder says about its model: the card (model.json) read together with the
promotion record beside it (promotion.json), and the version that follows from both.

promote writes model.json with only what the candidate's inputs determine (DVC hashes it) and
promotion.json with the registry version, MLflow run ids and time (.dvcignore keeps it out of
DVC). A folder pulled from a DVC remote has no promotion.json, and one whose promotion.json
belongs to another model (its `model_sha256` differs, e.g. after `dvc checkout`) is read without
it; the version is then the model's content digest, so that every replica and report names it
alike.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PROMOTION_NAME = "promotion.json"


def with_promotion(folder: Path, card: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
    """The card with promotion.json's keys added (the card wins on a clash), and its bytes.

    Raises:
        ValueError: promotion.json exists but is not a JSON object.
    """
    try:
        raw = (folder / PROMOTION_NAME).read_bytes()
    except FileNotFoundError:
        return card, b""
    try:
        promotion = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{PROMOTION_NAME} is not valid JSON ({exc})") from None
    if not isinstance(promotion, dict):
        raise ValueError(f"{PROMOTION_NAME} is not a JSON object")
    if promotion.get("model_sha256") not in (None, card.get("model_sha256")):
        # A record left from another model (model/ was restored by `dvc checkout` or pulled
        # over): its version and runs describe that model, not this one.
        return card, b""
    return {**promotion, **card}, raw


def card_version(card: dict[str, Any]) -> str:
    """The registry version, else `sha256-` and the first 12 digits of the model's digest."""
    if card.get("version") is not None:
        return str(card["version"])
    return f"sha256-{str(card.get('model_sha256') or 'unknown')[:12]}"
