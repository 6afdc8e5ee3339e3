"""promote: put the candidate in model/ only if it is better than the champion (the rules and
the folder: chestct.promotion; this stage wires them to the pointers and MLflow).

The champion (model/, described by model/model.json) is re-scored on the current test split
when the test data or the shift-stress set changed since it was promoted (the card records the
stress set's identity, `stress_set`), so both are judged on the same images and conditions.
A candidate that wins is exported to the light LiteRT artifact, checked for parity against
Keras on the test split, written with its card, OOD statistics and CAM head to a new folder
and swapped in for model/ atomically, after its MLflow calls (registry, tags, card artifact)
succeeded; if recording it fails after the swap, the previous model/ is put back. The card
carries a sha256 of every file it names, which serving checks at each load. It is registered in
the MLflow registry with the alias `champion`. A candidate that loses (or fails parity) gets the
alias `challenger` and leaves model/ untouched; a tie leaves model/ and the registry untouched.
A candidate below the nearest-neighbour memorizer on the test split is refused, and a win over
the champion must survive the paired bootstrap of the metric difference on the same test items
(`promote.paired`), so that a difference that is noise is not a promotion.
The reason, naming the rule that decided, is in the pointer, decision.json and the MLflow run.

model.json holds only what the candidate's inputs determine, so that DVC sees the same model/
for the same inputs on any machine. The registry version, MLflow run ids, git SHA and time of
the promotion go to model/promotion.json, which .dvcignore keeps out of DVC's hash; serving
reads both.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd

from chestct.data.manifest import DATASET_COLUMNS, read_manifest
from chestct.evaluation.scoring import (
    ScoringError,
    resize_preprocessing,
    stress_set,
)
from chestct.evaluation.selection import (
    RULE_TIE,
    Decision,
    SelectionError,
)
from chestct.fsutil import atomic_write_json
from chestct.imaging.preparation import Preprocessing
from chestct.model.registry import register_model, version_facts
from chestct.modelcard import CARD_NAME, PROMOTION_NAME
from chestct.pointers import (
    PointerError,
    lineage_tags,
    read_pointer,
    run_id_of,
)
from chestct.promotion import (
    Candidate,
    PromoteResult,
    PromotionError,
    promote_candidate,
)
from chestct.runner import StageFailed, run_main, stage_session, stops_stage

# The library's errors stop the stage with their message.
run_promote = stops_stage(PromotionError, SelectionError)(promote_candidate)


def _decision_tag(decision: Decision) -> str:
    if decision.promote:
        return "promoted"
    return "tie" if decision.rule == RULE_TIE else "rejected"


def stage_inputs(settings: Any) -> tuple[Candidate, pd.DataFrame, Preprocessing]:
    """The candidate as evaluate handed it on, the current test split and the preprocessing
    the resize stage ran with."""
    root, paths = settings.paths.root, settings.paths
    evaluate = read_pointer(paths, "evaluate")
    validate = read_pointer(paths, "validate")
    try:
        calibration = json.loads(
            evaluate.output_path("calibration", root).read_text(encoding="utf-8")
        )
        ood_path = evaluate.output_path("ood", root)
    except (PointerError, OSError, json.JSONDecodeError) as exc:
        raise StageFailed(
            f"evaluate's outputs lack the calibration ({exc}); rerun `dvc repro evaluate`"
        ) from exc
    test = read_manifest(validate.output_path("test", root), DATASET_COLUMNS)
    try:
        prep = resize_preprocessing(paths, settings.params.base.image_size)
    except ScoringError as exc:
        raise StageFailed(str(exc)) from None
    candidate = Candidate(
        model_path=read_pointer(paths, "train").output_path("model", root),
        metrics=evaluate.metrics,
        calibration=calibration,
        ood_path=ood_path,
        data_digest=validate.outputs["test"].digest,
        stress_set=stress_set(test),
        reference_path=evaluate.output_path("reference", root),
        predictions_path=evaluate.output_path("predictions", root),
    )
    return candidate, test, prep


def _record(session: Any, release: Path, result: PromoteResult, card_file: Path | None) -> None:
    """MLflow calls that may fail, made before model/ changes."""
    import mlflow

    decision = result.decision
    mlflow.set_tags(
        {
            "chestct.decision": _decision_tag(decision),
            "chestct.decision_rule": decision.rule,
            "chestct.decision_reason": decision.reason[:5000],
        }
    )
    mlflow.log_dict(result.registered, "registered.json")
    if card_file is not None and result.card is not None:
        session.log_artifact(card_file, "model_card")
        mlflow.log_dict(result.promotion, f"model_card/{PROMOTION_NAME}")
        served = release / result.card["inference"]["file"]
        if served.is_file():  # the texture family serves train's own file
            session.log_artifact(served, "model_card")


def _finish(session: Any, result: PromoteResult) -> None:
    """The pointer (and its MLflow logging), once model/ holds the outcome; a failure here
    puts the previous model/ back."""
    decision = result.decision
    outputs: dict[str, Path] = {}
    if result.card is not None:
        outputs["card"] = session.settings.paths.model / CARD_NAME
    decision_path = session.out_dir / "decision.json"
    # The registry version is store state, not a function of the inputs: it goes to the MLflow
    # run and model/promotion.json, not to this DVC output.
    atomic_write_json(decision_path, asdict(decision))
    outputs["decision"] = decision_path
    metrics: dict[str, Any] = {"promoted": int(decision.promote), "candidate": decision.candidate}
    if decision.champion is not None:
        metrics["champion"] = decision.champion
    if decision.paired:
        metrics["paired_difference"] = decision.paired["difference"]
        metrics["paired_p_value"] = decision.paired["p_value"]
    if result.card:
        metrics["parity_max_abs_diff"] = result.card["inference"]["parity_max_abs_diff"]
    session.finish(
        inputs=["validate", "train", "evaluate"],
        outputs=outputs,
        metrics=metrics,
        details={"decision": asdict(decision)},
    )


def main() -> None:
    with stage_session("promote") as session:
        s = session.settings
        params = s.params.promote
        candidate, test, prep = stage_inputs(s)

        import mlflow

        mlflow.set_tags(lineage_tags(s.paths, "promote"))
        release = session.out_dir / "release"
        run_promote(
            candidate,
            test,
            params,
            model_dir=s.paths.model,
            root=s.paths.root,
            batch_size=s.params.evaluate.batch_size,
            preprocessing=prep,
            work_dir=release,
            register=lambda path, alias: register_model(
                path, params.registered_model, alias, *version_facts(s.paths, candidate.metrics)
            ),
            run_ids={
                "train": run_id_of(s.paths, "train"),
                "evaluate": run_id_of(s.paths, "evaluate"),
                "promote": session.run_id,
            },
            before_swap=functools.partial(_record, session, release),
            after_swap=functools.partial(_finish, session),
        )


if __name__ == "__main__":
    run_main("promote", main)
