"""base-model: build the initial model (architecture, weights, freeze policy) and save it.

Every family writes family.json (the family and, for texture and ensemble, the classifier
settings train fits with); cnn and ensemble also write the untrained network model.keras."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chestct.fsutil import atomic_write_json, sha256_file
from chestct.model.modeling import WeightsError, build_model, frozen_backbone, save_model
from chestct.runner import StageFailed, run_main, stage_session
from chestct.settings import BaseModelParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BaseModelSummary:
    path: Path
    parameters: int
    trainable_parameters: int
    details: dict[str, Any]


def run_base_model(
    params: BaseModelParams, image_size: int, seed: int, out_dir: Path, root: Path | None = None
) -> Path:
    """Build the model and save it as out_dir/model.keras; returns the path.

    Raises:
        StageFailed: the initial weights cannot be obtained or do not fit.
    """
    return build_and_save(params, image_size, seed, out_dir, root).path


def build_and_save(
    params: BaseModelParams, image_size: int, seed: int, out_dir: Path, root: Path | None = None
) -> BaseModelSummary:
    """run_base_model() with the facts the pointer records."""
    try:
        model = build_model(params, image_size, seed, root=root)
    except WeightsError as exc:
        raise StageFailed(str(exc)) from None
    target = save_model(model, out_dir / "model.keras")
    trainable = int(sum(int(_size(w)) for w in model.trainable_weights))
    details: dict[str, Any] = {
        "architecture": params.architecture,
        "weights": params.weights,
        "frozen_backbone": params.architecture != "small_cnn" and frozen_backbone(params),
    }
    if params.weights not in ("none", "imagenet"):
        weights = Path(params.weights)
        weights = weights if weights.is_absolute() or root is None else root / weights
        details["weights_sha256"] = sha256_file(weights)
    log.info("built %s: %d parameters, %d trainable", model.name, model.count_params(), trainable)
    return BaseModelSummary(target, model.count_params(), trainable, details)


def _size(weight: Any) -> int:
    count = 1
    for dim in weight.shape:
        count *= int(dim)
    return count


def write_family(params: BaseModelParams, out_dir: Path) -> Path:
    """family.json: which family train fits, and the texture classifier's settings."""
    target = out_dir / "family.json"
    atomic_write_json(
        target, {"family": params.family, "texture": dataclasses.asdict(params.texture)}
    )
    return target


def main() -> None:
    with stage_session("base-model") as session:
        s = session.settings
        params = s.params.base_model
        outputs = {"family": write_family(params, session.out_dir)}
        metrics: dict[str, Any] = {"parameters": 0, "trainable_parameters": 0}
        details: dict[str, Any] = {"family": params.family}
        if params.family in ("cnn", "ensemble"):
            summary = build_and_save(
                params, s.params.base.image_size, s.params.base.seed, session.out_dir, s.paths.root
            )
            outputs["model"] = summary.path
            metrics = {
                "parameters": summary.parameters,
                "trainable_parameters": summary.trainable_parameters,
            }
            details.update(summary.details)
        session.finish(inputs=[], outputs=outputs, metrics=metrics, details=details)


if __name__ == "__main__":
    run_main("base-model", main)
