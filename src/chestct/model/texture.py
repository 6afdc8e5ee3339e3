"""The texture (radiomics-style) model family: hand-made grey-level texture features of the
prepared slice and a gradient-boosted tree classifier on them.

One implementation of the features for train, evaluate, promote and serving: every caller
hands in the slice exactly as `imaging.prepare_slice` made it (body crop, intensity
normalisation, base.image_size), so the features see what the CNN sees.

The features (`FEATURE_GROUPS`, 1006 numbers at the default recipe):
- lbp: uniform local binary pattern histograms at radii 1, 2 and 3 (8 r neighbours each)
  inside the body mask;
- glcm: grey-level co-occurrence contrast, homogeneity, energy, correlation and dissimilarity
  at distances 1, 2, 4 and 8 px (averaged over 4 directions, 32 grey levels, body pixels only);
- histogram: a 32-bin grey histogram of the body;
- hog: histograms of oriented gradients of the slice at 96 px (16 px cells, 2 x 2 blocks).

The classifier is scikit-learn's HistGradientBoostingClassifier; its probabilities are
calibrated by one temperature on their logarithms, fitted on the valid split with
`chestct.model.calibration.fit_temperature`, the function that calibrates the CNN. The fitted
model is
stored with skops (`save` / `load`): loading refuses any type outside `TRUSTED_TYPES`, so a
tampered file cannot run code the way a pickle can.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from chestct.fsutil import staged_file
from chestct.labels import CLASSES
from chestct.model.calibration import Mahalanobis, fit_temperature, softmax

FORMAT = "chestct-texture"
FORMAT_VERSION = 1
LBP_RADII = (1, 2, 3)
GLCM_DISTANCES = (1, 2, 4, 8)
GLCM_ANGLES = (0.0, np.pi / 4, np.pi / 2, 3 * np.pi / 4)
GLCM_PROPS = ("contrast", "homogeneity", "energy", "correlation", "dissimilarity")
GLCM_LEVELS = 32
HIST_BINS = 32
HOG_SIDE = 96
HOG_CELL = 16
HOG_ORIENTATIONS = 9
# Where the body threshold lies between the darkest level (0) and Otsu's (1), as in
# imaging.body_box: the prepared slice is already cut to the body, this finds its outline.
MASK_LEVEL = 0.5
# The fewest body pixels for body-only statistics; a blank slice uses the whole frame.
MASK_MIN_PIXELS = 64
_EPS = 1e-12

# The types a texture.skops file may contain beyond skops' own defaults: what a fitted
# HistGradientBoostingClassifier is made of. Anything else is refused at load.
TRUSTED_TYPES = (
    "sklearn.ensemble._hist_gradient_boosting.gradient_boosting.HistGradientBoostingClassifier",
    "sklearn.ensemble._hist_gradient_boosting.binning._BinMapper",
    "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
    "sklearn._loss.loss.HalfMultinomialLoss",
    "sklearn._loss.link.MultinomialLogit",
    "sklearn._loss.link.Interval",
    "sklearn._loss._loss.CyHalfMultinomialLoss",
    "sklearn.utils._bunch.Bunch",
    "numpy.random.mtrand.RandomState",
    "numpy.random._mt19937.MT19937",
    "numpy.random._pcg64.PCG64",
    "numpy.random._generator.Generator",
    "builtins.slice",
)


class TextureError(ValueError):
    """A texture model file that cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class FeatureGroup:
    name: str
    start: int
    stop: int


def _lbp_bins(radius: int) -> int:
    return 8 * radius + 2  # uniform patterns of P = 8 r neighbours, plus "non-uniform"


def feature_groups(image_size: int = 0) -> list[FeatureGroup]:
    """Where each group of features lies in the feature vector (`image_size` is unused:
    the layout does not depend on it, HOG is computed at HOG_SIDE)."""
    del image_size
    cells = HOG_SIDE // HOG_CELL
    sizes = {
        "lbp": sum(_lbp_bins(r) for r in LBP_RADII),
        "glcm": len(GLCM_PROPS) * len(GLCM_DISTANCES),
        "histogram": HIST_BINS,
        "hog": (cells - 1) ** 2 * 4 * HOG_ORIENTATIONS,
    }
    groups, start = [], 0
    for name, size in sizes.items():
        groups.append(FeatureGroup(name, start, start + size))
        start += size
    return groups


def feature_count() -> int:
    return feature_groups()[-1].stop


def body_mask(image: np.ndarray) -> np.ndarray:
    """Boolean mask of the body in a prepared slice: above a level halfway between the
    darkest grey and Otsu's, holes (the lungs) filled. The whole frame when too little is
    found (a blank or uniform slice)."""
    low, high = int(image.min()), int(image.max())
    if high - low < 10:
        return np.ones(image.shape, bool)
    otsu, _ = cv2.threshold(image, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    _, mask = cv2.threshold(image, low + (otsu - low) * MASK_LEVEL, 255, cv2.THRESH_BINARY)
    padded = cv2.copyMakeBorder(mask, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    reach = padded.copy()
    flood = np.zeros((padded.shape[0] + 2, padded.shape[1] + 2), np.uint8)
    cv2.floodFill(reach, flood, (0, 0), 255)
    filled = (padded | ~reach)[1:-1, 1:-1] > 0
    if int(filled.sum()) < MASK_MIN_PIXELS:
        return np.ones(image.shape, bool)
    return filled


def lbp_uniform(image: np.ndarray, points: int, radius: float) -> np.ndarray:
    """Rotation-invariant uniform local binary patterns, as scikit-image's
    `local_binary_pattern(image, points, radius, method="uniform")` defines them: each
    neighbour on the circle (bilinear, zero outside the frame) at or above the centre is a 1;
    a pattern with at most two 0/1 changes along the circle's sequence is its number of ones,
    any other is `points + 1`. Computed with one OpenCV shift per neighbour for the whole
    slice (scikit-image walks pixel by pixel: about 10 x slower at radius 3)."""
    grey = image.astype(np.float32)
    bits = np.empty((points, *grey.shape), bool)
    for p in range(points):
        dy = round(-radius * np.sin(2 * np.pi * p / points), 5)
        dx = round(radius * np.cos(2 * np.pi * p / points), 5)
        shift = np.float32([[1, 0, dx], [0, 1, dy]])
        sample = cv2.warpAffine(
            grey,
            shift,
            (grey.shape[1], grey.shape[0]),
            flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=0,
        )
        bits[p] = sample >= grey
    # Sums of booleans as uint8 (points <= 255): numpy's count_nonzero along an axis is ~50 x
    # slower here.
    changes = (bits[1:] != bits[:-1]).sum(axis=0, dtype=np.uint8)
    return np.where(changes <= 2, bits.sum(axis=0, dtype=np.uint8), points + 1)


def texture_features(image: np.ndarray) -> np.ndarray:
    """The feature vector (float32, `feature_count()` long) of one prepared uint8 slice."""
    from skimage.feature import graycomatrix, graycoprops, hog

    if image.ndim == 3:
        image = image[..., 0]
    image = np.ascontiguousarray(np.clip(image, 0, 255).astype(np.uint8))
    mask = body_mask(image)
    parts: list[np.ndarray] = []
    for radius in LBP_RADII:
        points = 8 * radius
        codes = lbp_uniform(image, points, radius)
        hist = np.bincount(codes[mask].astype(np.int64), minlength=points + 2)[: points + 2]
        parts.append(hist / max(hist.sum(), 1))
    # Body pixels on levels 1..32, the surround on 0; the co-occurrences with 0 are dropped.
    levels = np.where(mask, 1 + (image.astype(np.int32) * GLCM_LEVELS) // 256, 0).astype(np.uint8)
    glcm = graycomatrix(
        levels, GLCM_DISTANCES, GLCM_ANGLES, levels=GLCM_LEVELS + 1, symmetric=True
    )[1:, 1:].astype(np.float64)
    glcm /= np.maximum(glcm.sum(axis=(0, 1), keepdims=True), _EPS)
    for prop in GLCM_PROPS:
        # (distances, angles) -> the mean over directions, one number per distance.
        parts.append(np.nan_to_num(graycoprops(glcm, prop)).mean(axis=1))
    hist = np.bincount(image[mask] // (256 // HIST_BINS), minlength=HIST_BINS)[:HIST_BINS]
    parts.append(hist / max(hist.sum(), 1))
    small = cv2.resize(image, (HOG_SIDE, HOG_SIDE), interpolation=cv2.INTER_AREA)
    parts.append(
        hog(
            small,
            orientations=HOG_ORIENTATIONS,
            pixels_per_cell=(HOG_CELL, HOG_CELL),
            cells_per_block=(2, 2),
            feature_vector=True,
        )
    )
    return np.concatenate(parts).astype(np.float32)


def feature_matrix(images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """Features of many prepared slices ((n, s, s) or (n, s, s, 1)), one row each."""
    rows = [texture_features(np.asarray(image)) for image in images]
    if not rows:
        return np.zeros((0, feature_count()), np.float32)
    return np.stack(rows)


# --------------------------------------------------------------------------- the classifier


@dataclass(frozen=True)
class ClassifierSpec:
    """HistGradientBoostingClassifier settings (params base_model.texture)."""

    max_iter: int = 300
    learning_rate: float = 0.05
    max_features: float = 0.5
    max_leaf_nodes: int = 31
    l2_regularization: float = 0.0
    class_weight: str = "balanced"  # balanced | none
    threads: int = 1


@contextlib.contextmanager
def limited_threads(threads: int) -> Iterator[None]:
    """OpenMP and BLAS pools held to `threads`: the trees' default (every core, spinning)
    crawls on a shared machine."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=max(1, int(threads))):
        yield


def _classifier(spec: ClassifierSpec, seed: int, max_iter: int) -> Any:
    from sklearn.ensemble import HistGradientBoostingClassifier

    return HistGradientBoostingClassifier(
        max_iter=max_iter,
        learning_rate=spec.learning_rate,
        max_features=spec.max_features,
        max_leaf_nodes=spec.max_leaf_nodes,
        l2_regularization=spec.l2_regularization,
        class_weight="balanced" if spec.class_weight == "balanced" else None,
        early_stopping=False,  # the valid split chooses the iterations (fit_texture)
        random_state=seed,
    )


@dataclass(frozen=True)
class FlatTrees:
    """Every tree of a fitted HistGradientBoostingClassifier in flat arrays, walked for all
    trees at once with numpy: the same raw scores as scikit-learn's predictor (which walks
    one tree per Python call, about 50 us each: 1200 trees would take 60 ms for one slice).
    Numerical splits only (the features have no categories; NaN goes the way the tree
    learned)."""

    feature: np.ndarray  # (nodes,) split feature
    threshold: np.ndarray  # (nodes,) go left when x <= threshold
    missing_left: np.ndarray  # (nodes,) NaN goes left
    left: np.ndarray
    right: np.ndarray
    leaf: np.ndarray  # (nodes,) bool
    value: np.ndarray  # (nodes,) leaf value
    roots: np.ndarray  # (trees,) root node of each tree
    member: np.ndarray  # (trees, classes) one-hot: the class column each tree adds to
    baseline: np.ndarray  # (classes,)
    depth: int

    @classmethod
    def of(cls, classifier: Any) -> FlatTrees:
        nodes, roots, klass = [], [], []
        offset = 0
        for iteration in classifier._predictors:
            for k, predictor in enumerate(iteration):
                record = predictor.nodes
                if record["is_categorical"].any():
                    raise TextureError("categorical splits are not supported by FlatTrees")
                shifted = record.copy()
                shifted["left"] += offset
                shifted["right"] += offset
                nodes.append(shifted)
                roots.append(offset)
                klass.append(k)
                offset += len(record)
        flat = np.concatenate(nodes)
        classes = int(classifier.n_trees_per_iteration_)
        member = np.zeros((len(roots), classes), np.float64)
        member[np.arange(len(roots)), klass] = 1.0
        return cls(
            feature=flat["feature_idx"].astype(np.intp),
            threshold=flat["num_threshold"].astype(np.float64),
            missing_left=flat["missing_go_to_left"].astype(bool),
            left=flat["left"].astype(np.intp),
            right=flat["right"].astype(np.intp),
            leaf=flat["is_leaf"].astype(bool),
            value=flat["value"].astype(np.float64),
            roots=np.asarray(roots, np.intp),
            member=member,
            baseline=np.asarray(classifier._baseline_prediction, np.float64).reshape(-1),
            depth=int(flat["depth"].max()) if len(flat) else 0,
        )

    def raw(self, x: np.ndarray) -> np.ndarray:
        """Raw scores (n, classes): baseline + the sum of each class's trees' leaf values."""
        x = np.asarray(x, np.float64)
        rows = np.arange(len(x))[:, None]
        node = np.broadcast_to(self.roots, (len(x), len(self.roots))).copy()
        for _ in range(self.depth):
            values = x[rows, self.feature[node]]
            go_left = np.where(
                np.isnan(values), self.missing_left[node], values <= self.threshold[node]
            )
            step = np.where(go_left, self.left[node], self.right[node])
            node = np.where(self.leaf[node], node, step)
        return self.baseline + self.value[node] @ self.member

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        """The classifier's predict_proba: softmax of the raw scores (multinomial loss), or
        with two classes in the train split one score, the second class's logit."""
        raw = self.raw(x)
        if raw.shape[1] == 1:
            return softmax(np.hstack([np.zeros_like(raw), raw]))
        return softmax(raw)


@dataclass
class TextureModel:
    """A fitted texture model: classifier, its calibration and the feature standardisation."""

    classifier: Any
    temperature: float  # on the log-probabilities, fitted on the valid split
    mean: np.ndarray  # of the train features: standardised features feed the OOD statistics
    scale: np.ndarray
    image_size: int
    classes: list[str] = field(default_factory=lambda: list(CLASSES))
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[None, int, int, int]:
        """As a Keras model's: callers read the side from index 1."""
        return (None, self.image_size, self.image_size, 1)

    @property
    def trees(self) -> FlatTrees:
        """The classifier's trees as FlatTrees, built on first use."""
        flat = self.__dict__.get("_trees")
        if flat is None:
            flat = self.__dict__["_trees"] = FlatTrees.of(self.classifier)
        return flat

    def full_probabilities(self, features: np.ndarray) -> np.ndarray:
        """The classifier's probabilities over all CLASSES (a class absent from the train
        split gets 0), through FlatTrees."""
        proba = self.trees.probabilities(features)
        out = np.zeros((len(features), len(self.classes)), np.float64)
        for j, k in enumerate(self.classifier.classes_):
            out[:, int(k)] = proba[:, j]
        return out

    def logits(self, features: np.ndarray) -> np.ndarray:
        """Calibrated log-probabilities: softmax of these is the served prediction."""
        return log_probabilities(self.full_probabilities(features)) / self.temperature

    def standardised(self, features: np.ndarray) -> np.ndarray:
        return ((features - self.mean) / self.scale).astype(np.float32)

    def outputs(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """The model contract of chestct.model.modeling for prepared images (n, s, s[, 1]):
        logits, probabilities, gap (standardised features) and features (gap as a 1 x 1 map)."""
        raw = feature_matrix(images)
        logits = self.logits(raw).astype(np.float32)
        gap = self.standardised(raw)
        return {
            "logits": logits,
            "probabilities": softmax(logits).astype(np.float32),
            "gap": gap,
            "features": gap[:, None, None, :],
        }


def log_probabilities(proba: np.ndarray) -> np.ndarray:
    return np.log(np.clip(proba, 1e-7, 1.0))


def fit_texture(
    train_images: np.ndarray,
    y_train: np.ndarray,
    valid_images: np.ndarray,
    y_valid: np.ndarray,
    spec: ClassifierSpec,
    seed: int,
) -> TextureModel:
    """Fit on the train split; the number of boosting iterations is the one with the lowest
    log-loss on the valid split (early stopping on valid), and one temperature on the
    log-probabilities is fitted on valid (metrics.fit_temperature, as for the CNN)."""
    x_train, x_valid = feature_matrix(train_images), feature_matrix(valid_images)
    return fit_texture_features(
        x_train, y_train, x_valid, y_valid, spec, seed, int(train_images.shape[1])
    )


def fit_texture_features(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_valid: np.ndarray,
    y_valid: np.ndarray,
    spec: ClassifierSpec,
    seed: int,
    image_size: int,
    curve: list[dict[str, float]] | None = None,
) -> TextureModel:
    """`fit_texture` on precomputed feature matrices. With `curve`, one row per boosting
    iteration is appended to it (epoch, loss, val_loss, val_accuracy, val_macro_f1), the
    texture family's training curve."""
    if len(np.unique(y_train)) < 2:
        raise TextureError("the texture model needs at least two classes in the train split")
    with limited_threads(spec.threads):
        model = _classifier(spec, seed, spec.max_iter).fit(x_train, y_train)
        losses = [
            _log_loss(y_valid, proba, model.classes_)
            for proba in model.staged_predict_proba(x_valid)
        ]
        if curve is not None:
            train_losses = [
                _log_loss(y_train, proba, model.classes_)
                for proba in model.staged_predict_proba(x_train)
            ]
            for i, proba in enumerate(model.staged_predict_proba(x_valid)):
                predicted = model.classes_[np.argmax(proba, axis=1)]
                figures = classification_metrics_of(y_valid, predicted)
                curve.append(
                    {"epoch": i + 1, "loss": train_losses[i], "val_loss": losses[i], **figures}
                )
        best = int(np.argmin(losses)) + 1
        truncate(model, best)
    mean = x_train.mean(axis=0).astype(np.float64)
    scale = x_train.std(axis=0).astype(np.float64)
    scale[scale < 1e-6] = 1.0
    texture = TextureModel(
        classifier=model,
        temperature=1.0,
        mean=mean,
        scale=scale,
        image_size=image_size,
        details={"iterations": best, "valid_log_loss": losses[best - 1], "threads": spec.threads},
    )
    fit = fit_temperature(y_valid, log_probabilities(texture.full_probabilities(x_valid)))
    texture.temperature = float(fit.temperature)
    texture.details.update(
        {
            "temperature": texture.temperature,
            "temperature_fitted": fit.fitted,
            "spec": asdict(spec),
            "features": feature_count(),
        }
    )
    return texture


def _log_loss(y: np.ndarray, proba: np.ndarray, classes: np.ndarray) -> float:
    """Mean negative log-probability of the true class (classes absent from the fit: 1e-7)."""
    p = np.full(len(y), 1e-7)
    for j, k in enumerate(classes):
        p = np.where(y == k, np.clip(proba[:, j], 1e-7, 1.0), p)
    return float(-np.mean(np.log(p)))


def classification_metrics_of(y: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """Validation accuracy and macro-F1 (over the classes present in `y`) of hard labels."""
    from sklearn.metrics import f1_score

    return {
        "val_accuracy": float(np.mean(predicted == y)),
        "val_macro_f1": float(f1_score(y, predicted, average="macro", labels=np.unique(y))),
    }


def truncate(classifier: Any, iterations: int) -> None:
    """Keep the first `iterations` boosting iterations of a fitted HistGradientBoosting model:
    exactly the model `staged_predict_proba` scored at that stage (its trees are a prefix),
    without fitting again. Reaches into the estimator's `_predictors` list (scikit-learn is
    pinned; tests/unit/test_texture.py checks the equality)."""
    if not 1 <= iterations <= classifier.n_iter_:
        raise ValueError(f"cannot keep {iterations} of {classifier.n_iter_} iterations")
    classifier._predictors = classifier._predictors[:iterations]  # n_iter_ is its length
    classifier.max_iter = iterations


def ood_statistics(model: TextureModel, x_train: np.ndarray) -> Mahalanobis:
    """Mahalanobis statistics of the standardised train features (the texture family's "gap")."""
    return Mahalanobis.fit(model.standardised(x_train))


# --------------------------------------------------------------------------- explanations

OCCLUSION_TILES = 6  # a 6 x 6 grid of tiles over the prepared slice
OCCLUSION_BLUR = 7  # px (odd): an occluded tile keeps its mean grey but loses its texture


def occlusion_map(model: TextureModel, image: np.ndarray, class_index: int) -> np.ndarray:
    """Where the texture drove the answer: for each tile of an OCCLUSION_TILES grid, how much
    the class's calibrated probability drops when that tile's texture is blurred away (its
    grey level kept), scaled to [0, 1] over the slice (all zeros when nothing lowers it).
    Tiles outside the body are skipped (no texture to remove)."""
    image = np.ascontiguousarray(np.asarray(image, np.float32).reshape(image.shape[:2]))
    grey = np.clip(image, 0, 255).astype(np.uint8)
    side_y, side_x = grey.shape
    blurred = cv2.GaussianBlur(grey, (OCCLUSION_BLUR, OCCLUSION_BLUR), 0)
    mask = body_mask(grey)
    edges_y = np.linspace(0, side_y, OCCLUSION_TILES + 1).astype(int)
    edges_x = np.linspace(0, side_x, OCCLUSION_TILES + 1).astype(int)
    variants, where = [grey], []
    for i in range(OCCLUSION_TILES):
        for j in range(OCCLUSION_TILES):
            ys, xs = slice(edges_y[i], edges_y[i + 1]), slice(edges_x[j], edges_x[j + 1])
            if not mask[ys, xs].any():
                continue
            occluded = grey.copy()
            occluded[ys, xs] = blurred[ys, xs]
            variants.append(occluded)
            where.append((ys, xs))
    proba = softmax(model.logits(feature_matrix(variants)))[:, class_index]
    heat = np.zeros((side_y, side_x), np.float32)
    for (ys, xs), p in zip(where, proba[1:], strict=True):
        heat[ys, xs] = max(float(proba[0] - p), 0.0)
    top = float(heat.max())
    return heat / top if top > 0 else heat


def group_importance(model: TextureModel, image: np.ndarray, class_index: int) -> dict[str, float]:
    """How much each feature group carries the answer for this slice: the drop of the class's
    calibrated probability when the group's features are set to the train split's mean
    (negative: the group argued against the class)."""
    raw = feature_matrix([np.asarray(image).reshape(np.asarray(image).shape[:2])])
    variants = [raw[0]]
    groups = feature_groups()
    for group in groups:
        neutral = raw[0].copy()
        neutral[group.start : group.stop] = model.mean[group.start : group.stop]
        variants.append(neutral)
    proba = softmax(model.logits(np.stack(variants)))[:, class_index]
    return {g.name: float(proba[0] - p) for g, p in zip(groups, proba[1:], strict=True)}


# --------------------------------------------------------------------------- the file


def save(model: TextureModel, target: Path) -> Path:
    """Write the model as a skops file, atomically."""
    import skops.io as sio

    state = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "classifier": model.classifier,
        "temperature": float(model.temperature),
        "mean": np.asarray(model.mean, np.float64),
        "scale": np.asarray(model.scale, np.float64),
        "image_size": int(model.image_size),
        "classes": list(model.classes),
        "details": _plain(model.details),
    }
    with staged_file(target) as tmp:
        sio.dump(state, tmp)
    return target


def _plain(value: Any) -> Any:
    """JSON-like copy (skops stores dicts of str/float/int/bool/list as trusted types)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def load(path: Path) -> TextureModel:
    """Read a texture.skops file; refuse any object type outside TRUSTED_TYPES.

    Raises:
        TextureError: not a skops file, untrusted content or not a chestct texture model.
    """
    import skops.io as sio

    try:
        untrusted = sio.get_untrusted_types(file=path)
    except Exception as exc:  # skops raises several types for a file that is not its own
        raise TextureError(f"{path.name} is not a readable skops file ({exc})") from None
    refused = sorted(set(untrusted) - set(TRUSTED_TYPES))
    if refused:
        raise TextureError(
            f"{path.name} holds types a texture model never contains ({', '.join(refused)}); "
            "refusing to load it: retrain with `dvc repro train`"
        )
    try:
        state = sio.load(path, trusted=[t for t in untrusted if t in TRUSTED_TYPES])
    except Exception as exc:
        raise TextureError(f"{path.name} cannot be loaded ({exc})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise TextureError(f"{path.name} is not a chestct texture model")
    if state.get("version") != FORMAT_VERSION:
        raise TextureError(
            f"{path.name} has format version {state.get('version')}; this chestct reads "
            f"{FORMAT_VERSION}: retrain with `dvc repro train`"
        )
    mean = np.asarray(state["mean"], np.float64)
    if mean.shape != (feature_count(),):
        raise TextureError(
            f"{path.name} was fitted on {mean.size} features; this chestct computes "
            f"{feature_count()}: retrain with `dvc repro train`"
        )
    return TextureModel(
        classifier=state["classifier"],
        temperature=float(state["temperature"]),
        mean=mean,
        scale=np.asarray(state["scale"], np.float64),
        image_size=int(state["image_size"]),
        classes=[str(c) for c in state["classes"]],
        details=dict(state.get("details") or {}),
    )
