"""The served files of a trained model, by family: what promote installs in model/ and what
evaluate scores (chestct.inference.artefact.open_artefact), so that the metrics are of the
artefact that
is served.

- cnn: the LiteRT export of the Keras model (chestct.model.export) and its CAM head;
- texture: the skops file itself (runtime skops);
- ensemble: both members, the CNN exported to LiteRT, and the CNN's temperature.

Promote checks each export against the model it came from on the test split (max |dp| within
chestct.model.export.PARITY_TOLERANCE, XNNPACK and LiteRT's reference kernels alike) and rejects
a candidate that fails; evaluate, which scores the exported files themselves, skips the check.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from chestct.evaluation.scoring import load_images, load_model, model_outputs
from chestct.model.export import PARITY_TOLERANCE, ExportError, LightModel, export_light, parity
from chestct.model.families import OFFERS, TEXTURE_FILE, family_of, read_ensemble
from chestct.model.gradcam import CAM_FILE, CamHead

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Release:
    """What a promoted folder holds beside the card, by family."""

    inference: dict[str, Any]  # the card's `inference` entry
    files: dict[str, Path]  # file name in model/ -> where it is now
    card: dict[str, Any]  # family-specific card keys (family, cam, texture, ensemble, offers)


def release_for(
    model_path: Path, test: pd.DataFrame | None, root: Path, batch_size: int, work_dir: Path
) -> Release:
    """The served files of any family (chestct.model.families): cnn the LiteRT model and its CAM
    head; texture the skops file itself (runtime skops, parity checked through a reload);
    ensemble both members, the CNN exported to LiteRT (its parity checked) and the CNN's
    temperature, which the served average needs.

    `test` None: no parity check (evaluate, which scores the exported files themselves; promote
    checks, and rejects a candidate whose export answers otherwise than the trained model)."""
    family = family_of(model_path)
    cam = {
        "cam": {
            "file": CAM_FILE,
            "method": "CAM from the dense head: relu(features @ kernel[:, class]); equals "
            "Grad-CAM for the GAP -> dropout -> dense head",
        }
    }
    offers = {"family": family, "offers": OFFERS[family]}
    if family == "cnn":
        inference = export_release(model_path, test, root, batch_size, work_dir)
        files = {inference["file"]: work_dir / inference["file"], CAM_FILE: work_dir / CAM_FILE}
        return Release(inference, files, {**cam, **offers})
    if family == "texture":
        inference = texture_release(model_path, test, root, batch_size)
        return Release(inference, {TEXTURE_FILE: model_path}, offers)
    spec = read_ensemble(model_path)
    members = spec["members"]
    cnn_path = model_path.parent / members["cnn"]["file"]
    texture_path = model_path.parent / members["texture"]["file"]
    inference = export_release(cnn_path, test, root, batch_size, work_dir)
    files = {
        inference["file"]: work_dir / inference["file"],
        CAM_FILE: work_dir / CAM_FILE,
        cnn_path.name: cnn_path,
        texture_path.name: texture_path,
    }
    extra = {
        **cam,
        **offers,
        "texture": {"file": texture_path.name, "runtime": "skops"},
        "ensemble": {
            "cnn_temperature": float(members["cnn"]["temperature"]),
            "combine": spec.get("combine", "mean of the members' calibrated probabilities"),
        },
    }
    return Release(inference, files, extra)


def texture_release(
    model_path: Path, test: pd.DataFrame | None, root: Path, batch_size: int
) -> dict[str, Any]:
    """The card's `inference` entry of a texture model: the skops file is served as it is;
    parity compares the probabilities of the file as serving loads it (texture.load) with the
    evaluated model's on the test split."""
    from chestct.model.texture import TextureError
    from chestct.model.texture import load as texture_load

    try:
        served = texture_load(model_path)
    except TextureError as exc:
        raise ExportError(str(exc)) from None
    entry = {
        "file": TEXTURE_FILE,
        "runtime": "skops",
        "format": "skops (types checked against chestct.model.texture.TRUSTED_TYPES at load)",
    }
    if test is None:
        return entry
    evaluated = load_model(model_path)
    images = load_images(test, root, int(evaluated.input_shape[1]))
    p_eval = model_outputs(evaluated, images, batch_size, ["probabilities"])["probabilities"]
    p_served = served.outputs(images[..., 0])["probabilities"] if len(images) else p_eval
    diff = parity(p_served, p_eval)
    if not diff <= PARITY_TOLERANCE:
        raise ExportError(f"texture model parity failed: max |dp| = {diff:.3g}")
    return {**entry, "parity_max_abs_diff": diff, "parity_images": len(images)}


def export_release(
    model_path: Path, test: pd.DataFrame | None, root: Path, batch_size: int, work_dir: Path
) -> dict[str, Any]:
    """Export the light artifact and the CAM head into `work_dir`; check parity on `test`
    (None: no check).

    Returns:
        The card's `inference` entry, with parity_max_abs_diff and parity_images when checked.

    Raises:
        ExportError: conversion failed or the light model differs from Keras by more than
            PARITY_TOLERANCE on some test image.
    """
    from chestct.model.modeling import load_model as load_keras

    model = load_keras(model_path)
    work_dir.mkdir(parents=True, exist_ok=True)
    inference = export_light(model, work_dir / "model.tflite")
    CamHead.from_model(model).save(work_dir / CAM_FILE)
    if test is None:
        return inference
    images = load_images(test, root, int(model.input_shape[1]))
    p_keras = model_outputs(model, images, batch_size, ["probabilities"])["probabilities"]
    # The served kernels (XNNPACK) are checked; the card records the reference kernels' figure,
    # which is the same on every machine (the card is a DVC output: docs/reproducibility.md).
    diffs = {}
    for kernels, reference in (("served", False), ("reference", True)):
        light = LightModel.load(work_dir / inference["file"], reference=reference)
        p_light = np.concatenate(
            [
                light.run(images[i : i + batch_size])["probabilities"]
                for i in range(0, len(images), batch_size)
            ]
        )
        diffs[kernels] = diff = parity(p_light, p_keras)
        if not diff <= PARITY_TOLERANCE:  # also catches NaN
            raise ExportError(
                f"light model parity failed ({kernels} kernels): max |p_light - p_keras| = "
                f"{diff:.3g} on {len(images)} test images exceeds {PARITY_TOLERANCE:g}; the "
                "converted model cannot be served in place of the Keras one"
            )
    log.info(
        "light model parity: max |dp| = %.3g (served kernels), %.3g (reference) on %d test images",
        diffs["served"],
        diffs["reference"],
        len(images),
    )
    return {
        **inference,
        "parity_max_abs_diff": diffs["reference"],
        "parity_kernels": "litert-reference",
        "parity_images": len(images),
    }
