"""Drift: a window of served requests judged against the reference profile.

`compare` gives per signal the population stability index and a two-sample test
(Kolmogorov-Smirnov; chi-square for the predicted-class mix), the abstain, OOD and refusal rates
against the reference's (one-sided binomial), and live performance on labelled requests against
the card's test figures; `rule_text` states the rule in words. The two-sample tests import SciPy
when they run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from chestct.monitoring.signals import (
    CLASS_SIGNAL,
    REFUSED,
    SIGNALS,
    Signal,
    bin_counts,
    psi,
    reference_rates,
)
from chestct.settings import MonitorConfig


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
    """When a difference counts as drift: config/config.yaml `monitor:` holds the values
    (`from_config`), so there is no second default here."""

    psi: float
    p_value: float
    rate_margin: float
    min_requests: int
    min_labelled: int
    performance_drop: float

    @classmethod
    def from_config(cls, monitor: MonitorConfig) -> Thresholds:
        return cls(
            psi=monitor.psi_threshold,
            p_value=monitor.p_value,
            rate_margin=monitor.rate_margin,
            min_requests=monitor.min_requests,
            min_labelled=monitor.min_labelled,
            performance_drop=monitor.performance_drop,
        )


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
    out_signals: dict[str, Any] = {
        sig.name: _continuous(sig, ref_signals.get(sig.name), window, thresholds)
        for sig in SIGNALS
    }
    out_signals[CLASS_SIGNAL] = _class_mix(ref_signals[CLASS_SIGNAL], window, thresholds)
    if window.n < thresholds.min_requests:
        for entry in out_signals.values():
            if entry.get("judged"):
                entry.update(
                    judged=False,
                    drift=False,
                    why=f"only {window.n} answered predictions "
                    f"(monitor.min_requests = {thresholds.min_requests})",
                )
    rates = _rates(profile, window, thresholds)
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


def _continuous(
    sig: Signal, ref: Mapping[str, Any] | None, window: Window, thresholds: Thresholds
) -> dict[str, Any]:
    """One continuous signal of the window against its reference: PSI and KS test."""
    values = np.asarray(window.signals.get(sig.name, []), np.float64)
    values = values[np.isfinite(values)]
    if ref is None or len(values) == 0:
        return {
            "kind": "continuous",
            "judged": False,
            "why": "not in the reference" if ref is None else "not measured in the window",
        }
    counts = bin_counts(sig.edges, values)
    value = psi(ref["fractions"], counts)
    stat, p = ks_test(ref["values"], values)
    return {
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


def _class_mix(
    ref_cls: Mapping[str, Any], window: Window, thresholds: Thresholds
) -> dict[str, Any]:
    """The predicted-class mix of the window against the reference: PSI and chi-square."""
    categories = list(ref_cls["categories"])
    counts = np.array([window.labels.count(c) for c in categories])
    value = psi(ref_cls["fractions"], counts)
    stat, p = chi_square_test(ref_cls["counts"], counts.tolist())
    return {
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


def _rates(profile: Mapping[str, Any], window: Window, thresholds: Thresholds) -> dict[str, Any]:
    """The abstain and ood rates (of answered predictions) and the refused rate (of all
    requests) against the reference's, with the refusals' reasons."""
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
    return rates


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
