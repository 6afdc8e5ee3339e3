"""Monitoring after promotion: per-request signals, the reference profile and drift statistics.

One implementation for every side: evaluate fits the reference profile on the valid and test
splits with `fit_reference`; the predictor computes each request's signals with
`image_signals` / `request_signals` and bins them with `bin_index` for the rolling drift
figures on /metrics; `python -m chestct.monitoring.monitor` compares a window of the audit log
with the
reference through `compare`. Only NumPy at import (the serving image has no SciPy); the
two-sample tests import SciPy when they run.

Continuous signals have fixed bin edges (the same for Prometheus histogram buckets, the
reference fractions and the population stability index), so a profile fitted once can be
compared with any window without refitting.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from pathlib import Path

    from chestct.imaging.body import BodyBox

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


@dataclass(frozen=True)
class Signal:
    """One continuous per-request signal and the fixed upper edges of its bins."""

    name: str
    help: str
    edges: tuple[float, ...]  # upper bounds; a last open bin (+Inf) follows

    def bins(self) -> int:
        return len(self.edges) + 1


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
    sample = grey[::step, ::step]
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
    signals: dict[str, Any] = {}
    for sig in SIGNALS:
        if sig.name not in values:
            continue
        v = np.sort(values[sig.name])
        counts = bin_counts(sig.edges, v)
        signals[sig.name] = {
            "kind": "continuous",
            "help": sig.help,
            "edges": list(sig.edges),
            "counts": counts.tolist(),
            "fractions": (counts / n).round(6).tolist(),
            "mean": round(float(v.mean()), 6),
            "values": [round(float(x), 6) for x in v],
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


def ks_test(reference: Sequence[float], window: Sequence[float]) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov statistic and p-value."""
    from scipy.stats import ks_2samp

    res = ks_2samp(np.asarray(reference, np.float64), np.asarray(window, np.float64))
    return float(res.statistic), float(res.pvalue)


def chi_square_test(
    reference_counts: Sequence[int], window_counts: Sequence[int]
) -> tuple[float, float]:
    """Chi-square test of homogeneity of two count vectors over the same categories."""
    from scipy.stats import chi2_contingency

    table = np.array([reference_counts, window_counts], dtype=np.float64)
    table = table[:, table.sum(axis=0) > 0]
    if table.shape[1] < 2 or (table.sum(axis=1) == 0).any():
        return 0.0, 1.0
    stat, p, _, _ = chi2_contingency(table)
    return float(stat), float(p)


def rate_test(count: int, n: int, expected: float) -> float:
    """One-sided binomial p-value that the rate is above `expected`."""
    from scipy.stats import binomtest

    if n == 0:
        return 1.0
    expected = min(max(expected, 1e-6), 1 - 1e-6)
    return float(binomtest(count, n, expected, alternative="greater").pvalue)


@dataclass(frozen=True)
class Thresholds:
    """When a difference counts as drift (config/config.yaml `monitor:`)."""

    psi: float = 0.25
    p_value: float = 0.01
    rate_margin: float = 0.10
    min_requests: int = 50
    min_labelled: int = 20
    performance_drop: float = 0.10


@dataclass
class Window:
    """Served predictions to compare with the reference (from the audit log)."""

    labels: list[str]  # predicted class per request
    signals: dict[str, list[float]]  # continuous signal values (missing ones left out)
    abstain: list[bool | None]
    ood: list[bool | None]
    start: str | None = None
    end: str | None = None
    feedback: list[tuple[str, list[float]]] = field(default_factory=list)  # (true, probs)
    refused: list[str] = field(default_factory=list)  # the reason of each refused request

    @property
    def n(self) -> int:
        """Answered predictions."""
        return len(self.labels)

    @property
    def requests(self) -> int:
        """Answered and refused requests."""
        return len(self.labels) + len(self.refused)


def compare(
    profile: Mapping[str, Any],
    window: Window,
    thresholds: Thresholds,
    classes: Sequence[str],
    card_metrics: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Compare a window with the reference: per signal PSI and a two-sample test, the class
    mix, abstain and OOD rates, and live performance on the labelled requests.

    `rule_text(thresholds)` states the rule. Nothing is judged below `min_requests` requests
    (answered and refused): the verdict is then "insufficient" and nothing is listed as drifted.
    Signals, the class mix and the abstain and ood rates are judged on the answered
    predictions once there are `min_requests` of them; the refusal rate on all requests.
    """
    ref_signals = profile["signals"]
    out_signals: dict[str, Any] = {}
    for sig in SIGNALS:
        ref = ref_signals.get(sig.name)
        values = np.asarray(window.signals.get(sig.name, []), np.float64)
        values = values[np.isfinite(values)]
        if ref is None or len(values) == 0:
            out_signals[sig.name] = {
                "kind": "continuous",
                "judged": False,
                "why": "not in the reference" if ref is None else "not measured in the window",
            }
            continue
        counts = bin_counts(sig.edges, values)
        value = psi(ref["fractions"], counts)
        stat, p = ks_test(ref["values"], values)
        out_signals[sig.name] = {
            "kind": "continuous",
            "judged": True,
            "help": sig.help,
            "test": "ks",
            "psi": round(value, 4),
            "statistic": round(stat, 4),
            "p_value": p,
            "n": len(values),
            "reference_mean": ref.get("mean"),
            "window_mean": round(float(values.mean()), 6),
            "edges": list(sig.edges),
            "reference_fractions": ref["fractions"],
            "window_fractions": (counts / counts.sum()).round(6).tolist(),
            "drift": bool(value >= thresholds.psi and p < thresholds.p_value),
        }
    ref_cls = ref_signals[CLASS_SIGNAL]
    categories = list(ref_cls["categories"])
    counts = np.array([window.labels.count(c) for c in categories])
    value = psi(ref_cls["fractions"], counts)
    stat, p = chi_square_test(ref_cls["counts"], counts.tolist())
    out_signals[CLASS_SIGNAL] = {
        "kind": "categorical",
        "judged": True,
        "help": "predicted class mix",
        "test": "chi_square",
        "psi": round(value, 4),
        "statistic": round(stat, 4),
        "p_value": p,
        "n": window.n,
        "categories": categories,
        "reference_fractions": ref_cls["fractions"],
        "window_fractions": (counts / max(counts.sum(), 1)).round(6).tolist(),
        "drift": bool(value >= thresholds.psi and p < thresholds.p_value),
    }
    answered_enough = window.n >= thresholds.min_requests
    if not answered_enough:
        for entry in out_signals.values():
            if entry.get("judged"):
                entry.update(
                    judged=False,
                    drift=False,
                    why=f"only {window.n} answered predictions "
                    f"(monitor.min_requests = {thresholds.min_requests})",
                )
    expected_rates = reference_rates(profile)
    rates: dict[str, Any] = {}
    refused = [True] * len(window.refused) + [False] * window.n
    for flag, flags in (("abstain", window.abstain), ("ood", window.ood), (REFUSED, refused)):
        known = [bool(f) for f in flags if f is not None]
        expected = expected_rates.get(flag)
        if expected is None or not known:
            rates[flag] = {"judged": False, "expected": expected, "n": len(known)}
            continue
        hits = sum(known)
        observed = hits / len(known)
        p = rate_test(hits, len(known), float(expected))
        rates[flag] = {
            "judged": True,
            "expected": expected,
            "observed": round(observed, 6),
            "count": hits,
            "n": len(known),
            "p_value": p,
            "drift": bool(observed > expected + thresholds.rate_margin and p < thresholds.p_value),
        }
        if len(known) < thresholds.min_requests:
            rates[flag].update(judged=False, drift=False)
    reasons: dict[str, int] = {}
    for reason in window.refused:
        reasons[reason] = reasons.get(reason, 0) + 1
    rates[REFUSED]["reasons"] = dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])))
    performance = live_performance(window.feedback, classes, card_metrics or {}, thresholds)
    enough = window.requests >= thresholds.min_requests
    drifted = [name for name, s in out_signals.items() if s.get("drift")]
    drifted += [f"{flag}_rate" for flag, r in rates.items() if r.get("drift")]
    if performance.get("degraded"):
        drifted.append("performance")
    if not enough:
        verdict = "insufficient"
    elif drifted:
        verdict = "drift"
    else:
        verdict = "no drift"
    # Measured now but absent from the reference: a reference fitted before the signal existed,
    # judged on what it has (a model without an OOD head measures no ood_ratio: not listed).
    missing = [
        n
        for n, s in out_signals.items()
        if s.get("why") == "not in the reference" and len(window.signals.get(n, []))
    ]
    return {
        "verdict": verdict,
        "drifted": drifted if enough else [],
        "not_in_reference": missing,
        "window": {
            "n": window.n,
            "requests": window.requests,
            "refused": len(window.refused),
            "start": window.start,
            "end": window.end,
        },
        "reference": {"n": profile.get("n"), "source": profile.get("source")},
        "thresholds": asdict(thresholds),
        "rule": rule_text(thresholds),
        "signals": out_signals,
        "rates": rates,
        "performance": performance,
    }


def rule_text(thresholds: Thresholds) -> str:
    """The drift rule in words, as the monitor applies it (for the terminal and the report)."""
    t = thresholds
    return (
        f"A signal or the class mix drifts when its PSI is at least {t.psi:g} AND its "
        f"two-sample test (Kolmogorov-Smirnov; chi-square for the class mix) gives p < "
        f"{t.p_value:g}: a large PSI on too few requests to be significant is not drift. The "
        f"abstain and ood rates (of answered predictions) and the refused rate (of all "
        f"requests) drift when they exceed the reference's rate by more than "
        f"{t.rate_margin:g} with a one-sided binomial p < {t.p_value:g}. Live macro-F1 on "
        f"labelled predictions (at least {t.min_labelled}) degrades when it falls more than "
        f"{t.performance_drop:g} below the card's test figure. Below {t.min_requests} requests "
        f"nothing is judged (INSUFFICIENT); signals need {t.min_requests} answered predictions."
    )


def live_performance(
    feedback: Sequence[tuple[str, Sequence[float]]],
    classes: Sequence[str],
    card_metrics: Mapping[str, Any],
    thresholds: Thresholds,
) -> dict[str, Any]:
    """Accuracy, balanced accuracy and macro-F1 of the labelled predictions, against the
    card's test figures (chestct.evaluation.metrics.classification_metrics: the same formulas)."""
    from chestct.evaluation.metrics import classification_metrics

    usable = [(t, p) for t, p in feedback if t in classes]
    result: dict[str, Any] = {"labelled": len(usable)}
    test = {k: card_metrics.get(k) for k in ("accuracy", "balanced_accuracy", "macro_f1")}
    result["test"] = test
    if not usable:
        result["judged"] = False
        return result
    y_true = np.array([list(classes).index(t) for t, _ in usable])
    proba = np.array([p for _, p in usable], dtype=np.float64)
    scored = classification_metrics(y_true, proba)
    live = {k: round(float(scored[k]), 6) for k in ("accuracy", "balanced_accuracy", "macro_f1")}
    result["live"] = live
    result["judged"] = len(usable) >= thresholds.min_labelled and test["macro_f1"] is not None
    if result["judged"]:
        drop = float(test["macro_f1"]) - live["macro_f1"]
        result["macro_f1_drop"] = round(drop, 6)
        result["degraded"] = bool(drop > thresholds.performance_drop)
    return result
