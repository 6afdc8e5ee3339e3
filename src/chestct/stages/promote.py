"""promote: put the candidate in model/ only if it is at least as good as the champion.

The champion (model/, described by model/model.json) is re-scored on the current test split
when the test data changed since it was promoted, so both are judged on the same images.
A promoted model is written to a new folder and swapped in atomically, registered in the MLflow
registry and given the alias `champion`; a rejected one gets the alias `challenger` and leaves
model/ untouched.
"""

from __future__ import annotations

import json
import logging
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from chestct.fsutil import atomic_write_json, replace_dir, sha256_file
from chestct.labels import CLASSES, DISPLAY_NAMES
from chestct.manifest import DATASET_COLUMNS, read_manifest
from chestct.pointers import now_utc, read_pointer
from chestct.runner import StageFailed, run_main, stage_session
from chestct.settings import PromoteParams, Settings

log = logging.getLogger(__name__)

CARD_NAME = "model.json"
MODEL_FILE = "model.keras"


@dataclass(frozen=True)
class Decision:
    promote: bool
    metric: str
    candidate: float
    champion: float | None
    champion_rescored: bool
    reason: str


def read_card(model_dir: Path) -> dict[str, Any] | None:
    """The champion's card, or None when there is no (readable) champion."""
    card = model_dir / CARD_NAME
    if not card.is_file():
        return None
    try:
        data = json.loads(card.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        log.warning("%s is not valid JSON; treating the champion as absent", card)
        return None
    if not isinstance(data, dict):
        log.warning("%s is not a JSON object; treating the champion as absent", card)
        return None
    if not (model_dir / data.get("model_file", MODEL_FILE)).is_file():
        log.warning("%s names a model file that is missing; champion absent", card)
        return None
    return data


def decide(
    params: PromoteParams,
    candidate: dict[str, Any],
    champion: dict[str, Any] | None,
    champion_rescored: bool = False,
) -> Decision:
    """Compare on params.metric: first model needs `minimum`; later ones champion + margin."""
    metric = params.metric
    score = float(candidate[metric])
    if champion is None:
        ok = score >= params.minimum
        reason = (
            f"no champion; {metric} {score:.4f} "
            f"{'meets' if ok else 'is below'} the minimum {params.minimum}"
        )
        return Decision(ok, metric, score, None, False, reason)
    best = float(champion[metric])
    needed = best + params.margin
    ok = score >= needed and score >= params.minimum
    reason = (
        f"candidate {metric} {score:.4f} vs champion {best:.4f} "
        f"(+ margin {params.margin}): {'promoted' if ok else 'rejected'}"
    )
    return Decision(ok, metric, score, best, champion_rescored, reason)


def rescore_champion(
    model_dir: Path, card: dict[str, Any], test: pd.DataFrame, root: Path, batch_size: int
) -> dict[str, Any]:
    """The champion's metrics on the current test split, prepared as the champion expects.

    The champion may take another image size or interpolation than the current params, so the
    test images are prepared again from the ingested originals with the card's settings.
    """
    import tempfile

    from chestct.imaging import encode_png, prepare
    from chestct.settings import EvaluateParams
    from chestct.stages.evaluate import run_evaluate

    size = int(card["image_size"])
    interpolation = card.get("preprocessing", {}).get("interpolation", "area")
    sources = test["original"] if "original" in test.columns else test["path"]
    with tempfile.TemporaryDirectory(prefix="chestct-rescore-") as tmp:
        prepared = []
        for i, rel in enumerate(sources):
            target = Path(tmp) / f"{i}.png"
            target.write_bytes(encode_png(prepare((root / rel).read_bytes(), size, interpolation)))
            prepared.append(str(target))
        metrics, _ = run_evaluate(
            model_dir / card.get("model_file", MODEL_FILE),
            test.assign(path=prepared),
            EvaluateParams(batch_size=batch_size),
            root,
        )
    return metrics


def build_card(
    settings: Settings,
    metrics: dict[str, Any],
    data_digest: str,
    model_sha: str,
    git_sha: str | None,
    run_ids: dict[str, str | None],
    registered: dict[str, Any],
) -> dict[str, Any]:
    p = settings.params
    return {
        "name": p.promote.registered_model,
        "version": registered.get("version"),
        "registered_model": p.promote.registered_model,
        "classes": list(CLASSES),
        "display_names": DISPLAY_NAMES,
        "image_size": p.base.image_size,
        "preprocessing": {
            "decode": "by content (PNG, JPEG, BMP, TIFF); any mode to 8-bit grey; "
            "transparent pixels over black",
            "resize": "stretch",
            "interpolation": p.resize.interpolation,
            "input": "float32 in [0, 255], shape (image_size, image_size, 1)",
        },
        "model_file": MODEL_FILE,
        "model_sha256": model_sha,
        "metrics": metrics,
        "selection_metric": p.promote.metric,
        "data_digest": data_digest,
        "git_sha": git_sha,
        "mlflow_run_ids": run_ids,
        "promoted_at": now_utc(),
        "intended_use": "research and education only; not a medical device",
    }


def register(model_path: Path, name: str, alias: str) -> dict[str, Any]:
    """Log the Keras model to the active run, register it, and point `alias` at it."""
    import mlflow
    from mlflow import MlflowClient

    from chestct.modeling import load_model

    info = mlflow.tensorflow.log_model(
        load_model(model_path),
        name="model",
        registered_model_name=name,
        # Inferring requirements runs pip for ~20 s; the pins are known.
        pip_requirements=[
            f"tensorflow-cpu=={_version('tensorflow-cpu')}",
            f"keras=={_version('keras')}",
        ],
    )
    version = str(info.registered_model_version)
    MlflowClient().set_registered_model_alias(name, alias, version)
    return {"name": name, "version": version, "alias": alias, "model_uri": info.model_uri}


def _version(pkg: str) -> str:
    from importlib import metadata

    return metadata.version(pkg)


def install_model(model_path: Path, card: dict[str, Any], model_dir: Path) -> None:
    """Write the new model folder beside model/, then swap it in atomically."""
    staging = model_dir.with_name(f".{model_dir.name}.new-{uuid.uuid4().hex[:8]}")
    staging.mkdir(parents=True)
    try:
        shutil.copy2(model_path, staging / MODEL_FILE)
        atomic_write_json(staging / CARD_NAME, card)
        replace_dir(staging, model_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def main() -> None:
    with stage_session("promote") as session:
        s = session.settings
        root, params = s.paths.root, s.params.promote
        evaluate = read_pointer(s.paths, "evaluate")
        train = read_pointer(s.paths, "train")
        validate = read_pointer(s.paths, "validate")
        data_digest = validate.outputs["test"].digest
        candidate_metrics = evaluate.metrics
        if params.metric not in candidate_metrics:
            raise StageFailed(f"promote.metric {params.metric!r} is not among evaluate's metrics")

        card = read_card(s.paths.model)
        champion_metrics, rescored = None, False
        if card is not None:
            champion_metrics = card.get("metrics", {})
            if card.get("data_digest") != data_digest or params.metric not in champion_metrics:
                test = read_manifest(validate.output_path("test", root), DATASET_COLUMNS)
                champion_metrics = rescore_champion(
                    s.paths.model, card, test, root, s.params.evaluate.batch_size
                )
                rescored = True
        decision = decide(params, candidate_metrics, champion_metrics, rescored)
        log.info("decision: %s", decision.reason)

        import mlflow

        mlflow.set_tags(
            {
                "chestct.decision": "promoted" if decision.promote else "rejected",
                "chestct.decision_reason": decision.reason,
            }
        )
        model_path = train.output_path("model", root)
        registered = register(
            model_path, params.registered_model, "champion" if decision.promote else "challenger"
        )
        outputs: dict[str, Path] = {}
        if decision.promote:
            from chestct.pointers import git_state

            new_card = build_card(
                s,
                candidate_metrics,
                data_digest,
                sha256_file(model_path),
                git_state(root).sha,
                {
                    "train": train.mlflow.run_id,
                    "evaluate": evaluate.mlflow.run_id,
                    "promote": session.run_id,
                },
                registered,
            )
            install_model(model_path, new_card, s.paths.model)
            outputs["card"] = s.paths.model / CARD_NAME
            log.info(
                "promoted %s version %s into %s",
                params.registered_model,
                registered["version"],
                s.paths.model,
            )
        else:
            # DVC expects model/ to exist after the stage; an empty folder means "no champion".
            s.paths.model.mkdir(parents=True, exist_ok=True)
        decision_path = session.out_dir / "decision.json"
        atomic_write_json(decision_path, {**asdict(decision), "registered": registered})
        outputs["decision"] = decision_path
        session.finish(
            inputs=["validate", "train", "evaluate"],
            outputs=outputs,
            metrics={
                "promoted": int(decision.promote),
                "candidate": decision.candidate,
                **({"champion": decision.champion} if decision.champion is not None else {}),
            },
            details={"decision": asdict(decision), "registered": registered},
        )


if __name__ == "__main__":
    run_main("promote", main)
