"""A promoted model folder loaded and checked: every file pinned by its sha256 in the card, read
through one directory handle so a swapped folder is seen whole (`load_folder`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from chestct import modelcard
from chestct.fsutil import sha256_bytes, sha256_file
from chestct.inference.artefact import (
    cnn_temperature_of,
    dropout_rate_of,
    ensemble_runner,
    file_identity,
    keras_runner,
    litert_runner,
    open_texture,
    texture_runner,
)
from chestct.inference.loaded import (
    DEFAULT_WINDOW,
    HEAD_TOLERANCE,
    Loaded,
    ModelNotReady,
    ModelRefused,
    OodModel,
    Outputs,
)
from chestct.model.calibration import Mahalanobis, softmax
from chestct.model.gradcam import CamHead
from chestct.model.texture import (
    TextureModel,
)
from chestct.modelcard import CARD_NAME, FileEntry, ListedFile, ModelCard
from chestct.monitoring.signals import check_reference

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _folder(model_dir: Path) -> Iterator[Path]:
    """A path into the folder as it is now: /proc/self/fd/<dirfd> pins the folder's inode, so
    a concurrent swap of model/ cannot mix files of two versions."""
    try:
        fd = os.open(model_dir, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        raise ModelNotReady(
            f"{model_dir} does not exist; run `make run` to train and promote a model"
        ) from None
    except NotADirectoryError:
        raise ModelRefused(f"{model_dir} is not a folder") from None
    try:
        pinned = Path(f"/proc/self/fd/{fd}")
        yield pinned if pinned.is_dir() else model_dir
    finally:
        os.close(fd)


class ModelFiles:
    """The files a card lists (`ModelCard.files`), each checked against its sha256 before it
    is read; a name the card does not list is refused.

    `check` hashes every listed file when the folder is loaded (a file of a model family that
    this code does not read is checked all the same); `path` and `read` hand a file out and
    hash it again when it changed since (or hash the very bytes handed out). A card that pins
    no digest for a file (older cards; promote pins every file) is served with a note.
    """

    def __init__(self, folder: Path, card: ModelCard) -> None:
        self.folder = folder
        self.listed = dict(card.files)
        self._seen: dict[str, tuple[int, ...]] = {}

    def check(self, optional: tuple[str, ...] = ()) -> list[str]:
        """Hash every listed file now; the names of those the card does not pin.

        Args:
            optional: names that may be absent when the card does not pin them (model.keras,
                which a LiteRT card reads only for its dropout rate).
        """
        unpinned = []
        for name, listed in self.listed.items():
            if listed.sha256 is None:
                unpinned.append(name)
                if name in optional and not (self.folder / name).exists():
                    continue
            self.path(name, name)
        return unpinned

    def path(self, name: Any, what: str) -> Path:
        """The checked path of a listed file."""
        path, listed = self._listed(name, what)
        if listed.sha256 is not None:
            identity = file_identity(path)
            if self._seen.get(name) != identity:
                self._compare(name, listed, sha256_file(path))
                self._seen[name] = identity
        return path

    def read(self, name: Any, what: str) -> bytes:
        """A listed file's bytes, hashed as read (what is parsed is what was checked)."""
        path, listed = self._listed(name, what)
        data = path.read_bytes()
        if listed.sha256 is not None:
            self._compare(name, listed, sha256_bytes(data))
        return data

    def _listed(self, name: Any, what: str) -> tuple[Path, ListedFile]:
        if not isinstance(name, str) or name not in self.listed:
            raise ModelRefused(
                f"{what} names {name!r}, a file the card does not list (card files: "
                f"{', '.join(sorted(self.listed))}); refusing to read it"
            )
        path = self.folder / name
        if not path.is_file():
            raise ModelRefused(f"{what} names {name!r}, which is not in the model folder")
        return path, self.listed[name]

    @staticmethod
    def _compare(name: str, listed: ListedFile, actual: str) -> None:
        if actual != listed.sha256:
            raise ModelRefused(
                f"{name} does not match its sha256 in the card ({listed.key} "
                f"{listed.sha256!s:.16}…, file {actual[:16]}…): a partial copy or a file from "
                "another model; promote the model again"
            )


def read_card(folder: Path) -> tuple[ModelCard, bytes]:
    """The folder's card (chestct.modelcard.read_card) and the bytes it was read from.

    Raises:
        ModelNotReady: no model.json.
        ModelRefused: a card or promotion record that is not valid (the message says which).
    """
    try:
        return modelcard.read_card(folder)
    except FileNotFoundError:
        raise ModelNotReady(f"{CARD_NAME} not found; run `make run` to promote a model") from None
    except ValueError as exc:
        raise ModelRefused(f"not a valid model card: {exc}") from None


def load_folder(
    model_dir: Path, threads: int = 1, default_window: tuple[float, float] = DEFAULT_WINDOW
) -> Loaded:
    """Read, check and warm up the model in `model_dir`.

    Args:
        model_dir: the model folder (card + files it names).
        threads: LiteRT interpreter threads.
        default_window: DICOM window (level, width) when the card names none: params
            ingest.window.

    Raises:
        ModelNotReady: no folder or no card.
        ModelRefused: a card or file that is malformed, truncated or inconsistent.
    """
    with _folder(model_dir) as folder:
        try:
            card, identity_bytes = read_card(folder)
        except ModelNotReady:
            raise ModelNotReady(
                f"{model_dir / CARD_NAME} not found; run `make run` to promote a model"
            ) from None
        prep = card.preprocessing  # checked when the card was read (Preprocessing.from_card)
        notes: list[str] = []
        if prep.window is None:
            prep = dataclasses.replace(prep, window=default_window)
            notes.append("card has no preprocessing.window: DICOM uses params ingest.window")

        # Every file the card lists is hashed now, before any is read; each read goes through
        # `files`, which refuses a name the card does not list.
        files = ModelFiles(folder, card)
        unpinned = files.check(optional=(card.model_file,))
        if unpinned:
            notes.append(
                f"card gives no sha256 for {', '.join(unpinned)}: those files are not checked"
            )
        runner, head, tex, backend = _runner_of(card, files, threads, notes)
        head = _cam_head(card, files, head, notes)

        ood = _ood(files, card.ood) if card.ood is not None else None
        if ood is None:
            notes.append("card has no `ood` entry: only the input checks guard against strangers")

        temperature, threshold = _calibration_of(card, notes)
        if card.family == "cnn" and (folder / card.model_file).is_file():
            # Served with every uncertainty answer: read from the checked bytes only.
            dropout = dropout_rate_of(files.path(card.model_file, "model_file"))
        else:
            dropout = 0.0
            if card.family == "cnn":
                notes.append(f"{card.model_file} is not in the folder: no MC-dropout")
        reference = _reference(files, card, notes)

        model = Loaded(
            card=card,
            card_sha=sha256_bytes(identity_bytes),
            classes=list(card.classes),
            preprocessing=prep,
            backend=backend,
            temperature=temperature,
            abstain_threshold=threshold,
            head=head,
            dropout_rate=dropout,
            ood=ood,
            notes=notes,
            runner=runner,
            reference=reference,
            family=card.family,
            texture=tex,
        )
        _warm_up(model)
        return model


def _runner_of(
    card: ModelCard, files: ModelFiles, threads: int, notes: list[str]
) -> tuple[Callable[[np.ndarray], Outputs], CamHead | None, TextureModel | None, str]:
    """What runs the card's model: the light artifact (LiteRT or skops, an ensemble's texture
    member beside it) or, for an old CNN card without one, Keras; with the head Keras gives,
    the texture model and the backend's name."""
    head: CamHead | None = None
    tex: TextureModel | None = None
    if card.inference is not None:
        light_path = files.path(card.inference.file, "inference.file")
        runtime = card.inference.info.get("runtime", "litert")
        if runtime not in ("litert", "skops"):
            raise ModelRefused(
                f"card inference.runtime {runtime!r} is not served here; use litert "
                "(cnn, ensemble) or skops (texture)"
            )
        if (runtime == "skops") != (card.family == "texture"):
            raise ModelRefused(
                f"card inference.runtime {runtime!r} does not serve family {card.family!r}"
            )
        if runtime == "skops":
            tex = open_texture(light_path)
            runner = texture_runner(tex)
        else:
            runner = litert_runner(light_path, card.inference.info, threads)
        if card.family == "ensemble":
            if card.texture is None:
                raise ModelRefused("an ensemble card needs a `texture` entry (its member)")
            tex = open_texture(files.path(card.texture.file, "texture.file"))
            runner = ensemble_runner(runner, tex, cnn_temperature_of(card))
        backend = runtime if card.family != "ensemble" else "litert+skops"
    elif card.family != "cnn":
        raise ModelRefused(f"a {card.family} card needs an `inference` entry")
    else:
        keras_path = files.path(card.model_file, "model_file")
        log.warning(
            "card has no `inference` entry: serving %s through Keras/TensorFlow "
            "(slower, about 700 MB per worker); promote a model with a light artifact",
            keras_path.name,
        )
        runner, head = keras_runner(keras_path)
        backend = "keras"
        notes.append("no light artifact in the card: served through Keras")
    return runner, head, tex, backend


def _cam_head(
    card: ModelCard, files: ModelFiles, head: CamHead | None, notes: list[str]
) -> CamHead | None:
    """The dense head for CAM and MC-dropout, from the card's `cam` file (else `head`)."""
    if card.cam is not None:
        head_data = files.read(card.cam.file, "cam.file")
        try:
            head = CamHead.load(io.BytesIO(head_data))
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
            raise ModelRefused(f"{card.cam.file} is not a readable head file ({exc})") from None
    elif head is None and card.family == "cnn":
        notes.append("card has no `cam` entry: /explain and MC-dropout are unavailable")
    return head


def _calibration_of(card: ModelCard, notes: list[str]) -> tuple[float, float | None]:
    """The card's temperature (1.0 when it names none) and abstain threshold."""
    temperature = card.temperature
    if temperature is None:
        temperature = 1.0
        notes.append("card has no temperature: probabilities are not calibrated")
    if temperature <= 0:
        raise ModelRefused(f"card temperature must be > 0, got {temperature}")
    threshold = card.abstain_entropy
    if threshold is None:
        notes.append("card has no thresholds.abstain_entropy: abstain is not decided")
    return temperature, threshold


def _ood(files: ModelFiles, entry: FileEntry) -> OodModel:
    """The OOD statistics the card names (evaluate's ood.npz) and the card's threshold."""
    if entry.info.get("method") != "mahalanobis_gap":
        raise ModelRefused(f"card ood.method {entry.info.get('method')!r} is not served")
    data = files.read(entry.file, "ood.file")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            mean = np.asarray(npz["mean"], np.float64)
            precision = np.asarray(npz["precision"], np.float64)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise ModelRefused(f"{entry.file} is not a readable OOD file ({exc})") from None
    try:
        threshold = entry.number("threshold", "ood")
    except ValueError as exc:
        raise ModelRefused(str(exc)) from None
    if threshold is None or precision.shape != (mean.size, mean.size):
        raise ModelRefused("card ood needs a threshold and a square precision matrix")
    return OodModel(Mahalanobis(mean, precision), threshold)


def _reference(files: ModelFiles, card: ModelCard, notes: list[str]) -> dict[str, Any] | None:
    """The reference profile the card names (`monitoring.file`, checked against its sha256)."""
    entry = card.monitoring
    if entry is None:
        notes.append("card has no `monitoring` entry: /metrics carries no drift figures")
        return None
    data = files.read(entry.file, "monitoring.file")
    try:
        return check_reference(json.loads(data), entry.file)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ModelRefused(f"{entry.file} is not a readable reference profile ({exc})") from None


def _warm_up(model: Loaded) -> None:
    """One pass on a synthetic slice: shapes, finiteness and head consistency, before serving."""
    yy, xx = np.mgrid[: model.image_size, : model.image_size]
    probe = (127 + 100 * np.sin(xx / 5.0) * np.cos(yy / 7.0)).astype(np.uint8)
    try:
        out = model.run(probe[None])
    except Exception as exc:  # interpreters raise RuntimeError/ValueError for bad models
        raise ModelRefused(f"the model fails on a test image ({exc})") from None
    k = len(model.classes)
    if out.probabilities.shape != (1, k) or out.features.ndim != 4:
        raise ModelRefused(
            f"model outputs probabilities {out.probabilities.shape} and features "
            f"{out.features.shape}; the card has {k} classes"
        )
    if not (np.isfinite(out.probabilities).all() and np.isfinite(out.features).all()):
        raise ModelRefused("model outputs NaN or infinity on a test image (broken export)")
    if model.head is not None and model.family == "cnn":
        channels = out.features.shape[-1]
        if model.head.kernel.shape != (channels, k) or model.head.bias.shape != (k,):
            raise ModelRefused(
                f"head kernel {model.head.kernel.shape} does not fit {channels} feature "
                f"channels and {k} classes"
            )
        gap = out.features[0].astype(np.float64).mean(axis=(0, 1))
        diff = np.abs(softmax(gap @ model.head.kernel + model.head.bias) - out.probabilities[0])
        if diff.max() > HEAD_TOLERANCE:
            raise ModelRefused(
                f"head weights disagree with the model (max |dp| {diff.max():.2g}); "
                "the cam file belongs to another model"
            )
