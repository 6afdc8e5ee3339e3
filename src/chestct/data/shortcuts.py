"""Does file metadata, or how a slice was acquired, give the class away?

A model that sees only what a file *is* (width, height, aspect, colour mode, byte size, format,
mean intensity) and how it was *acquired* (how much of the frame the body fills, the body's
aspect, the background's grey level and the body's darkest and brightest grey levels; see
chestct.data.acquisition) and not what it *shows* should be at chance. When it is well above
chance,
a CNN can learn the same shortcut instead of the anatomy (in the public Kaggle chest CT set,
normal slices are larger images than cancer slices, and the classes were exported with other
framing and grey levels). `detect_shortcut` cross-validates a random forest on those features,
grouped so that copies of one image (and slices of one patient) never sit on both sides of a
fold, scores the pixel cues together on their own, and scores each feature family and each
feature alone (a depth-4 decision tree for a single feature) to say which one leaks.

The body's median grey level is measured (chestct.data.acquisition) but left out here: a large
lesion moves it, so it carries anatomy as well as acquisition (on the embedded synthetic
default, where the lesion is the only difference between classes, it alone reaches a balanced
accuracy of 0.53 against chance 0.25; the features used here stay near 0.3).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

# Feature families: each is scored alone as well as together.
FAMILIES: dict[str, tuple[str, ...]] = {
    "size": ("width", "height", "aspect"),
    "bytes": ("log_bytes",),
    "mode/format": ("mode", "format"),
    "mean intensity": ("mean",),
    "body box": ("body_share", "body_aspect"),
    "grey levels": ("background", "body_p05", "body_p95"),
}
# What only the pixels show: scored together as the acquisition check.
PIXEL_FEATURES: tuple[str, ...] = FAMILIES["body box"] + FAMILIES["grey levels"]
# Numeric features that are also scored one by one.
_SINGLE: tuple[str, ...] = ("width", "height", "aspect", "log_bytes", "mean", *PIXEL_FEATURES)


@dataclass(frozen=True)
class ShortcutResult:
    """Cross-validated balanced accuracy from metadata alone, against chance (1 / classes)."""

    score: float
    chance: float
    folds: int
    images: int
    by_family: dict[str, float] = field(default_factory=dict)
    pixels: float | None = None  # the pixel acquisition features together; None: not measured
    by_feature: dict[str, float] = field(default_factory=dict)  # each feature alone, best first

    def leaks(self, margin: float) -> bool:
        return self.score >= self.chance + margin

    def pixels_leak(self, margin: float) -> bool:
        return self.pixels is not None and self.pixels >= self.chance + margin

    def strongest(self) -> str:
        return max(self.by_family, key=self.by_family.__getitem__) if self.by_family else ""

    def top_features(self, count: int = 3, among: tuple[str, ...] | None = None) -> str:
        """The features that give the class away best on their own, as 'name score, ...'."""
        chosen = [(k, v) for k, v in self.by_feature.items() if among is None or k in among]
        return ", ".join(f"{k} {v:.2f}" for k, v in chosen[:count])


def metadata_features(frame: pd.DataFrame) -> pd.DataFrame:
    """Numeric features from manifest columns (width, height, mode, format, bytes), the mean
    grey level (`frame_mean`, the stored slice's, when the frame has it; else the resized
    slice's `mean`), and the pixel acquisition features (PIXEL_FEATURES) when present."""
    out = pd.DataFrame(index=frame.index)
    out["width"] = frame["width"].astype(float)
    out["height"] = frame["height"].astype(float)
    out["aspect"] = out["width"] / out["height"].clip(lower=1)
    out["log_bytes"] = np.log1p(frame["bytes"].astype(float))
    # The slice's mean grey as stored (ingest) when known: the resized slice's mean says
    # nothing about acquisition once preprocessing normalises grey levels over the body.
    stored = frame["frame_mean"] if "frame_mean" in frame.columns else None
    if stored is not None and pd.to_numeric(stored, errors="coerce").notna().all():
        out["mean"] = stored.astype(float)
    else:
        out["mean"] = frame["mean"].astype(float).fillna(0.0)
    for column in ("mode", "format"):
        dummies = pd.get_dummies(frame[column].astype(str), prefix=column, dtype=float)
        out = out.join(dummies)
    for column in PIXEL_FEATURES:
        if column in frame.columns:
            out[column] = pd.to_numeric(frame[column], errors="coerce").fillna(-1.0)
    return out


def _columns(features: pd.DataFrame, family: tuple[str, ...]) -> list[str]:
    return [c for c in features.columns if c in family or c.split("_")[0] in family]


def _has_pixels(features: pd.DataFrame) -> bool:
    return all(c in features.columns for c in PIXEL_FEATURES)


def detect_shortcut(
    frame: pd.DataFrame,
    groups: pd.Series,
    seed: int,
    max_folds: int = 5,
    family_margin: float = 0.1,
) -> ShortcutResult | None:
    """Cross-validated balanced accuracy of a classifier on metadata and acquisition features,
    or None when there are too few images per class for at least two folds.

    Args:
        frame: one row per image with label, width, height, mode, format, bytes and mean, and
            optionally the PIXEL_FEATURES (then they are also scored together, as `pixels`).
        groups: group per row (copies, and slices of one patient, stay on one side of every
            fold).
        seed: for the folds and the forest.
        max_folds: at most this many folds (fewer when a class has fewer groups).
        family_margin: above chance + this, each feature family is also scored alone.
    """
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict
    from sklearn.tree import DecisionTreeClassifier

    labels = frame["label"].astype(str)
    per_class = labels.groupby(groups).first().value_counts()
    classes = int(labels.nunique())
    folds = int(min(max_folds, per_class.min())) if classes > 1 else 0
    if folds < 2:
        return None
    features = metadata_features(frame)
    cv = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)

    def score(columns: list[str]) -> float:
        model: RandomForestClassifier | DecisionTreeClassifier
        if len(columns) == 1:
            # One feature needs no forest: a shallow tree cuts it into a few bands, at a
            # hundredth of the cost.
            model = DecisionTreeClassifier(max_depth=4, min_samples_leaf=3, random_state=seed)
        else:
            model = RandomForestClassifier(
                n_estimators=30, max_depth=8, min_samples_leaf=3, random_state=seed, n_jobs=1
            )
        with warnings.catch_warnings():
            # A fold may miss a rare class entirely; the score stays meaningful.
            warnings.simplefilter("ignore", UserWarning)
            predicted = cross_val_predict(
                model, features[columns].to_numpy(), labels.to_numpy(), groups=groups, cv=cv
            )
            return float(balanced_accuracy_score(labels, predicted))

    overall = round(score(list(features.columns)), 4)
    chance = round(1.0 / classes, 4)
    pixels = round(score(list(PIXEL_FEATURES)), 4) if _has_pixels(features) else None
    by_family: dict[str, float] = {}
    by_feature: dict[str, float] = {}
    if max(overall, pixels or 0.0) >= chance + family_margin:
        # Only worth the extra fits when there is a leak to explain.
        by_family = {
            name: round(score(cols), 4)
            for name, family in FAMILIES.items()
            if (cols := _columns(features, family))
        }
        singles = {c: round(score([c]), 4) for c in _SINGLE if c in features.columns}
        by_feature = dict(sorted(singles.items(), key=lambda kv: -kv[1]))
    return ShortcutResult(
        score=overall,
        chance=chance,
        folds=folds,
        images=len(frame),
        by_family=by_family,
        pixels=pixels,
        by_feature=by_feature,
    )
