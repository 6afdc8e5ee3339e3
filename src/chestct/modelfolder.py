"""The one writer of a model folder: promote installs model/ with it, and the tests and bench
build their model folders with it, so every folder the predictor reads was written one way.

A folder is written beside its target under a temporary name (every file, the card, the
promotion record, each made readable by the predictor's user and synced to disk), then swapped
in for the target in one rename; a target that existed is put back if the caller's `after_swap`
fails. The card is checked as chestct.modelcard.ModelCard reads it, and every file it names is
pinned by its sha256 (`pin_digests`), which serving checks at each load.

The out-of-distribution statistics (`ood.npz`) are `chestct.model.calibration.Mahalanobis`,
fitted by `Mahalanobis.fit` (Ledoit-Wolf shrinkage) wherever they are made; `ood_bytes` writes
them as evaluate does.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from chestct.fsutil import (
    atomic_write_bytes,
    atomic_write_json,
    fsync_dir,
    sha256_file,
    swap_dir,
    sync_tree,
)
from chestct.model.calibration import Mahalanobis
from chestct.modelcard import CARD_NAME, FILES_KEY, PROMOTION_NAME, ModelCard
from chestct.pointers import now_utc

log = logging.getLogger(__name__)

OOD_FILE = "ood.npz"

# A file of the folder: a path to copy, or the bytes themselves.
Source = Path | bytes


class ModelFolderError(ValueError):
    """A card that the predictor would refuse, or a file it names that was not given."""


def ood_bytes(stats: Mahalanobis) -> bytes:
    """ood.npz as evaluate writes it: the mean and precision of `Mahalanobis.fit`."""
    buffer = io.BytesIO()
    np.savez(buffer, mean=stats.mean, precision=stats.precision)
    return buffer.getvalue()


def pin_digests(card: Mapping[str, Any], files: Mapping[str, Path]) -> dict[str, Any]:
    """The card with a sha256 on every file it names (`model_sha256` for `model_file`, every
    entry object with a `file` key: inference, cam, ood, monitoring, ...; the names of the
    `files` map), from the files that will be installed under those names
    (chestct.modelcard.card_files lists them the same way).
    """
    out = json.loads(json.dumps(card))
    model_file = out.get("model_file", "model.keras")
    if model_file in files:
        out["model_sha256"] = sha256_file(files[model_file])
    for key, entry in out.items():
        if key != FILES_KEY and isinstance(entry, dict) and entry.get("file") in files:
            entry["sha256"] = sha256_file(files[entry["file"]])
    extra = out.get(FILES_KEY)
    if isinstance(extra, dict):
        for name in extra:
            if name in files:
                extra[name] = sha256_file(files[name])
    return out


def write_model_folder(
    folder: Path,
    card: Mapping[str, Any],
    files: Mapping[str, Source],
    *,
    promotion: Mapping[str, Any] | None = None,
    pin: bool = True,
    check: bool = True,
    after_swap: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Write a model folder at `folder` (replacing one that is there) in one swap.

    Args:
        folder: the model folder to create or replace (model/).
        card: model.json; with `pin`, every file it names gets its sha256 first.
        files: the folder's other files by name: a path to copy or the bytes to write.
        promotion: promotion.json (registry version, run ids, time), when there is one.
        pin: pin the sha256 of every named file in the card (a folder promote writes); False
            leaves the card as given (a test of a card from before the digests).
        check: refuse a card that chestct.modelcard.ModelCard would refuse, before anything
            is written.
        after_swap: what records the swap (the pointer, MLflow); if it raises, the previous
            folder is swapped back (or the new one removed when there was none) before the
            error goes on, so the folder never holds a model its run did not record.

    Returns:
        The card as written.

    Raises:
        ModelFolderError: the card is not valid, or names a file not in `files`.
    """
    staging = folder.with_name(f".{folder.name}.new-{uuid.uuid4().hex[:8]}")
    staging.mkdir(parents=True)
    previous: Path | None = None
    try:
        for name, source in files.items():
            if isinstance(source, bytes):
                atomic_write_bytes(staging / name, source)
            else:
                shutil.copy2(source, staging / name)
        written = dict(card)
        if pin:
            written = pin_digests(card, {name: staging / name for name in files})
        if check:
            _check(written, set(files))
        atomic_write_json(staging / CARD_NAME, written)
        if promotion is not None:
            atomic_write_json(staging / PROMOTION_NAME, promotion)
        for path in staging.iterdir():
            # Atomic writes create private (0600) files; the predictor may run as another user.
            path.chmod(0o644)
        # Every file and the folder itself on disk before the swap, so that a crash right
        # after it cannot leave the folder naming files whose data never reached the disk.
        sync_tree(staging)
        previous = swap_dir(staging, folder)
        fsync_dir(folder.parent)
        _record(folder, previous, after_swap)
        return written
    finally:
        for leftover in (staging, previous):
            if leftover is not None and leftover.exists():
                shutil.rmtree(leftover)


def _check(card: Mapping[str, Any], names: set[str]) -> None:
    try:
        typed = ModelCard.from_dict(card)
    except ValueError as exc:
        raise ModelFolderError(f"the model card is not one the predictor reads: {exc}") from None
    missing = sorted(set(typed.files) - names)
    if missing:
        raise ModelFolderError(
            f"the model card names {', '.join(missing)}, which the folder would not hold; "
            "give every file the card names"
        )


def _record(folder: Path, previous: Path | None, after_swap: Callable[[], None] | None) -> None:
    """Run `after_swap`; on failure put the previous folder back (the new one is removed)."""
    if after_swap is None:
        return
    try:
        after_swap()
    except BaseException:
        if previous is not None:
            failed = swap_dir(previous, folder)
            shutil.rmtree(failed)
        else:
            shutil.rmtree(folder)
        fsync_dir(folder.parent)
        log.error(
            "recording the new %s failed after the swap; the previous one is back in place",
            folder.name,
        )
        raise


def build_promotion(
    registered: dict[str, Any],
    git_sha: str | None,
    run_ids: Mapping[str, str | None],
    model_sha: str,
) -> dict[str, Any]:
    """promotion.json: which registry version this is and which runs made it, and when.

    `model_sha256` ties the record to the card it was written with: after `dvc checkout`
    brings back another model/, the left-over record no longer matches and is ignored."""
    return {
        "model_sha256": model_sha,
        "version": registered.get("version"),
        "registered": registered,
        "git_sha": git_sha,
        "mlflow_run_ids": dict(run_ids),
        "promoted_at": now_utc(),
    }
