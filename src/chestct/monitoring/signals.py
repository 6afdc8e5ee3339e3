"""Monitoring after promotion: per-request signals, the reference profile and drift statistics.

One implementation for every side: evaluate fits the reference profile on the valid and test
splits with `fit_reference`; the predictor computes each request's signals with
`image_signals` / `request_signals` and bins them with `bin_index` for the rolling drift
figures on /metrics; `python -m chestct.monitoring.monitor` compares a window of the audit log
with the reference through chestct.monitoring.drift. Only NumPy at import (the serving image has
no SciPy).

Continuous signals have fixed bin edges (the same for Prometheus histogram buckets, the
reference fractions and the population stability index), so a profile fitted once can be
compared with any window without refitting.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from pathlib import Path

    from chestct.imaging.body import BodyBox


@dataclass(frozen=True)
class Signal:
    """One continuous per-request signal and the fixed upper edges of its bins."""

    name: str
    help: str
    edges: tuple[float, ...]  # upper bounds; a last open bin (+Inf) follows

    def bins(self) -> int:
        return len(self.edges) + 1


REFERENCE_FILE = "reference.json"
PROFILE_VERSION = 1
# Grey level (0..255, decoded slice) above which a pixel counts as body rather than air/lung:
# the share of such pixels grows when a scanner zooms in on the chest.
FOREGROUND_GREY = 48
# The acquisition signals read a grid of about this many pixels a side of the decoded slice:
# means and shares need no more, and a 512 x 512 slice then costs a few microseconds.
SAMPLE_SIDE = 128
# Smoothing of empty bins in the PSI: a fraction of 0 would make ln(a / e) infinite.
PSI_FLOOR = 1e-4

SIGNALS: tuple[Signal, ...] = (
    Signal(
        "top_probability",
        "calibrated probability of the predicted class",
        (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99),
    ),
    Signal(
        "entropy",
        "normalised predictive entropy (0 certain, 1 uniform)",
        (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
    ),
    Signal(
        "ood_ratio",
        "Mahalanobis distance of the pooled features over the model's OOD threshold "
        "(above 1: out of distribution)",
        (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0),
    ),
    Signal(
        "mean_grey",
        "mean grey level (0..255) of the decoded slice",
        (32, 48, 64, 80, 96, 112, 128, 144, 160, 192),
    ),
    Signal(
        "input_side",
        "the longer side, in pixels, of the slice as sent",
        (64, 128, 256, 384, 512, 768, 1024, 2048),
    ),
    Signal(
        "foreground",
        f"share of the slice's pixels above grey {FOREGROUND_GREY} (body in the frame)",
        (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
    ),
    # The acquisition cues of chestct.data.acquisition (imaging.body_features), read around the
    # body box: a zoom or a wider field moves the box's share of the frame, another scanner or
    # export moves the grey of the surround and of the body.
    Signal(
        "body_share",
        "area of the body's bounding box over the frame's (zoom, field of view)",
        (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98),
    ),
    Signal(
        "body_aspect",
        "width over height of the body's bounding box (framing, a stretched export)",
        (0.8, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.8, 2.0, 2.5),
    ),
    Signal(
        "background",
        "mean grey level (0..255) outside the body's box (the surround a scanner exports)",
        (1, 2, 5, 10, 20, 30, 45, 60, 90, 128),
    ),
    Signal(
        "body_p50",
        "median grey level (0..255) inside the body's box (window, brightness)",
        (32, 48, 64, 80, 96, 112, 128, 144, 160, 192),
    ),
)
SIGNAL_NAMES: tuple[str, ...] = tuple(s.name for s in SIGNALS)
# The signals imaging.body_features gives (read around the body box).
ACQUISITION_SIGNALS: tuple[str, ...] = ("body_share", "body_aspect", "background", "body_p50")
BY_NAME: dict[str, Signal] = {s.name: s for s in SIGNALS}
CLASS_SIGNAL = "predicted_class"
FLAGS: tuple[str, ...] = ("abstain", "ood")
# Requests the input checks refused (422, not a chest CT slice): judged as a share of all
# requests, answered and refused. The reference's slices are the valid and test splits, which
# the model answered, so a profile without a measured refusal rate expects none.
REFUSED = "refused"


# --------------------------------------------------------------------------- per request


def image_signals(grey: np.ndarray, body: BodyBox | None = None) -> dict[str, float]:
    """Acquisition signals of one decoded slice (uint8 H x W, before the model's resizing and
    any normalisation, which would hide a zoom or a grey-level change): its size, mean grey,
    share of body pixels, and the body box's share of the frame, aspect, surround grey and
    median grey (imaging.body_features, as chestct.data.acquisition reads them).

    Everything is read on a grid of about SAMPLE_SIDE pixels a side. `body` is the slice's
    `imaging.body_box(grey, 0.0)` when the model's body crop found it already
    (imaging.Prepared.body: reused, not looked for twice); without it the box is looked for on
    that grid, at a quarter of the cost. fit_reference follows the served model's way
    (`body_crop`), so the reference and the requests read the same box.
    """
    from chestct.imaging.body import body_box, body_features

    grey = _grey_u8(grey)
    step = max(1, max(grey.shape) // SAMPLE_SIDE)
    # One copy of the grid: NumPy's reductions below run on contiguous memory (the same pixels).
    sample = np.ascontiguousarray(grey[::step, ::step])
    box = body_box(sample, 0.0) if body is None else _on_grid(body, step, sample.shape)
    features = body_features(sample, box)
    return {
        "input_side": float(max(grey.shape)),
        "mean_grey": float(sample.mean()),
        "foreground": float(np.count_nonzero(sample > FOREGROUND_GREY)) / sample.size,
        **{name: features[name] for name in ACQUISITION_SIGNALS},
    }


def _grey_u8(grey: np.ndarray) -> np.ndarray:
    """A 2-D uint8 slice: a model input handed back as floats (decoded_greys' fallback) is
    rounded into 0..255."""
    grey = np.asarray(grey)
    if grey.ndim == 3:
        grey = grey[..., 0]
    if grey.dtype != np.uint8:
        grey = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
    return grey


def _on_grid(box: BodyBox, step: int, shape: tuple[int, ...]) -> BodyBox:
    """`box` (slice pixels) on the grid `grey[::step, ::step]` of that slice: the grid points
    it covers, clipped to the frame and at least one point wide."""
    from chestct.imaging.body import BodyBox

    height, width = shape[:2]
    x0 = min(width - 1, max(0, -(-box.x // step)))
    y0 = min(height - 1, max(0, -(-box.y // step)))
    x1 = min(width, max(x0 + 1, -(-(box.x + box.w) // step)))
    y1 = min(height, max(y0 + 1, -(-(box.y + box.h) // step)))
    return BodyBox(x0, y0, x1 - x0, y1 - y0, box.reason)


def decoded_greys(originals: Sequence[Any], root: Path, fallback: np.ndarray) -> list[np.ndarray]:
    """The slices as serving decodes them: each ingested original (a path relative to `root`)
    through chestct.imaging, else the model input at the same index of `fallback`."""
    from chestct.imaging.decoding import decode
    from chestct.imaging.formats import ImageError

    greys = []
    for i, original in enumerate(originals):
        path = root / original if isinstance(original, str) and original else None
        try:
            if path is not None and path.is_file():
                greys.append(decode(path.read_bytes()).grey)
                continue
        except ImageError:  # e.g. a DICOM original: its window is ingest's business
            pass
        greys.append(np.asarray(fallback[i]).squeeze())
    return greys


def request_signals(
    probabilities: np.ndarray,
    entropy: float,
    ood_distance: float | None,
    ood_threshold: float | None,
    grey: np.ndarray,
    body: BodyBox | None = None,
) -> dict[str, float | None]:
    """All continuous signals of one prediction, by SIGNALS name (None when not measured);
    `body` as in image_signals."""
    ratio = None
    if ood_distance is not None and ood_threshold:
        ratio = float(ood_distance) / float(ood_threshold)
    return {
        "top_probability": float(probabilities.max()),
        "entropy": float(entropy),
        "ood_ratio": ratio,
        **image_signals(grey, body),
    }


def bin_index(edges: Sequence[float], value: float) -> int:
    """The bin of `value` among upper `edges` (le semantics, as Prometheus buckets); NaN
    falls in the last bin, as np.searchsorted puts it (bin_counts)."""
    if value != value:  # NaN: no comparison holds
        return len(edges)
    return bisect.bisect_left(edges, value)  # on a short tuple, far cheaper than NumPy's


def bin_counts(edges: Sequence[float], values: np.ndarray) -> np.ndarray:
    """Counts per bin (len(edges) + 1 bins) of finite values."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    idx = np.searchsorted(np.asarray(edges, dtype=np.float64), values, side="left")
    return np.bincount(idx, minlength=len(edges) + 1)


# --------------------------------------------------------------------------- reference


def fit_reference(
    *,
    classes: Sequence[str],
    probabilities: np.ndarray,
    ood_distance: np.ndarray | None,
    ood_threshold: float | None,
    abstain_threshold: float | None,
    greys: Sequence[np.ndarray],
    labels: Sequence[str] | None = None,
    source: str = "valid + test splits",
    body_crop: bool = False,
) -> dict[str, Any]:
    """The reference profile: what served requests should look like.

    Args:
        classes: the model's classes, in output order.
        probabilities: calibrated probabilities (n, len(classes)), as served.
        ood_distance: Mahalanobis distance of each image's pooled features (n,), or None.
        ood_threshold: the card's OOD threshold.
        abstain_threshold: the card's abstain entropy.
        greys: the decoded slices (uint8 H x W each), as serving sees them before resizing.
        labels: true labels (for the true class mix, reported beside the predicted one).
        source: where the images came from, for the report.
        body_crop: the model crops to the body (params `resize.crop: body`): serving then reads
            the body-box signals around the box its crop found, and so does the reference.

    Returns:
        A JSON-ready dict: per signal the fixed edges, counts, fractions and the sorted values
        (for two-sample tests), the predicted-class mix and the expected abstain and OOD rates.
    """
    from chestct.model.calibration import abstains, normalised_entropy

    proba = np.asarray(probabilities, dtype=np.float64)
    n = len(proba)
    if n == 0 or proba.shape[1] != len(classes):
        raise ValueError(
            f"the reference needs probabilities of shape (n > 0, {len(classes)}), "
            f"got {proba.shape}"
        )
    if len(greys) != n:
        raise ValueError(f"the reference has {n} probabilities but {len(greys)} slices")
    entropy = normalised_entropy(proba)
    values = _reference_values(proba, entropy, greys, body_crop, ood_distance, ood_threshold)
    signals = {
        sig.name: _continuous_profile(sig, np.sort(values[sig.name]), n)
        for sig in SIGNALS
        if sig.name in values
    }
    predicted = np.bincount(proba.argmax(axis=1), minlength=len(classes))
    signals[CLASS_SIGNAL] = {
        "kind": "categorical",
        "help": "predicted class",
        "categories": list(classes),
        "counts": predicted.tolist(),
        "fractions": (predicted / n).round(6).tolist(),
    }
    rates: dict[str, float | None] = {
        "abstain": None
        if abstain_threshold is None
        else round(float(np.mean(abstains(entropy, abstain_threshold))), 6),
        "ood": None
        if "ood_ratio" not in values
        else round(float(np.mean(values["ood_ratio"] > 1)), 6),
    }
    profile: dict[str, Any] = {
        "profile_version": PROFILE_VERSION,
        "source": source,
        "n": n,
        "signals": signals,
        "rates": rates,
    }
    if labels is not None:
        actual = [list(labels).count(c) for c in classes]
        profile["true_class_mix"] = {
            c: round(k / n, 6) for c, k in zip(classes, actual, strict=True)
        }
    return profile


def _reference_values(
    proba: np.ndarray,
    entropy: np.ndarray,
    greys: Sequence[np.ndarray],
    body_crop: bool,
    ood_distance: np.ndarray | None,
    ood_threshold: float | None,
) -> dict[str, np.ndarray]:
    """Every continuous signal's value per reference image."""
    from chestct.imaging.body import body_box

    slices = [_grey_u8(g) for g in greys]
    acquired = [image_signals(g, body_box(g, 0.0) if body_crop else None) for g in slices]
    values: dict[str, np.ndarray] = {
        "top_probability": proba.max(axis=1),
        "entropy": entropy,
        **{k: np.array([a[k] for a in acquired]) for k in acquired[0]},
    }
    if ood_distance is not None and ood_threshold:
        values["ood_ratio"] = np.asarray(ood_distance, np.float64) / float(ood_threshold)
    return values


def _continuous_profile(sig: Signal, v: np.ndarray, n: int) -> dict[str, Any]:
    """One continuous signal of the profile from its sorted values."""
    counts = bin_counts(sig.edges, v)
    return {
        "kind": "continuous",
        "help": sig.help,
        "edges": list(sig.edges),
        "counts": counts.tolist(),
        "fractions": (counts / n).round(6).tolist(),
        "mean": round(float(v.mean()), 6),
        "values": [round(float(x), 6) for x in v],
    }


def reference_rates(profile: Mapping[str, Any]) -> dict[str, float | None]:
    """The rates a profile expects: abstain and ood as fitted, refused as fitted or else 0."""
    rates = dict(profile.get("rates") or {})
    if rates.get(REFUSED) is None:
        rates[REFUSED] = 0.0
    return rates


def check_reference(profile: Any, where: str) -> dict[str, Any]:
    """A loaded profile, or ValueError naming what is wrong with it and where."""
    if not isinstance(profile, dict) or profile.get("profile_version") != PROFILE_VERSION:
        raise ValueError(
            f"{where} is not a chestct reference profile (version {PROFILE_VERSION}); "
            "rerun `dvc repro evaluate promote` to write one"
        )
    signals = profile.get("signals")
    if not isinstance(signals, dict) or CLASS_SIGNAL not in signals:
        raise ValueError(f"{where} has no signals; rerun `dvc repro evaluate promote`")
    for name, entry in signals.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("fractions"), list):
            raise ValueError(f"{where}: signal {name!r} has no fractions")
        if name in BY_NAME and list(entry.get("edges", [])) != list(BY_NAME[name].edges):
            raise ValueError(
                f"{where}: signal {name!r} was binned with other edges than this chestct "
                "version uses; rerun `dvc repro evaluate promote`"
            )
    return profile


# --------------------------------------------------------------------------- statistics


def psi(expected: Sequence[float], observed_counts: Sequence[float]) -> float:
    """Population stability index of observed counts against expected fractions.

    Conventional reading: below 0.1 stable, 0.1-0.25 a moderate shift, above 0.25 a major one.
    """
    e = np.maximum(np.asarray(expected, dtype=np.float64), PSI_FLOOR)
    counts = np.asarray(observed_counts, dtype=np.float64)
    total = counts.sum()
    if total <= 0:
        return float("nan")
    a = np.maximum(counts / total, PSI_FLOOR)
    e = e / e.sum()
    a = a / a.sum()
    return float(np.sum((a - e) * np.log(a / e)))
