"""Builders for the serving tests: a model folder with the full promote contract, made from a
tiny untrained Keras model, converted with chestct.model.export and written with
chestct.modelfolder.write_model_folder (as promote does), plus slices.

Model folders are built in a child process, so that TensorFlow never enters the pytest process
through these fixtures (a process that holds TensorFlow hangs when later tests fork workers).

Shared by every tier (tests/conftest.py builds the session's model folders with it); holds no
tests.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from chestct.labels import CLASSES, DISPLAY_NAMES
from shipped import shipped

SIZE = 32
TEMPERATURE = 1.5
ABSTAIN = 0.97


def ct_slice(seed: int = 0, label: str = "adenocarcinoma", size: int = 96) -> np.ndarray:
    """A synthetic grey CT slice (uint8) that passes the service's input checks."""
    from chestct.data.synthetic import render_slice

    return render_slice(label, np.random.default_rng(seed), size=size)


def encode(img: np.ndarray, ext: str = ".png") -> bytes:
    ok, buf = cv2.imencode(ext, img)
    assert ok
    return buf.tobytes()


def slice_png(seed: int = 0, size: int = 96) -> bytes:
    return encode(ct_slice(seed, size=size))


def dicom_bytes(seed: int = 0, size: int = 64) -> bytes:
    """A CT DICOM slice in Hounsfield units (stored + intercept -1024), uncompressed."""
    from chestct.imaging.encoding import encode_dicom

    return encode_dicom(ct_slice(seed, size=size))


def build_keras(seed: int, size: int = SIZE, filters: tuple[int, ...] = (4, 8)) -> Any:
    from chestct.model.modeling import build_model
    from chestct.settings import BaseModelParams

    params = shipped(BaseModelParams, filters=list(filters), dropout=0.3)
    return build_model(params, image_size=size, seed=seed)


def train_keras(model: Any, size: int, epochs: int, per_class: int = 100) -> None:
    """A few epochs on synthetic slices (seeds 1000+), so that the predicted class follows the
    slice's class (about 0.6 accuracy at 64 px): for tests that need a class mix to shift."""
    import keras

    keras.utils.set_random_seed(0)
    images, labels = [], []
    for i in range(per_class * len(CLASSES)):
        grey = ct_slice(1000 + i, CLASSES[i % len(CLASSES)])
        images.append(cv2.resize(grey, (size, size), interpolation=cv2.INTER_AREA))
        labels.append(i % len(CLASSES))
    x = np.asarray(images, np.float32)[..., None]
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy")
    model.fit(x, np.asarray(labels), epochs=epochs, batch_size=20, verbose=0)


def write_model_folder(folder: Path, **options: Any) -> Path:
    """`build_model_folder` in a child process (see the module docstring); same arguments."""
    code = (
        "import json, sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); "
        "from model_folder import build_model_folder; "
        "build_model_folder(Path(sys.argv[2]), **json.loads(sys.argv[3]))"
    )
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    here = str(Path(__file__).parent)
    args = [sys.executable, "-c", code, here, str(folder), json.dumps(options)]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return folder


def keras_reference(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """(prepared images, Keras probabilities) saved beside a folder built with extras."""
    with np.load(folder.parent / f"{folder.name}.keras-reference.npz") as npz:
        return npz["images"], npz["probabilities"]


def build_model_folder(
    folder: Path,
    version: str = "1",
    seed: int = 0,
    *,
    light: bool = True,
    extras: bool = True,
    temperature: float = TEMPERATURE,
    size: int = SIZE,
    train_epochs: int = 0,
    pinned: bool = False,
) -> Path:
    """model/ as promote writes it: card, model.keras, model.tflite, cam_head.npz, ood.npz.

    `light=False` leaves out the light artifact; `extras=False` leaves out temperature,
    thresholds, cam and ood (an older card); `train_epochs` trains the model (filters 8, 16)
    on synthetic slices at `size` first; `pinned` gives every file's sha256 in the card, as
    promote does (without it the card is one from before the digests).
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        _build_model_folder(
            folder,
            Path(tmp),
            version,
            seed,
            light,
            extras,
            temperature,
            size,
            train_epochs,
            pinned,
        )
    return folder


def _build_model_folder(
    folder: Path,
    parts: Path,
    version: str,
    seed: int,
    light: bool,
    extras: bool,
    temperature: float,
    size: int,
    train_epochs: int,
    pinned: bool,
) -> None:
    """`build_model_folder`, its files made in `parts` first."""
    from chestct.imaging.preparation import Preprocessing
    from chestct.model.calibration import Mahalanobis
    from chestct.model.export import export_light, light_outputs
    from chestct.model.gradcam import CamHead
    from chestct.modelfolder import OOD_FILE, ood_bytes, write_model_folder

    if train_epochs:
        model = build_keras(seed, size, (8, 16))
        train_keras(model, size, train_epochs)
    else:
        model = build_keras(seed, size)
    model.save(parts / "model.keras")
    files: dict[str, Path | bytes] = {"model.keras": parts / "model.keras"}
    card: dict[str, Any] = {
        "name": "chestct",
        "version": version,
        "classes": list(CLASSES),
        "display_names": DISPLAY_NAMES,
        **Preprocessing(size).to_card(),
        "model_file": "model.keras",
        "metrics": {"macro_f1": 0.5},
        "mlflow_run_ids": {"train": f"{seed:032d}"},
    }
    if light:
        card["inference"] = export_light(model, parts / "model.tflite")
        files["model.tflite"] = parts / "model.tflite"
    if extras:
        images = np.stack(
            [cv2.resize(ct_slice(s), (size, size), interpolation=cv2.INTER_AREA) for s in range(8)]
        ).astype(np.float32)[..., None]
        if light:
            from chestct.model.export import LightModel

            feats = light_outputs(LightModel.load(parts / "model.tflite"), images)["features"]
        else:
            import keras

            probe = keras.Model(model.inputs, model.get_layer("features").output)
            feats = np.asarray(probe(images, training=False))
        # The product's fit (Ledoit-Wolf), as evaluate makes ood.npz.
        ood = Mahalanobis.fit(feats.astype(np.float64).mean(axis=(1, 2)))
        distance = ood.distance(feats.astype(np.float64).mean(axis=(1, 2)))
        CamHead.from_model(model).save(parts / "cam_head.npz")
        files["cam_head.npz"] = parts / "cam_head.npz"
        files[OOD_FILE] = ood_bytes(ood)
        card["temperature"] = temperature
        # Keras's own answers on a few slices, for the parity test (outside the model folder).
        reference = images[:4]
        np.savez(
            folder.parent / f"{folder.name}.keras-reference.npz",
            images=reference[..., 0].astype(np.uint8),
            probabilities=np.asarray(model(reference, training=False)),
        )
        card["thresholds"] = {"abstain_entropy": ABSTAIN}
        card["cam"] = {"file": "cam_head.npz", "layer": "features"}
        card["ood"] = {
            "method": "mahalanobis_gap",
            "file": OOD_FILE,
            "threshold": float(distance.max() * 1.5),
        }
    write_model_folder(folder, card, files, pin=pinned)


def install_model(
    model_path: Path,
    card: dict[str, Any],
    folder: Path,
    extras: dict[str, Path] | None = None,
    after_swap: Any = None,
) -> None:
    """`chestct.modelfolder.write_model_folder` of a model file (named by the card's
    `model_file`) and `extras`, the card written as given (no digests, not checked): for the
    tests of the swap itself."""
    from chestct.modelfolder import write_model_folder

    files = {str(card.get("model_file", "model.keras")): model_path, **(extras or {})}
    write_model_folder(folder, card, files, pin=False, check=False, after_swap=after_swap)


def multipart(data: bytes, name: str = "slice.png", field: str = "file") -> dict[str, Any]:
    return {"data": {field: (io.BytesIO(data), name)}, "content_type": "multipart/form-data"}


def add_reference(folder: Path, n: int = 200, seed0: int = 50_000) -> dict[str, Any]:
    """Fit the reference profile on in-distribution slices through the served model itself
    (the function evaluate calls), write it and name it in the card as promote does."""
    from chestct.fsutil import sha256_file
    from chestct.inference.analysis import analyse
    from chestct.inference.folder import load_folder
    from chestct.monitoring.signals import REFERENCE_FILE, fit_reference
    from chestct.serving import inputs

    model = load_folder(folder)
    probs, dist, images, labels = [], [], [], []
    for i in range(n):
        label = CLASSES[i % len(CLASSES)]
        data = encode(ct_slice(seed0 + i, label))
        decoded = inputs.decode(data, model.window)
        result = analyse(model, model.prepare(decoded), 0, 0)
        probs.append(result.probabilities)
        dist.append(result.ood_score)
        images.append(decoded.grey)
        labels.append(label)
    profile = fit_reference(
        classes=model.classes,
        probabilities=np.array(probs),
        ood_distance=np.array(dist),
        ood_threshold=model.ood.threshold,
        abstain_threshold=model.abstain_threshold,
        greys=images,
        labels=labels,
        source="synthetic in-distribution slices",
        body_crop=model.preprocessing.crop == "body",
    )
    (folder / REFERENCE_FILE).write_text(json.dumps(profile), encoding="utf-8")
    card = json.loads((folder / "model.json").read_text(encoding="utf-8"))
    card["monitoring"] = {"file": REFERENCE_FILE, "sha256": sha256_file(folder / REFERENCE_FILE)}
    card["metrics"] = {
        "accuracy": 0.6,
        "balanced_accuracy": 0.6,
        "macro_f1": 0.58,
        "n": 40,
        # What evaluate adds (chestct.evaluation.novelty): the memorizer, the novel part, the
        # intervals.
        "baseline": {"nearest_neighbour": {"macro_f1": 0.5}, "model_above": {"macro_f1": 0.08}},
        "novel": {"n": 12, "macro_f1": 0.41, "baseline": {"nearest_neighbour": {"macro_f1": 0.3}}},
        "ci": {"confidence": 0.95, "macro_f1": {"low": 0.45, "high": 0.7}},
    }
    (folder / "model.json").write_text(json.dumps(card), encoding="utf-8")
    return profile
