"""The inference core: a promoted model folder loaded, checked and run, with the maths evaluate
fitted applied by the very same functions (no web framework here; chestct.serving, the research
helpers and bench/ call it).

A promoted folder holds the card (model.json, read as a `chestct.modelcard.ModelCard`), the
light model, the Keras model, the dense head and the OOD statistics, each pinned by its sha256
in the card. Every file the card lists (`ModelCard.files`: any entry with a `file`, and the
`files` map a new model family may use) is hashed at every load and hot reload before any is
read, and read only through `ModelFiles`, which refuses a name the card does not list.
Preprocessing is `chestct.imaging.preparation.prepare_slice` with the card's settings; calibration,
entropy, the abstain and out-of-distribution rules and the Mahalanobis distance come from
`chestct.evaluation.metrics`, where evaluate fits them.

A model folder is read through one open directory handle, so that a folder swapped in by
promote (renameat2 exchange) is seen whole: the card and the files it names always come from
the same folder. Each worker checks model.json's identity at most every `reload_check_s`
seconds; a new folder that cannot be served is refused with a logged error while the current
model keeps serving.

What a prediction carries, all computed without TensorFlow from the light model's outputs:
calibrated probabilities (temperature scaling of the logits), the normalised predictive entropy
with an abstain flag (threshold from the card), MC-dropout through the dense head (the only
dropout in the network sits between global pooling and the head, so sampling it on the pooled
features is exactly MC-dropout of the whole network), the Mahalanobis distance of the pooled
features from the training set (out-of-distribution score), and Grad-CAM, which for a
GAP -> dense head is the class activation map with the head's weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import threading
import time
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from chestct import modelcard
from chestct.fsutil import sha256_bytes, sha256_file
from chestct.imaging import body, formats, preparation
from chestct.model.calibration import Mahalanobis, abstains, out_of_distribution, softmax
from chestct.model.calibration import normalised_entropy as entropy
from chestct.model.families import average
from chestct.model.gradcam import CamHead
from chestct.model.texture import (
    TextureError,
    TextureModel,
    group_importance,
    log_probabilities,
    occlusion_map,
)
from chestct.model.texture import load as texture_load
from chestct.modelcard import CARD_NAME, FileEntry, ListedFile, ModelCard
from chestct.monitoring.signals import check_reference

log = logging.getLogger(__name__)

# The lung window (level, width) for a card that names none, when the caller (research code,
# tests) passes no params ingest.window; promote writes the window into every card, and the
# service passes the project's.
DEFAULT_WINDOW: tuple[float, float] = (-600.0, 1500.0)
_MAX_KERAS_CONFIG = 64 * 1024 * 1024  # a .keras config.json larger than this is not read
PANEL_MIN_WIDTH = 240  # px: the feature-group bars under a texture explanation
HEAD_TOLERANCE = 1e-3  # |softmax(head(gap)) - model probabilities| above this: wrong head file


class ModelNotReady(RuntimeError):
    """No model has been loaded (yet)."""


class ModelRefused(RuntimeError):
    """A model folder that cannot be served (missing, truncated or inconsistent files)."""


@dataclass(frozen=True)
class OodModel:
    """Gaussian of the training set's pooled features (evaluate's ood.npz, the statistics
    evaluate fitted): a Mahalanobis distance above `threshold` is out of distribution."""

    stats: Mahalanobis
    threshold: float


@dataclass(frozen=True)
class Outputs:
    features: np.ndarray  # (n, h, w, f)
    logits: np.ndarray | None  # (n, c) when the artifact gives them
    probabilities: np.ndarray  # (n, c)


@dataclass
class Loaded:
    """One model version, ready to run."""

    card: ModelCard
    card_sha: str
    classes: list[str]
    # The card's preprocessing, with params ingest.window when the card names no DICOM window.
    preprocessing: preparation.Preprocessing
    backend: str
    temperature: float
    abstain_threshold: float | None
    head: CamHead | None
    dropout_rate: float
    ood: OodModel | None
    notes: list[str]
    runner: Callable[[np.ndarray], Outputs]
    reference: dict[str, Any] | None = None  # the monitoring profile (chestct.monitoring.signals)
    family: str = "cnn"  # cnn | texture | ensemble (chestct.model.families)
    texture: TextureModel | None = None  # texture and ensemble: explains by occlusion
    loaded_at: float = field(default_factory=time.time)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def name(self) -> str:
        return self.card.name

    @property
    def version(self) -> str:
        """The registry version from promotion.json; without one (a folder pulled from a DVC
        remote), the model's content digest, so that replicas of one model agree."""
        return self.card.version

    def display_name(self, cls: str) -> str:
        return self.card.display_name(cls)

    @property
    def image_size(self) -> int:
        return self.preprocessing.size

    @property
    def window(self) -> tuple[float, float] | None:
        """The DICOM window uploads are decoded with."""
        return self.preprocessing.window

    def prepare(self, decoded: formats.Decoded) -> np.ndarray:
        """The model input (uint8 size x size), exactly as imaging.prepare makes it."""
        return self.prepare_with_box(decoded).image

    def prepare_with_box(self, decoded: formats.Decoded) -> preparation.Prepared:
        """The model input and the region of the upload it was made from."""
        return preparation.prepare_slice(decoded.grey, self.preprocessing)

    def run(self, images: np.ndarray) -> Outputs:
        """Run the model on uint8 or float images shaped (n, s, s); interpreters are not
        thread-safe, hence the lock."""
        batch = np.asarray(images, dtype=np.float32)[..., None]
        with self._lock:
            return self.runner(batch)


@dataclass(frozen=True)
class Analysis:
    """Everything the service reports about one image."""

    probabilities: np.ndarray  # calibrated, (c,)
    entropy: float  # normalised to [0, 1]
    abstain: bool | None
    mc_mean: np.ndarray | None
    mc_std: np.ndarray | None
    mutual_information: float | None  # normalised to [0, 1]
    ood_score: float | None
    out_of_distribution: bool | None
    features: np.ndarray  # (h, w, f), for Grad-CAM


def analyse(model: Loaded, image: np.ndarray, mc_samples: int, seed: int) -> Analysis:
    """Calibrated prediction, uncertainty and OOD score for one prepared image (s, s)."""
    return analyse_outputs(model, model.run(image[None]), mc_samples, seed)


def served_logits(
    out: Outputs, head: CamHead | None, family: str
) -> tuple[np.ndarray, np.ndarray]:
    """The logits the service calibrates and the pooled features its OOD distance is taken on,
    both float64 (n, k) and (n, f): the one formula of `analyse` and of evaluate's scores.

    A CNN's logits are its dense head over the pooled features (the head Grad-CAM explains);
    the texture model and the ensemble give theirs (the ensemble: the log of its average).
    """
    n, h, w, c = out.features.shape
    # Pooled in float64 through one reduction (np.mean would add several Python-level steps).
    gap = np.add.reduce(out.features.reshape(n, h * w, c), axis=1, dtype=np.float64) / (h * w)
    if head is not None and family == "cnn":
        logits = gap @ head.kernel + head.bias
    elif out.logits is not None:
        logits = out.logits.astype(np.float64)
    else:
        logits = np.log(np.clip(out.probabilities.astype(np.float64), 1e-12, 1.0))
    return logits, gap


def analyse_outputs(model: Loaded, out: Outputs, mc_samples: int, seed: int) -> Analysis:
    """`analyse` from the model's outputs for one image (a batch of one)."""
    features = out.features[0]
    pooled_logits, pooled = served_logits(out, model.head, model.family)
    logits, gap = pooled_logits[0], pooled[0]
    probs = softmax(logits, model.temperature)
    ent = float(entropy(probs))
    abstain = (
        None if model.abstain_threshold is None else bool(abstains(ent, model.abstain_threshold))
    )
    mc_mean = mc_std = mutual = None
    mc_offered = model.head is not None and model.family == "cnn"  # families.OFFERS
    if mc_offered and model.dropout_rate > 0 and mc_samples > 0:
        rng = np.random.default_rng(seed)
        keep = 1.0 - model.dropout_rate
        masks = rng.random((mc_samples, gap.size)) < keep
        # Dropout on the pooled features, then the head: (masks * gap / keep) @ kernel.
        sampled = softmax(
            masks @ (gap[:, None] * model.head.kernel) / keep + model.head.bias, model.temperature
        )
        mc_mean = sampled.mean(axis=0)
        mc_std = sampled.std(axis=0)
        # Mutual information = total - expected entropy: the part of the uncertainty that comes
        # from the model (epistemic), not from an ambiguous image.
        mutual = float(max(entropy(mc_mean) - entropy(sampled).mean(), 0.0))
    score = verdict = None
    if model.ood is not None:
        score = float(model.ood.stats.distance(gap[None])[0])
        verdict = bool(out_of_distribution(score, model.ood.threshold))
    return Analysis(
        probabilities=probs,
        entropy=ent,
        abstain=abstain,
        mc_mean=mc_mean,
        mc_std=mc_std,
        mutual_information=mutual,
        ood_score=score,
        out_of_distribution=verdict,
        features=features,
    )


def class_activation(model: Loaded, features: np.ndarray, class_index: int) -> np.ndarray:
    """Grad-CAM of one class on the feature map, in [0, 1], shape (h, w).

    For logits = dense(GAP(A)), d logit_c / d A_k = w_kc / (h w) everywhere, so Grad-CAM's
    channel weights are the head's kernel column and the map is ReLU(sum_k w_kc A_k).
    """
    if model.head is None:
        raise ModelRefused("the model folder has no dense-head weights (card `cam`)")
    return model.head.cam(features, class_index)


@dataclass(frozen=True)
class Explanation:
    """Why the model answered as it did, for one prepared image and one class."""

    heat: np.ndarray  # over the prepared image, in [0, 1]
    method: str  # grad-cam | occlusion
    groups: dict[str, float] | None  # texture: probability carried by each feature group


def explain(
    model: Loaded, image: np.ndarray, features: np.ndarray, class_index: int
) -> Explanation:
    """The family's explanation (chestct.model.families.OFFERS): Grad-CAM of the CNN (the
    ensemble's
    CNN member), or for the texture family the occlusion map of body tiles and the share of
    each feature group (chestct.model.texture.occlusion_map / group_importance)."""
    if model.family == "texture" and model.texture is not None:
        with model._lock:
            return Explanation(
                occlusion_map(model.texture, image, class_index),
                "occlusion",
                group_importance(model.texture, image, class_index),
            )
    return Explanation(class_activation(model, features, class_index), "grad-cam", None)


def _group_panel(groups: dict[str, float], width: int) -> np.ndarray:
    """A bar per feature group (BGR): green where the group argued for the class, red
    against, the length its share of the probability."""
    row, pad = 22, 6
    panel = np.full((pad * 2 + row * len(groups), width, 3), 255, np.uint8)
    top = max((abs(v) for v in groups.values()), default=0.0) or 1.0
    label_w = min(110, width // 3)
    for k, (name, value) in enumerate(groups.items()):
        y = pad + k * row
        cv2.putText(panel, name, (4, y + 15), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1)
        length = int((width - label_w - 70) * abs(value) / top)
        colour = (60, 160, 60) if value >= 0 else (60, 60, 200)
        cv2.rectangle(panel, (label_w, y + 4), (label_w + length, y + row - 4), colour, -1)
        cv2.putText(
            panel,
            f"{value:+.3f}",
            (label_w + length + 4, y + 15),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.4,
            (0, 0, 0),
            1,
        )
    return panel


def overlay_png(
    model: Loaded,
    decoded: formats.Decoded,
    prepared: preparation.Prepared,
    cam: np.ndarray,
    groups: dict[str, float] | None = None,
) -> bytes:
    """The heatmap over the client's own image, as PNG (longer side at most 512 px).

    The map covers what the model saw (the body crop, squared by the resize mode); it is put
    back where that came from in the upload, and is zero (the picture shows through) outside.
    With `groups` (the texture family), a bar per feature group is drawn under the picture.
    """
    base, box = decoded.grey, prepared.box
    scale = min(1.0, 512.0 / max(base.shape))
    if scale < 1.0:
        # The map goes straight to the output's size (the box scaled with the picture): a
        # float32 map of the full frame would be 64 MB for a 4096 x 4096 upload.
        size = (round(base.shape[1] * scale), round(base.shape[0] * scale))
        base = cv2.resize(base, size, interpolation=cv2.INTER_AREA)
        x0, y0 = round(box.x * scale), round(box.y * scale)
        x1, y1 = round((box.x + box.w) * scale), round((box.y + box.h) * scale)
        box = body.BodyBox(x0, y0, max(1, x1 - x0), max(1, y1 - y0), box.reason)
    heat = preparation.map_to_frame(cam, box, base.shape, model.preprocessing.resize)
    heat8 = np.clip(heat * 255.0, 0, 255).astype(np.uint8)
    colour = cv2.applyColorMap(heat8, cv2.COLORMAP_JET)
    grey_bgr = cv2.cvtColor(base, cv2.COLOR_GRAY2BGR)
    # Weight the colour by the map itself so cold regions keep the original picture.
    alpha = (0.55 * heat)[:, :, None]
    blended = (grey_bgr * (1.0 - alpha) + colour * alpha).astype(np.uint8)
    if groups:
        # The panel needs about 240 px for its labels: a smaller picture gets a white margin.
        narrow = max(0, PANEL_MIN_WIDTH - blended.shape[1])
        blended = cv2.copyMakeBorder(
            blended, 0, 0, 0, narrow, cv2.BORDER_CONSTANT, value=(255, 255, 255)
        )
        blended = np.vstack([blended, _group_panel(groups, blended.shape[1])])
    ok, buf = cv2.imencode(".png", blended)
    if not ok:
        raise RuntimeError("OpenCV could not encode the heatmap PNG")
    return buf.tobytes()


# --------------------------------------------------------------------------- the artefact


@dataclass
class Artefact:
    """An exported model run as the service runs it, without a card: what evaluate scores.

    It answers the model contract chestct.evaluation.scoring reads (`family_outputs`: logits,
    probabilities, gap, features), its logits and pooled features made by `served_logits`, the
    very formula of `analyse`, so that evaluate's metrics are those of the served artefact.
    """

    family: str
    image_size: int
    runner: Callable[[np.ndarray], Outputs]
    head: CamHead | None  # the CNN's (the ensemble's CNN member's) dense head; None: texture
    texture: TextureModel | None  # texture and ensemble: their texture model

    @property
    def input_shape(self) -> tuple[None, int, int, int]:
        return (None, self.image_size, self.image_size, 1)

    def family_outputs(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """The contract's outputs for prepared images (n, s, s[, 1]) in [0, 255]."""
        batch = np.asarray(images, np.float32)
        batch = batch if batch.ndim == 4 else batch[..., None]
        out = self.runner(batch)
        logits, gap = served_logits(out, self.head, self.family)
        return {
            "logits": logits,
            "probabilities": softmax(logits),
            "gap": gap,
            "features": out.features,
        }


def open_artefact(
    inference: Mapping[str, Any],
    files: Mapping[str, Path],
    entries: Mapping[str, Any],
    image_size: int,
    *,
    threads: int = 1,
    reference: bool = False,
) -> Artefact:
    """The served files of a model (chestct.evaluation.release.Release) opened as
    `load_folder` opens a promoted folder's.

    Args:
        inference: the card's `inference` entry (file, runtime, outputs).
        files: file name -> path, for every file the entries name.
        entries: the family's card entries (family, cam, texture, ensemble).
        image_size: the model's input side.
        threads: LiteRT interpreter threads (a worker runs one).
        reference: LiteRT's reference kernels instead of XNNPACK, which the service runs.
            They compute alike on every machine but take about 30 times as long (0.5 s an
            image for the default CNN here), too slow to score a split with.
    """
    family = str(entries.get("family", "cnn"))
    path = files[inference["file"]]
    if family == "texture":
        tex = _texture(path)
        return Artefact(family, image_size, _texture_runner(tex), None, tex)
    runner = _litert_runner(path, inference, threads, reference)
    cam = entries.get("cam")
    head = CamHead.load(files[cam["file"]]) if isinstance(cam, Mapping) else None
    tex = None
    if family == "ensemble":
        tex = _texture(files[entries["texture"]["file"]])
        temperature = float(entries["ensemble"]["cnn_temperature"])
        runner = _ensemble_runner(runner, tex, temperature)
    return Artefact(family, image_size, runner, head, tex)


# --------------------------------------------------------------------------- loading


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
            identity = _identity(path)
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


def _identity(path: Path) -> tuple[int, ...]:
    st = path.stat()
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _dropout_rate(keras_file: Path) -> float:
    """The rate of the layer named "dropout", read from the .keras zip's config (no TF; the
    file was checked by ModelFiles, and only its config is read, not its weights)."""
    try:
        with zipfile.ZipFile(keras_file) as zf:
            info = zf.getinfo("config.json")
            if info.file_size > _MAX_KERAS_CONFIG:
                return 0.0
            config = json.loads(zf.read(info))
    except (OSError, KeyError, zipfile.BadZipFile, json.JSONDecodeError, RecursionError):
        return 0.0
    stack: list[Any] = [config]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if node.get("class_name") == "Dropout" and node.get("config", {}).get("name") == (
                "dropout"
            ):
                return float(node["config"].get("rate", 0.0))
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return 0.0


def _litert_runner(
    path: Path, spec: Mapping[str, Any], threads: int, reference: bool = False
) -> Callable:
    from chestct.model.export import ExportError, LightModel

    try:
        light = LightModel.load(path, threads=threads, reference=reference)
    except (ExportError, ValueError, RuntimeError) as exc:
        raise ModelRefused(f"{path.name} is not a loadable LiteRT model ({exc})") from None
    names = spec.get("outputs") or {}
    feat, prob = names.get("features"), names.get("probabilities")
    logit = names.get("logits")
    if not feat or not prob:
        raise ModelRefused("card inference.outputs must name `features` and `probabilities`")

    def run(batch: np.ndarray) -> Outputs:
        out = light.run(batch)
        return Outputs(out[feat], out.get(logit) if logit else None, out[prob])

    return run


def _texture(path: Path) -> TextureModel:
    try:
        return texture_load(path)
    except TextureError as exc:
        raise ModelRefused(str(exc)) from None


def _texture_runner(model: TextureModel) -> Callable:
    """The texture family: features of the prepared slice, then the trees (chestct.model.texture);
    `features` is the standardised feature vector as a 1 x 1 map (its pooling is itself)."""

    def run(batch: np.ndarray) -> Outputs:
        out = model.outputs(batch[..., 0])
        return Outputs(out["features"], out["logits"], out["probabilities"])

    return run


def _cnn_temperature(card: ModelCard) -> float:
    spec = card.raw.get("ensemble")
    value = spec.get("cnn_temperature") if isinstance(spec, dict) else None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ModelRefused(f"card ensemble.cnn_temperature must be a number > 0, got {value!r}")
    return float(value)


def _ensemble_runner(cnn: Callable, tex: TextureModel, cnn_temperature: float) -> Callable:
    """The ensemble: the CNN's and the texture model's calibrated probabilities averaged
    (chestct.model.families.average); `features` stay the CNN's, for Grad-CAM and OOD."""

    def run(batch: np.ndarray) -> Outputs:
        out = cnn(batch)
        z = out.logits if out.logits is not None else np.log(np.clip(out.probabilities, 1e-12, 1))
        texture_out = tex.outputs(batch[..., 0])
        proba = average([softmax(z, cnn_temperature), softmax(texture_out["logits"])])
        return Outputs(out.features, log_probabilities(proba), proba)

    return run


def _keras_runner(path: Path) -> tuple[Callable, CamHead]:
    """Fallback when the card has no light artifact: Keras through one traced tf.function.
    Costs TensorFlow's memory (about 700 MB a worker); logged as a warning."""
    import keras
    import tensorflow as tf

    try:
        model = keras.models.load_model(path, compile=False)
        heads = keras.Model(
            model.inputs,
            [model.get_layer("features").output, model.get_layer("probabilities").output],
        )
        head = CamHead.from_model(model)
    except Exception as exc:  # Keras raises many types for a bad file
        raise ModelRefused(f"{path.name} is not a loadable Keras model ({exc})") from None
    infer = tf.function(lambda x: heads(x, training=False), reduce_retracing=True)

    def run(batch: np.ndarray) -> Outputs:
        features, probs = infer(tf.constant(batch))
        return Outputs(features.numpy(), None, probs.numpy())

    return run, head


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
                tex = _texture(light_path)
                runner = _texture_runner(tex)
            else:
                runner = _litert_runner(light_path, card.inference.info, threads)
            if card.family == "ensemble":
                if card.texture is None:
                    raise ModelRefused("an ensemble card needs a `texture` entry (its member)")
                tex = _texture(files.path(card.texture.file, "texture.file"))
                runner = _ensemble_runner(runner, tex, _cnn_temperature(card))
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
            runner, head = _keras_runner(keras_path)
            backend = "keras"
            notes.append("no light artifact in the card: served through Keras")

        if card.cam is not None:
            head_data = files.read(card.cam.file, "cam.file")
            try:
                head = CamHead.load(io.BytesIO(head_data))
            except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
                raise ModelRefused(
                    f"{card.cam.file} is not a readable head file ({exc})"
                ) from None
        elif head is None and card.family == "cnn":
            notes.append("card has no `cam` entry: /explain and MC-dropout are unavailable")

        ood = _ood(files, card.ood) if card.ood is not None else None
        if ood is None:
            notes.append("card has no `ood` entry: only the input checks guard against strangers")

        temperature = card.temperature
        if temperature is None:
            temperature = 1.0
            notes.append("card has no temperature: probabilities are not calibrated")
        if temperature <= 0:
            raise ModelRefused(f"card temperature must be > 0, got {temperature}")
        threshold = card.abstain_entropy
        if threshold is None:
            notes.append("card has no thresholds.abstain_entropy: abstain is not decided")
        if card.family == "cnn" and (folder / card.model_file).is_file():
            # Served with every uncertainty answer: read from the checked bytes only.
            dropout = _dropout_rate(files.path(card.model_file, "model_file"))
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


class Predictor:
    """One per worker: holds the current model and swaps in a newly promoted one.

    Loading is explicit (`load()` in the factory, which gunicorn runs in each worker after
    fork); importing this module loads nothing.
    """

    def __init__(
        self,
        model_dir: Path,
        threads: int = 1,
        reload_check_s: float = 1.0,
        default_window: tuple[float, float] = DEFAULT_WINDOW,
    ) -> None:
        self.model_dir = model_dir
        self.default_window = default_window
        self.threads = threads
        self.reload_check_s = reload_check_s
        self._model: Loaded | None = None
        self._identity: tuple[int, ...] | None = None
        self._checked = -float("inf")
        self._lock = threading.Lock()
        self.last_error: str | None = None

    @property
    def model(self) -> Loaded:
        model = self._model
        if model is None:
            raise ModelNotReady(self.last_error or "no model loaded yet")
        return model

    @property
    def ready(self) -> bool:
        return self._model is not None

    def _card_identity(self) -> tuple[int, ...] | None:
        try:
            st = (self.model_dir / CARD_NAME).stat()
        except OSError:
            return None
        return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)

    def load(self) -> Loaded:
        """Load model/ now (first load, or a forced reload). Raises ModelNotReady/Refused."""
        with self._lock:
            self._checked = time.monotonic()
            identity = self._card_identity()
            try:
                model = load_folder(self.model_dir, self.threads, self.default_window)
            except (ModelNotReady, ModelRefused) as exc:
                self.last_error = str(exc)
                self._identity = identity
                raise
            self._install(model, identity)
            return model

    def _install(self, model: Loaded, identity: tuple[int, ...] | None) -> None:
        old = self._model
        self._model, self._identity, self.last_error = model, identity, None
        for note in model.notes:
            log.warning("model %s v%s: %s", model.name, model.version, note)
        # One line per load and per hot swap: which model answers from now on, and from where.
        log.info(
            "serving model %s version %s (train run %s, %s) from %s%s",
            model.name,
            model.version,
            model.card.train_run_id or "unknown",
            model.backend,
            self.model_dir,
            f", replacing version {old.version}" if old else "",
        )

    def refresh(self) -> bool:
        """Switch to a newly promoted model if model.json changed; True when it switched.

        Checks at most every `reload_check_s` seconds. A folder that cannot be served is
        refused (logged once per change) and the current model keeps serving.
        """
        now = time.monotonic()
        if now - self._checked < self.reload_check_s:
            return False
        self._checked = now
        identity = self._card_identity()
        if identity is None or identity == self._identity:
            return False
        with self._lock:
            if identity == self._identity:
                return False
            try:
                model = load_folder(self.model_dir, self.threads, self.default_window)
            except (ModelNotReady, ModelRefused) as exc:
                self._identity = identity  # do not retry the same broken folder every second
                self.last_error = str(exc)
                if self._model is not None:
                    log.error(
                        "refused the new model in %s: %s; still serving version %s",
                        self.model_dir,
                        exc,
                        self._model.version,
                    )
                else:
                    log.error("cannot load the model in %s: %s", self.model_dir, exc)
                return False
            if self._model is not None and model.card_sha == self._model.card_sha:
                self._identity = identity  # same card rewritten: keep the warm model
                return False
            self._install(model, identity)
            return True


def seed_of(sha: str) -> int:
    """MC-dropout seed from the input's hash: the same image gets the same answer."""
    return int(sha[:16], 16)
