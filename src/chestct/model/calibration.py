"""From a model's logits to probabilities it can stand behind, and to when it should refuse.

Temperature scaling (`fit_temperature`, fitted on valid by evaluate), entropy-based abstention
and the Mahalanobis out-of-distribution score: the numbers every family's serving path applies
to its raw outputs. SciPy is imported inside the functions (it takes seconds to import).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# The search range of the temperature; a fit at either end means the logits are degenerate.
TEMPERATURE_BOUNDS = (0.05, 20.0)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Softmax of logits / temperature over the last axis, computed stably in float64.

    The one calibration formula: evaluate fits the temperature with it and the predictor
    applies the card's temperature with it.
    """
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def nll(y_true: np.ndarray, proba: np.ndarray) -> float:
    """Mean negative log-likelihood of the true classes."""
    picked = np.asarray(proba, dtype=np.float64)[np.arange(len(y_true)), np.asarray(y_true)]
    return float(-np.mean(np.log(np.clip(picked, 1e-12, 1.0))))


@dataclass(frozen=True)
class TemperatureFit:
    temperature: float
    fitted: bool
    reason: str
    nll_before: float | None
    nll_after: float | None


def fit_temperature(y_true: np.ndarray, logits: np.ndarray) -> TemperatureFit:
    """The temperature T minimising the NLL of softmax(logits / T) on held-out data.

    Falls back to T = 1.0 (no scaling) and says why when the data cannot support a fit: too
    few images, a single class, non-finite logits, an optimum at the edge of the search range,
    or no improvement in NLL.
    """
    from scipy.optimize import minimize_scalar

    y_true = np.asarray(y_true)
    logits = np.asarray(logits, dtype=np.float64)
    if len(y_true) < 2 or len(np.unique(y_true)) < 2:
        return TemperatureFit(1.0, False, "fewer than two images or classes to fit on", None, None)
    if not np.isfinite(logits).all():
        return TemperatureFit(1.0, False, "the logits are not all finite", None, None)
    before = nll(y_true, softmax(logits))
    lo, hi = np.log(TEMPERATURE_BOUNDS[0]), np.log(TEMPERATURE_BOUNDS[1])
    result = minimize_scalar(
        lambda log_t: nll(y_true, softmax(logits, float(np.exp(log_t)))),
        bounds=(lo, hi),
        method="bounded",
        options={"xatol": 1e-4},
    )
    t = float(np.exp(result.x))
    after = float(result.fun)
    if not result.success or not np.isfinite(after):
        return TemperatureFit(1.0, False, f"optimiser failed: {result.message}", before, None)
    at_edge = min(abs(result.x - lo), abs(result.x - hi)) < 1e-3
    if at_edge or after < 1e-6:
        where = f"is at the edge of {TEMPERATURE_BOUNDS}" if at_edge else "drives the NLL to 0"
        return TemperatureFit(
            1.0,
            False,
            f"the optimum T={t:.3g} {where}: the validation split is separable or degenerate, "
            "so no temperature is trustworthy",
            before,
            after,
        )
    if after >= before:
        return TemperatureFit(
            1.0, False, "scaling did not lower the validation NLL", before, before
        )
    return TemperatureFit(t, True, "fitted on the validation split", before, after)


def normalised_entropy(proba: np.ndarray) -> np.ndarray:
    """Predictive entropy (over the last axis) divided by log(number of classes): 0 certain,
    1 uniform. Evaluate sets the abstain threshold with it; the predictor applies it."""
    p = np.clip(np.asarray(proba, dtype=np.float64), 1e-12, 1.0)
    return -(p * np.log(p)).sum(axis=-1) / np.log(p.shape[-1])


def abstains(entropy: np.ndarray | float, threshold: float) -> np.ndarray:
    """The abstain rule: normalised entropy above the fitted threshold. Evaluate reports the
    abstain rate with it; the predictor flags each answer with it."""
    return np.asarray(entropy) > threshold


def out_of_distribution(distance: np.ndarray | float, threshold: float) -> np.ndarray:
    """The out-of-distribution rule: a Mahalanobis distance above the fitted threshold.
    Evaluate reports the OOD rate with it; the predictor flags each answer with it."""
    return np.asarray(distance) > threshold


def abstain_threshold(y_true: np.ndarray, proba: np.ndarray, quantile: float) -> float:
    """The `quantile` of normalised entropy over the correctly classified images.

    Serving abstains above it, so at most about (1 − quantile) of images like those the model
    gets right are turned away. With no correct prediction, returns 1.0 (never abstain).
    """
    correct = np.asarray(proba).argmax(axis=1) == np.asarray(y_true)
    if not correct.any():
        return 1.0
    return float(np.quantile(normalised_entropy(np.asarray(proba)[correct]), quantile))


@dataclass(frozen=True)
class Mahalanobis:
    """Mean and precision matrix of GAP features; distance() scores how unusual an image is."""

    mean: np.ndarray
    precision: np.ndarray

    @classmethod
    def fit(cls, features: np.ndarray) -> Mahalanobis:
        """Fit on (n, C) pooled features with Ledoit-Wolf shrinkage (n may be below C)."""
        from sklearn.covariance import LedoitWolf

        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or len(features) < 2:
            raise ValueError("need at least two feature vectors to fit the OOD statistics")
        lw = LedoitWolf().fit(features)
        return cls(lw.location_.astype(np.float64), lw.precision_.astype(np.float64))

    def distance(self, features: np.ndarray) -> np.ndarray:
        """Mahalanobis distance of each row of (n, C) features."""
        d = np.asarray(features, dtype=np.float64) - self.mean
        # (d P) . d row by row: one matrix product, not einsum's three-operand loop.
        return np.sqrt(np.maximum(np.einsum("ij,ij->i", d @ self.precision, d), 0.0))
