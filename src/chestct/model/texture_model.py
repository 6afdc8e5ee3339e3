"""The fitted texture model: its boosted trees, their calibration and its skops file.

`TextureModel` holds one or more fitted HistGradientBoostingClassifiers (a bag of boosters
with different seeds, `base_model.texture.bag`; their probabilities are averaged), one
temperature on the log-probabilities, and the train features' mean and scale (the OOD
statistics' standardisation). Prediction walks the trees with numpy (`FlatTrees`).

The model is stored with skops (`save` / `load`): loading refuses any type outside
`TRUSTED_TYPES`, so a tampered file cannot run code the way a pickle can.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from chestct.fsutil import staged_file
from chestct.labels import CLASSES
from chestct.model.calibration import Mahalanobis, softmax
from chestct.model.texture_features import feature_count, feature_matrix

FORMAT = "chestct-texture"
# 2: `classifier` is the list of the bag's boosters (1: one booster). Both are read.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)

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
    """A fitted texture model: its boosters, their calibration and the feature standardisation."""

    classifiers: list[Any]  # one booster, or a bag whose probabilities are averaged
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
    def trees(self) -> list[FlatTrees]:
        """Each booster's trees as FlatTrees, built on first use."""
        flat = self.__dict__.get("_trees")
        if flat is None:
            flat = self.__dict__["_trees"] = [FlatTrees.of(c) for c in self.classifiers]
        return flat

    def full_probabilities(self, features: np.ndarray) -> np.ndarray:
        """The boosters' probabilities over all CLASSES (a class absent from the train split
        gets 0), through FlatTrees, averaged over the bag."""
        out = np.zeros((len(features), len(self.classes)), np.float64)
        for classifier, trees in zip(self.classifiers, self.trees, strict=True):
            proba = trees.probabilities(features)
            for j, k in enumerate(classifier.classes_):
                out[:, int(k)] += proba[:, j]
        return out / len(self.classifiers)

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


def ood_statistics(model: TextureModel, x_train: np.ndarray) -> Mahalanobis:
    """Mahalanobis statistics of the standardised train features (the texture family's "gap")."""
    return Mahalanobis.fit(model.standardised(x_train))


# --------------------------------------------------------------------------- the file


def save(model: TextureModel, target: Path) -> Path:
    """Write the model as a skops file, atomically."""
    import skops.io as sio

    state = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "classifier": list(model.classifiers),
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
    if state.get("version") not in READABLE_VERSIONS:
        raise TextureError(
            f"{path.name} has format version {state.get('version')}; this chestct reads "
            f"{', '.join(map(str, READABLE_VERSIONS))}: retrain with `dvc repro train`"
        )
    mean = np.asarray(state["mean"], np.float64)
    if mean.shape != (feature_count(),):
        raise TextureError(
            f"{path.name} was fitted on {mean.size} features; this chestct computes "
            f"{feature_count()}: retrain with `dvc repro train`"
        )
    return TextureModel(
        classifiers=_boosters(state["classifier"]),
        temperature=float(state["temperature"]),
        mean=mean,
        scale=np.asarray(state["scale"], np.float64),
        image_size=int(state["image_size"]),
        classes=[str(c) for c in state["classes"]],
        details=dict(state.get("details") or {}),
    )


def _boosters(stored: Any) -> list[Any]:
    """The boosters of a stored model: version 1 holds one, version 2 a list."""
    return list(stored) if isinstance(stored, list | tuple) else [stored]
