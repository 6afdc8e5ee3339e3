"""The external test set (params `evaluate.external`): its labelled files and their scores.

Evaluate scores it apart from the test split and reports it in external.json (never selected
on); it lives beside chestct.evaluation.scoring rather than in it, so that promote, which
re-scores the
champion with scoring, does not depend on how sources are read.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from chestct.data.sources import SPLIT_NAMES, SourceError, archive_kind, is_url, resolve
from chestct.evaluation import scoring
from chestct.evaluation.novelty import TrainReference, assess_files, describe
from chestct.evaluation.scoring import ScoringError
from chestct.imaging.formats import ImageError
from chestct.imaging.preparation import Preprocessing, prepare
from chestct.labels import CLASSES, label_for_folder
from chestct.model.calibration import softmax
from chestct.settings import EvaluateParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExternalSet:
    """Labelled files of an external test set, with a digest of their content."""

    origin: str
    files: list[tuple[str, Path]]  # (label, file)
    digest: str  # sha256 over the sorted (label, file sha256) pairs


def external_set(
    source: str, root: Path, staging: Path, class_map: Mapping[str, str] | None = None
) -> ExternalSet:
    """The labelled files of params `evaluate.external`: a folder or a .zip/.tar.gz/.tgz
    archive in the layout `[<split>/]<class>/<image>` (labels from the class folders; split
    folders, if any, are all used; `class_map` is params `ingest.class_map`). `staging` is a
    scratch folder the caller removes."""
    if is_url(source):
        raise ScoringError(
            f"evaluate.external {source!r}: a URL is not accepted here; download the archive "
            "and point evaluate.external at the file or its unpacked folder"
        )
    path = Path(source).expanduser()
    path = path if path.is_absolute() else root / path
    if path.is_file() and archive_kind(path) is None:
        raise ScoringError(
            f"evaluate.external {source!r} is a file but not a .zip, .tar.gz or .tgz archive; "
            "point it at a folder <class>/<image> or an archive of one"
        )
    try:
        found = resolve(source, root, staging)
    except SourceError as exc:
        raise ScoringError(str(exc).replace("ingest.source", "evaluate.external")) from None
    folder = found.folder
    splits = [d for d in sorted(folder.iterdir()) if d.is_dir() and d.name in SPLIT_NAMES]
    groups = splits or [folder]
    files: list[tuple[str, Path]] = []
    for group in groups:
        for child in sorted(p for p in group.iterdir() if p.is_dir()):
            if child.name.startswith(".") or child.name == "__MACOSX":
                continue
            label = label_for_folder(child.name, class_map)
            if label is None:
                raise ScoringError(
                    f"evaluate.external: {child} does not name a class ({', '.join(CLASSES)}); "
                    "rename the folder or move it out"
                )
            files.extend(
                (label, f)
                for f in sorted(child.rglob("*"))
                if f.is_file() and not f.name.startswith(".")
            )
    if not files:
        raise ScoringError(
            f"evaluate.external {source!r}: no image files in class folders; expected "
            f"[<split>/]<class>/<image> with classes {', '.join(CLASSES)}"
        )
    digest = hashlib.sha256()
    for label, f in sorted(files, key=lambda x: (x[0], x[1].name)):
        digest.update(f"{label}:{hashlib.sha256(f.read_bytes()).hexdigest()}\n".encode())
    return ExternalSet(found.origin, files, digest.hexdigest())


def score_external(
    model: Any,
    external: ExternalSet,
    preprocessing: Preprocessing,
    batch_size: int,
    temperature: float,
    root: Path | None = None,
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Every metric (full_metrics, without the shift block) of the model on the external set,
    and one prediction row per file. Files that do not decode are counted and named, not
    scored."""
    prep = preprocessing.with_size(int(model.input_shape[1]))
    images, labels, names, skipped = [], [], [], []
    for label, f in external.files:
        try:
            images.append(prepare(f.read_bytes(), prep))
        except ImageError as exc:
            skipped.append({"path": f.name, "reason": str(exc)})
            continue
        labels.append(label)
        names.append(str(f.relative_to(root)) if root and f.is_relative_to(root) else f.name)
    if not images:
        raise ScoringError(
            f"evaluate.external {external.origin!r}: none of {len(external.files)} files could "
            f"be decoded (first: {skipped[0]['path']}: {skipped[0]['reason']})"
        )
    batch = np.stack(images)[..., None].astype(np.float32)
    logits = scoring.model_outputs(model, batch, batch_size, ["logits"])["logits"]
    y_true = scoring.label_indices(labels)
    metrics = scoring.full_metrics(y_true, logits, temperature, None)
    metrics["skipped"] = len(skipped)
    frame = pd.DataFrame({"path": names, "source_path": names, "label": labels})
    return metrics, scoring.prediction_table(frame, softmax(logits))


def run_external(
    model: Any,
    params: EvaluateParams,
    root: Path,
    preprocessing: Preprocessing,
    temperature: float,
    class_map: dict[str, str] | None = None,
    reference: TrainReference | None = None,
    seed: int = 0,
) -> tuple[dict[str, Any], pd.DataFrame | None]:
    """external.json's content and the predictions on params `evaluate.external`.

    Reported apart from metrics.json and never used for selection, calibration or thresholds:
    it is scored with the temperature fitted on valid, after everything else is decided. With
    the training slices (`reference`) it also gets the memorizer, the novelty split and the
    intervals, its groups being the series its slices form by similarity.
    """
    if not params.external:
        return {"source": "", "n": 0}, None
    with tempfile.TemporaryDirectory(prefix="chestct-external-") as staging:
        found = external_set(params.external, root, Path(staging), class_map)
        metrics, predictions = score_external(
            model, found, preprocessing, params.batch_size, temperature, root
        )
        if reference is not None:
            novelty = assess_files(
                reference,
                [f for _, f in found.files],
                predictions,
                temperature,
                preprocessing.window,
                resamples=params.bootstrap_resamples,
                confidence=params.confidence,
                seed=seed,
            )
            metrics.update(novelty.metrics)
            for column, values in novelty.columns.items():
                predictions[column] = values
            log.info("external: %s", describe(metrics))
    log.info(
        "external set %s: %d images, macro-F1 %.4f, balanced accuracy %.4f, ECE %.4f",
        found.origin,
        metrics["n"],
        metrics["macro_f1"],
        metrics["balanced_accuracy"],
        metrics["ece_calibrated"],
    )
    return {"source": found.origin, "digest": found.digest, **metrics}, predictions
