"""evaluate: score the trained model on the test split, clean and under the shift stress
(chestct.imaging.perturb.SHIFTS applied to the ingested originals), calibrate it on the valid
split,
score the external test set when params name one, and draw the pictures. The only stage that
writes metrics (reports/evaluate/, git-tracked; the rest in artifacts/evaluate/).

Outputs in reports/evaluate/ (`cache: false` in dvc.yaml, so DVC compares them across commits):
metrics.json (dvc metrics: clean metrics, the `shift` block and robust_macro_f1), external.json
(dvc metrics, reported apart; never selected on) and the `dvc plots` tables confusion.csv,
reliability.csv, shift.csv. In artifacts/evaluate/: roc.csv, predictions.csv (one row per test
image), calibration.json (temperature, abstention and OOD thresholds for promote's model card),
ood.npz (mean and precision of GAP features on the train split), reference.json (the monitoring
profile of the valid and test splits, chestct.monitoring.signals) and the pictures confusion.png,
roc.png, reliability.png, shift.png, misclassified.png, gradcam.png.

Both metrics files also carry (chestct.evaluation.novelty) the nearest-neighbour memorizer
(`baseline.nearest_neighbour.*`, `baseline.model_above.*`), the model on the near-copy and the
novel part apart (`near_copy.*`, `novel.*`, `near_copy_share`) and bootstrap intervals that
resample groups (`ci.<metric>.low/high`, chestct.evaluation.uncertainty); metrics.json also the
share of
the attention map inside the lung field (`attention.*`, chestct.evaluation.attention)."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from chestct.assessment import AssessmentError, evaluate_candidate
from chestct.data.manifest import DATASET_COLUMNS, read_manifest
from chestct.evaluation.outputs import PLOTS, Evaluation, write_files
from chestct.evaluation.scoring import ScoringError, resize_preprocessing
from chestct.fsutil import atomic_write_json
from chestct.monitoring.signals import REFERENCE_FILE
from chestct.pointers import PointerError, lineage_tags, read_pointer
from chestct.runner import run_main, stage_session, stops_stage
from chestct.settings import STAGES, EvaluateParams
from chestct.tracking import flatten

log = logging.getLogger(__name__)

# The library's errors stop the stage with their message.
run_evaluate = stops_stage(AssessmentError, ScoringError)(evaluate_candidate)


def write_outputs(
    ev: Evaluation, out: Path, params: EvaluateParams, reports: Path | None = None
) -> dict[str, Path]:
    """Write OOD statistics, predictions, the monitoring reference and pictures into `out`,
    metrics and plot tables into `reports` (default `out`; the stage passes reports/evaluate/,
    which git tracks); returns the files by name (chestct.evaluation.outputs.write_files)."""
    files = write_files(ev, out, params, reports)
    files["reference"] = out / REFERENCE_FILE
    atomic_write_json(files["reference"], ev.reference)
    return files


def memorizer_tags(metrics: dict[str, Any], threshold: float) -> dict[str, str]:
    """MLflow tags saying how the memorizer was built and how far the model is above it."""
    above = metrics["baseline"]["model_above"]
    return {
        "chestct.baseline": "nearest_neighbour: label of the most correlated training slice "
        "(body-cropped 32x32 thumbnails of the ingested originals, Pearson)",
        "chestct.near_copy_similarity": f"{threshold:g}",
        "chestct.above_memorizer": ", ".join(f"{k} {v:+.4f}" for k, v in above.items()),
    }


def upstream_params(paths: Any, upto: str, own: Sequence[str]) -> dict[str, str]:
    """The params every upstream stage ran with, flattened as MLflow params ("train.epochs").

    Logged on the evaluate run so that `mlflow ui` shows, side by side, the settings that
    produced each set of test metrics. Groups in `own` are left out: the run logs them already.
    """
    groups: dict[str, Any] = {}
    for stage in STAGES[: STAGES.index(upto)]:
        try:
            params = read_pointer(paths, stage, verify=False).params
        except PointerError:
            continue
        groups.update({g: v for g, v in params.items() if g not in own})
    return {
        k: json.dumps(v) if isinstance(v, list | dict) else str(v)
        for k, v in flatten(groups).items()
    }


def ingested_class_map(paths: Any) -> dict[str, str]:
    """params `ingest.class_map` as ingest ran, for the external set's folder names."""
    try:
        return dict(read_pointer(paths, "ingest", verify=False).params["ingest"]["class_map"])
    except (PointerError, KeyError, TypeError):
        return {}


def main() -> None:
    with stage_session("evaluate") as session:
        s = session.settings
        root = s.paths.root
        validate = read_pointer(s.paths, "validate")
        train = read_pointer(s.paths, "train")
        splits = {
            name: read_manifest(validate.output_path(name, root), DATASET_COLUMNS)
            for name in ("train", "valid", "test")
        }
        session.log_manifest(
            "test split", validate.output_path("test", root), splits["test"], "testing"
        )
        ev = run_evaluate(
            train.output_path("model", root),
            splits,
            s.params.evaluate,
            root,
            resize_preprocessing(s.paths, s.params.base.image_size),
            ingested_class_map(s.paths),
            s.params.base.near_copy_similarity,
            s.params.base.seed,
        )
        out = session.out_dir
        files = write_outputs(ev, out, s.params.evaluate, s.paths.report_dir("evaluate"))

        import mlflow

        mlflow.set_tags(lineage_tags(s.paths, "evaluate"))
        mlflow.set_tags(memorizer_tags(ev.metrics, s.params.base.near_copy_similarity))
        mlflow.log_params(upstream_params(s.paths, "evaluate", list(session.params)))
        for name in PLOTS:
            session.log_artifact(out / name, "plots")
        for name in ("predictions", "calibration", "roc", "reliability", "shift", "external"):
            session.log_artifact(files[name])
        if ev.external_predictions is not None:
            session.log_artifact(files["external_predictions"])
            # Reported apart: prefixed, and never in metrics.json, which promote selects on.
            session.log_metrics({"external": ev.external})
        shift = ev.metrics["shift"]
        log.info(
            "test: macro-F1 %.4f, balanced accuracy %.4f, ECE %.4f -> %.4f (T=%.3f); shift "
            "stress: worst macro-F1 %.4f (%s), mean %.4f, ECE worst %.4f mean %.4f; "
            "robust macro-F1 %.4f",
            ev.metrics["macro_f1"],
            ev.metrics["balanced_accuracy"],
            ev.metrics["ece"],
            ev.metrics["ece_calibrated"],
            ev.metrics["temperature"],
            shift["worst_macro_f1"],
            shift["worst_shift"],
            shift["mean_macro_f1"],
            shift["worst_ece"],
            shift["mean_ece"],
            ev.metrics["robust_macro_f1"],
        )
        session.finish(
            inputs=["validate", "train"],
            outputs={
                k: files[k]
                for k in ("metrics", "predictions", "calibration", "ood", "external", "reference")
            },
            metrics=ev.metrics,
            details={"calibration": ev.calibration},
        )


if __name__ == "__main__":
    run_main("evaluate", main)
