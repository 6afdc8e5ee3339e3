"""train: fit the base model on the validated train split, checkpointed on the valid split.

The family base-model chose (family.json) decides what is fitted: cnn the network
(chestct.model.training: a phase with the base model's freeze policy, an optional fine-tuning
phase, the best validation weights kept), texture the chestct.model.texture classifier
(chestct.evaluation.tuning), ensemble both, written with an ensemble.json that averages them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import tensorflow as tf

from chestct.data.manifest import DATASET_COLUMNS, read_manifest, write_manifest
from chestct.evaluation.plots import plot_history
from chestct.evaluation.tuning import cnn_temperature, fit_texture_on, texture_spec
from chestct.labels import CLASSES
from chestct.model.distributed import WorkerRole, worker_role
from chestct.model.families import ENSEMBLE_FILE, TEXTURE_FILE, write_ensemble
from chestct.model.fitting import TrainingError, distribution_strategy
from chestct.model.modeling import save_model
from chestct.model.texture import TextureError, TextureModel
from chestct.model.texture import save as save_texture
from chestct.model.training import TrainResult, train_members
from chestct.pointers import Pointer, read_pointer
from chestct.runner import StageFailed, StageSession, run_main, stage_session, stops_stage
from chestct.settings import Paths, load_settings

log = logging.getLogger(__name__)


# The stage's work: chestct.model.training.train_members (the model with the best validation
# weights, its history and details); a setting training cannot honour stops the stage.
run_train = stops_stage(TrainingError)(train_members)


def _inputs(paths: Paths) -> tuple[Pointer, Pointer, pd.DataFrame, pd.DataFrame]:
    """validate's and base-model's pointers, and the train and valid splits validate wrote."""
    validate = read_pointer(paths, "validate")
    base = read_pointer(paths, "base-model")
    train = read_manifest(validate.output_path("train", paths.root), DATASET_COLUMNS)
    valid = read_manifest(validate.output_path("valid", paths.root), DATASET_COLUMNS)
    return validate, base, train, valid


def run_worker(role: WorkerRole, strategy: tf.distribute.Strategy) -> TrainResult:
    """A non-chief worker of a multi-worker run: train in step with the chief, write nothing.

    It reads the same inputs as the chief (through the pointers, which must match their
    digests: the machines share them through a DVC remote) and takes part in every gradient
    step; the chief alone writes artifacts/train/, the pointer and the MLflow run.
    """
    settings = load_settings()
    paths, params = settings.paths, settings.params
    _, base, train, valid = _inputs(paths)
    log.info(
        "worker %s:%d of %d workers: training on %d images; the chief writes the outputs",
        role.task_type,
        role.index,
        role.workers,
        len(train),
    )
    model = base.output_path("model", paths.root)
    result = run_train(
        model, train, valid, params.train, params.base.seed, paths.root, strategy=strategy
    )
    log.info(
        "worker %s:%d done: %d epochs, best epoch %d; nothing written",
        role.task_type,
        role.index,
        len(result.history),
        result.best_epoch,
    )
    return result


def main() -> None:
    settings = load_settings()
    role = worker_role(settings.params.train.strategy)
    # Before anything else touches TensorFlow: multi-worker collectives start with the program.
    strategy = distribution_strategy(settings.params.train.strategy)
    if not role.chief:
        logging.basicConfig(
            level=logging.INFO,
            stream=sys.stderr,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        run_worker(role, strategy)
        return
    with stage_session("train") as session:
        s = session.settings
        root = s.paths.root
        validate, base, train, valid = _inputs(s.paths)
        for split, frame, use in (("train", train, "training"), ("valid", valid, "validation")):
            session.log_manifest(f"{split} split", validate.output_path(split, root), frame, use)
        log.info(
            "training on %d images, validating on %d; classes %s", len(train), len(valid), CLASSES
        )
        family = read_family(base, root)
        history = s.paths.report_dir("train") / "history.csv"  # a dvc plot, git-tracked
        history.parent.mkdir(parents=True, exist_ok=True)
        texture = None
        if family["family"] in ("texture", "ensemble"):
            texture = _fit_texture(session, train, valid, family)
        if family["family"] == "texture":
            _finish_texture(session, texture, history)
            return
        result = run_train(
            base.output_path("model", root),
            train,
            valid,
            s.params.train,
            s.params.base.seed,
            root,
            on_epoch=lambda m, e: session.log_metrics(m, step=e),
            strategy=strategy,
        )
        _finish_cnn(session, result, family["family"], texture, valid, history)


@dataclasses.dataclass(frozen=True)
class _Texture:
    """The texture model train fitted, where it saved it, its valid figures and its curve."""

    model: TextureModel
    path: Path
    figures: dict[str, float]
    curve: list[dict[str, float]]


def _fit_texture(
    session: StageSession, train: pd.DataFrame, valid: pd.DataFrame, family: dict[str, Any]
) -> _Texture:
    s = session.settings
    curve: list[dict[str, float]] = []
    spec = texture_spec(family["texture"])
    base = s.params.base
    try:
        similarity = base.near_copy_similarity  # cross-fitting folds keep series whole
        model, figures = fit_texture_on(
            train, valid, spec, base.seed, s.paths.root, base.image_size, similarity, curve
        )
    except TextureError as exc:
        raise StageFailed(str(exc)) from None
    return _Texture(model, save_texture(model, session.out_dir / TEXTURE_FILE), figures, curve)


def _finish_texture(session: StageSession, texture: _Texture, history: Path) -> None:
    # One row per boosting iteration: the texture family's training curve.
    write_manifest(history, pd.DataFrame(texture.curve).assign(member=0, phase="boosting"))
    session.log_artifact(history)
    iterations = int(texture.figures["iterations"])
    outputs = {"model": texture.path, "history": history}
    details = {"family": "texture", "texture": texture.model.details}
    _finish(session, outputs, (iterations, iterations, 1), texture.figures, details)


def _finish(
    session: StageSession,
    outputs: dict[str, Path],
    epochs: tuple[int, int, int],
    best: Mapping[str, float],
    details: dict[str, Any],
) -> None:
    """The pointer and the run: `epochs` is (epochs run, best epoch, ensemble members), `best`
    the validation figures at the best epoch."""
    session.finish(
        inputs=["validate", "base-model"],
        outputs=outputs,
        metrics={
            "epochs_run": epochs[0],
            "best_epoch": epochs[1],
            "ensemble": epochs[2],
            "best_val_loss": float(best["val_loss"]),
            "best_val_accuracy": float(best["val_accuracy"]),
            "best_val_macro_f1": float(best["val_macro_f1"]),
        },
        details=details,
    )


def _finish_cnn(
    session: StageSession,
    result: TrainResult,
    family: str,
    texture: _Texture | None,
    valid: pd.DataFrame,
    history: Path,
) -> None:
    s, out = session.settings, session.out_dir
    model_path = save_model(result.model, out / "model.keras")
    outputs = {"model": model_path}
    details = dict(result.details, family=family)
    if family == "ensemble":
        assert texture is not None  # fitted first for an ensemble
        temperature = cnn_temperature(result.model, valid, s.paths.root)
        outputs = {
            "model": write_ensemble(out / ENSEMBLE_FILE, model_path, texture.path, temperature),
            "cnn": model_path,
            "texture": texture.path,
        }
        details.update({"cnn_temperature": temperature, "texture": texture.model.details})
    write_manifest(history, result.history)
    plot_history(result.history, out / "curves.png")
    session.log_artifact(out / "curves.png")
    session.log_artifact(history)
    epochs = (len(result.history), result.best_epoch, s.params.train.ensemble)
    _finish(session, {**outputs, "history": history}, epochs, result.at_best_epochs(), details)


def read_family(base: Pointer, root: Path) -> dict[str, Any]:
    """base-model's family.json ({"family", "texture"}); a base-model run from before the
    families existed made a CNN."""
    if "family" not in base.outputs:
        return {"family": "cnn", "texture": {}}
    path = base.output_path("family", root)
    try:
        family = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise StageFailed(f"{path}: unreadable ({exc}); rerun `dvc repro base-model`") from None
    return family


if __name__ == "__main__":
    run_main("train", main)
