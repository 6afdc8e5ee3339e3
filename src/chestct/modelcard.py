"""What a model folder says about its model: the card (model.json) read together with the
promotion record beside it (promotion.json), and the version that follows from both.

promote writes model.json with only what the candidate's inputs determine (DVC hashes it) and
promotion.json with the registry version, MLflow run ids and time (.dvcignore keeps it out of
DVC). A folder pulled from a DVC remote has no promotion.json, and one whose promotion.json
belongs to another model (its `model_sha256` differs, e.g. after `dvc checkout`) is read without
it; the version is then the model's content digest, so that every replica and report names it
alike. `ModelCard` is the card as one typed record: promote checks what it writes through it
and the inference core (chestct.inference) reads folders with it. Its `preprocessing` is the
one chestct.imaging.preparation.Preprocessing value (card keys `image_size` and
`preprocessing`), which is why the card stands above imaging (docs/architecture.md).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chestct.imaging.preparation import Preprocessing

CARD_NAME = "model.json"
PROMOTION_NAME = "promotion.json"
# A card's map of further files, {name: sha256}, for a model family whose files need no entry
# object of their own; every name in it is checked like the files the entries name.
FILES_KEY = "files"


def with_promotion(folder: Path, card: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
    """The card with promotion.json's keys added (the card wins on a clash), and its bytes.

    Raises:
        ValueError: promotion.json exists but is not a JSON object.
    """
    try:
        raw = (folder / PROMOTION_NAME).read_bytes()
    except FileNotFoundError:
        return card, b""
    promotion = _json_object(raw, PROMOTION_NAME)
    if promotion.get("model_sha256") not in (None, card.get("model_sha256")):
        # A record left from another model (model/ was restored by `dvc checkout` or pulled
        # over): its version and runs describe that model, not this one.
        return card, b""
    return {**promotion, **card}, raw


def read_card(folder: Path) -> tuple[ModelCard, bytes]:
    """A model folder's card with promotion.json's keys added, and the bytes both came from
    (their digest tells one installed card from another).

    Raises:
        FileNotFoundError: the folder has no model.json.
        ValueError: model.json or promotion.json is not a JSON object, or the card is not a
            valid ModelCard (the message names the file or the key).
    """
    card_bytes = (folder / CARD_NAME).read_bytes()
    merged, promotion_bytes = with_promotion(folder, _json_object(card_bytes, CARD_NAME))
    return ModelCard.from_dict(merged), card_bytes + promotion_bytes


def _json_object(data: bytes, name: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{name} is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{name} is not a JSON object")
    return value


def card_version(card: dict[str, Any]) -> str:
    """The registry version, else `sha256-` and the first 12 digits of the model's digest."""
    if card.get("version") is not None:
        return str(card["version"])
    return f"sha256-{str(card.get('model_sha256') or 'unknown')[:12]}"


@dataclass(frozen=True)
class FileEntry:
    """An entry of the card that names a file in the model folder (inference, cam, ood,
    monitoring): the file's name, its sha256 (None when the card does not pin it) and the
    entry's other keys (method, threshold, outputs, ...)."""

    file: Any  # checked as a plain file name when the folder is loaded
    sha256: str | None
    info: Mapping[str, Any]

    @classmethod
    def read(cls, card: Mapping[str, Any], key: str) -> FileEntry | None:
        entry = card.get(key)
        if entry is None:
            return None
        if not isinstance(entry, Mapping):
            raise ValueError(f"card key {key} must be an object, got {entry!r}")
        digest = entry.get("sha256")
        if digest is not None and not isinstance(digest, str):
            raise ValueError(f"card key {key}.sha256 must be a hex string, got {digest!r}")
        return cls(entry.get("file"), digest or None, entry)

    def number(self, key: str, where: str) -> float | None:
        """A numeric key of the entry (None when absent)."""
        return _number(self.info.get(key), f"{where}.{key}")


@dataclass(frozen=True)
class ModelCard:
    """model.json (with promotion.json's keys) as one typed record.

    promote builds the card as a JSON object and checks it through `from_dict` before writing
    it; the inference core reads folders with `from_dict`. `to_dict()` gives the JSON back
    unchanged, so cards written before this type existed load and round-trip as they are.
    """

    name: str
    version: str
    classes: tuple[str, ...]
    display_names: Mapping[str, str]
    preprocessing: Preprocessing  # the card's image_size and preprocessing entries
    model_file: str
    model_sha256: str | None
    temperature: float | None
    abstain_entropy: float | None
    inference: FileEntry | None
    cam: FileEntry | None
    ood: FileEntry | None
    monitoring: FileEntry | None
    metrics: Mapping[str, Any] | None
    family: str  # cnn | texture | ensemble (chestct.model.families); cards before families: cnn
    texture: FileEntry | None  # the ensemble's texture member (texture.skops)
    mlflow_run_ids: Mapping[str, Any]
    promoted_at: str | None
    intended_use: str
    raw: Mapping[str, Any] = field(repr=False)
    # Every file the card lists, by name (see `card_files`).
    files: Mapping[str, ListedFile] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, card: Mapping[str, Any]) -> ModelCard:
        """Check and type a card.

        Raises:
            ValueError: naming the key that is missing or has the wrong type.
        """
        if not isinstance(card, Mapping):
            raise ValueError(f"a model card is a JSON object, got {type(card).__name__}")
        try:
            classes = tuple(str(c) for c in card["classes"])
            size = int(card["image_size"])
        except KeyError as exc:
            raise ValueError(f"card key {exc.args[0]} is missing") from None
        except (TypeError, ValueError) as exc:
            raise ValueError(f"card classes / image_size are not valid ({exc})") from None
        if not classes or size < 1:
            raise ValueError("card needs at least one class and an image_size >= 1")
        names = card.get("display_names", {})
        thresholds = card.get("thresholds", {})
        for key, value in (
            ("display_names", names),
            ("thresholds", thresholds),
        ):
            if not isinstance(value, Mapping):
                raise ValueError(f"card key {key} must be an object, got {value!r}")
        runs = card.get("mlflow_run_ids") or {}
        abstain = thresholds.get("abstain_entropy")
        return cls(
            name=str(card.get("name", "chestct")),
            version=card_version(dict(card)),
            classes=classes,
            display_names=names,
            preprocessing=Preprocessing.from_card(card),
            model_file=str(card.get("model_file", "model.keras")),
            model_sha256=card.get("model_sha256"),
            temperature=_number(card.get("temperature"), "temperature"),
            abstain_entropy=_number(abstain, "thresholds.abstain_entropy"),
            inference=FileEntry.read(card, "inference"),
            cam=FileEntry.read(card, "cam"),
            ood=FileEntry.read(card, "ood"),
            monitoring=FileEntry.read(card, "monitoring"),
            metrics=card.get("metrics"),
            family=_family(card.get("family", "cnn")),
            texture=FileEntry.read(card, "texture"),
            mlflow_run_ids=runs if isinstance(runs, Mapping) else {},
            promoted_at=card.get("promoted_at"),
            intended_use=str(
                card.get("intended_use", "research and education only; not a medical device")
            ),
            raw=card,
            files=card_files(card),
        )

    def to_dict(self) -> dict[str, Any]:
        """The card as JSON, exactly as it was read or built."""
        return dict(self.raw)

    def display_name(self, cls: str) -> str:
        return str(self.display_names.get(cls, cls))

    @property
    def image_size(self) -> int:
        return self.preprocessing.size

    @property
    def train_run_id(self) -> str | None:
        return self.mlflow_run_ids.get("train")


def plain_name(name: Any, key: str) -> str:
    """`name` when it is a plain file name inside the model folder, else ValueError naming
    the card key (no folders, no hidden files, nothing that could leave the folder)."""
    if (
        not isinstance(name, str)
        or not name
        or name in (CARD_NAME, PROMOTION_NAME)
        or name.startswith(".")
        or any(c in name for c in "/\\\0")
    ):
        raise ValueError(f"card key {key} must be a plain file name in the folder, got {name!r}")
    return name


@dataclass(frozen=True)
class ListedFile:
    """A file the card lists: the sha256 it pins (None: not pinned) and the card key that pins
    it (`model_sha256`, `cam.sha256`, `files.<name>`), for messages."""

    sha256: str | None
    key: str


def card_files(card: Mapping[str, Any]) -> dict[str, ListedFile]:
    """Every file a card lists, by name, with the sha256 it pins: `model_file` (pinned by
    `model_sha256`), every top-level entry object with a `file` key (inference, cam, ood,
    monitoring, and any model family's own entry) and the `files` map {name: sha256}.

    The one list the inference core checks a folder against: a new family's files are checked
    as soon as the card names them in either form.

    Raises:
        ValueError: a name that is not a plain file name, a sha256 that is not a string, or one
            file pinned to two different digests.
    """
    listed: list[tuple[str, str, Any]] = [
        (
            "model_sha256",
            plain_name(card.get("model_file", "model.keras"), "model_file"),
            card.get("model_sha256"),
        )
    ]
    for key, entry in card.items():
        if isinstance(entry, Mapping) and "file" in entry and key != FILES_KEY:
            name = plain_name(entry["file"], f"{key}.file")
            listed.append((f"{key}.sha256", name, entry.get("sha256")))
    extra = card.get(FILES_KEY, {})
    if not isinstance(extra, Mapping):
        raise ValueError(f"card key {FILES_KEY} must be an object {{name: sha256}}, got {extra!r}")
    for name, digest in extra.items():
        listed.append((f"{FILES_KEY}.{name}", plain_name(name, f"{FILES_KEY} key"), digest))
    files: dict[str, ListedFile] = {}
    for key, name, digest in listed:
        if digest is not None and not (
            isinstance(digest, str) and len(digest) == 64 and _is_hex(digest)
        ):
            raise ValueError(f"card key {key} must be a sha256 (64 hex digits), got {digest!r}")
        pinned = digest.lower() if digest else None
        before = files.get(name)
        if before is not None and None not in (before.sha256, pinned) and before.sha256 != pinned:
            raise ValueError(f"card pins {name} to two sha256 digests ({before.key}, {key})")
        if before is None or before.sha256 is None:
            files[name] = ListedFile(pinned, key)
    return files


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdefABCDEF" for c in text)


def _family(value: Any) -> str:
    if value not in ("cnn", "texture", "ensemble"):
        raise ValueError(f"card key family must be cnn, texture or ensemble, got {value!r}")
    return str(value)


def _number(value: Any, key: str) -> float | None:
    """A card number (None when absent); booleans and strings are refused."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"card key {key} must be a number, got {value!r}")
    return float(value)
