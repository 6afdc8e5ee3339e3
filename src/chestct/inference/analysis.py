"""From a model's raw outputs to an answer: calibrated probabilities, entropy, abstain, OOD,
MC-dropout; the one formula evaluate and /predict share (`served_logits`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from chestct.inference.loaded import Loaded, Outputs
from chestct.model.calibration import abstains, out_of_distribution, softmax
from chestct.model.calibration import normalised_entropy as entropy
from chestct.model.gradcam import CamHead

log = logging.getLogger(__name__)


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
        # np.mean and np.std's own steps (sum, divide; squared deviations, sum, divide, root),
        # the mean taken once: the same bits for a third of the NumPy calls.
        mc_mean = sampled.sum(axis=0) / mc_samples
        deviation = sampled - mc_mean
        mc_std = np.sqrt((deviation * deviation).sum(axis=0) / mc_samples)
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
