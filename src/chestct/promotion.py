"""Promotion: whether a candidate replaces the champion in model/, and the folder it becomes.

The champion (model/, described by model/model.json) is re-scored on the current test split
when the test data or the shift-stress set changed since it was promoted (`stale_champion`), so
both are judged on the same images and conditions; a candidate below the memorizer is refused
and a margin win must survive the paired bootstrap (chestct.evaluation.selection). A winner's
served files are exported and checked for parity (chestct.evaluation.release), its card is
built through chestct.modelcard.ModelCard (only what the inputs determine, so DVC sees the same
model/ for the same inputs) and the folder is written by chestct.modelfolder, the one writer.
The promote stage (chestct.stages.promote) wires this to the pointers and MLflow.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd

from chestct.data.manifest import read_manifest
from chestct.evaluation.metrics import lower_is_better
from chestct.evaluation.novelty import card_entry
from chestct.evaluation.release import Release, release_for
from chestct.evaluation.scoring import (
    ScoringError,
    score,
)
from chestct.evaluation.selection import (
    RULE_BETTER,
    RULE_BETTER_LOWER,
    RULE_EXPORT_FAILED,
    RULE_TIE,
    Decision,
    SelectionError,
    apply_paired,
    decide,
    stale_champion,
)
from chestct.evaluation.uncertainty import PairedResult, paired_on_tables
from chestct.fsutil import atomic_write_json, sha256_file
from chestct.imaging.preparation import Preprocessing
from chestct.inference.artefact import Artefact, open_artefact
from chestct.inference.folder import ModelFiles
from chestct.inference.loaded import ModelRefused
from chestct.labels import CLASSES, DISPLAY_NAMES
from chestct.model.export import ExportError
from chestct.model.families import FamilyError
from chestct.model.gradcam import CAM_FILE
from chestct.modelcard import CARD_NAME, ModelCard
from chestct.modelfolder import (
    OOD_FILE,
    ModelFolderError,
    build_promotion,
    pin_digests,
    write_model_folder,
)
from chestct.monitoring.signals import REFERENCE_FILE
from chestct.pointers import (
    git_state,
)
from chestct.settings import PromoteParams

log = logging.getLogger(__name__)

MODEL_FILE = "model.keras"

# register(model_path, alias) -> {"name", "version", "alias", "model_uri"}
Register = Callable[[Path, str], dict[str, Any]]


class PromotionError(RuntimeError):
    """Promotion cannot go on: the message names the problem and the fix."""


@dataclass(frozen=True)
class Candidate:
    """What evaluate handed on about the trained model."""

    model_path: Path
    metrics: dict[str, Any]
    calibration: dict[str, Any]  # evaluate's calibration.json
    ood_path: Path  # evaluate's ood.npz
    data_digest: str  # digest of the test split manifest
    # The shift-stress set its robust score was measured on (scoring.stress_set); None: unknown.
    stress_set: dict[str, Any] | None = None
    reference_path: Path | None = None  # evaluate's monitoring profile (reference.json)
    # evaluate's predictions.csv (per test image: actual, predicted, predicted_<shift>, group):
    # the candidate's side of the paired test; None: the paired test cannot run.
    predictions_path: Path | None = None


@dataclass(frozen=True)
class PromoteResult:
    decision: Decision
    registered: dict[str, Any]
    card: dict[str, Any] | None  # the new champion's card; None when rejected
    promotion: dict[str, Any] | None = None  # its promotion.json; None when rejected


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
    if not (model_dir / str(data.get("model_file", MODEL_FILE))).is_file():
        log.warning("%s names a model file that is missing; champion absent", card)
        return None
    return data


def paired_test(
    params: PromoteParams,
    candidate: Candidate,
    champion_predictions: Callable[[], pd.DataFrame],
    seed: int = 0,
) -> PairedResult | str:
    """The paired bootstrap of candidate - champion on promote.metric over the same test
    items, resampling evaluate's groups; or why it cannot run."""
    if params.paired == "none":
        return "promote.paired is none"
    if candidate.predictions_path is None or not candidate.predictions_path.is_file():
        return "evaluate's per-image predictions are not available"
    return paired_on_tables(
        params.metric,
        read_manifest(candidate.predictions_path),
        champion_predictions,
        higher_is_better=not lower_is_better(params.metric),
        confidence=params.confidence,
        seed=seed,
    )


def rescore_champion(
    model_dir: Path, card: dict[str, Any], test: pd.DataFrame, root: Path, batch_size: int
) -> dict[str, Any]:
    """The champion's metrics on the current test split (the candidate's keys, shift stress
    included), prepared at the champion's own size, preprocessing and temperature."""
    return rescore_champion_full(model_dir, card, test, root, batch_size)[0]


def rescore_champion_full(
    model_dir: Path, card: dict[str, Any], test: pd.DataFrame, root: Path, batch_size: int
) -> tuple[dict[str, Any], pd.DataFrame]:
    """rescore_champion's metrics and the per-image predictions (with `predicted_<shift>`),
    scored through the champion's served artefact as evaluate scores the candidate's (a card
    without an `inference` entry: through its Keras model)."""
    try:
        metrics, table = score(
            model_dir / str(card.get("model_file", MODEL_FILE)),
            test,
            batch_size,
            root,
            Preprocessing.from_card(card),
            temperature=float(card.get("temperature", 1.0)),
            model=served_champion(model_dir, card),
        )
    except (ScoringError, ModelRefused, ValueError) as exc:
        raise PromotionError(f"re-scoring the champion in {model_dir}: {exc}") from None
    return metrics, table


def served_champion(model_dir: Path, card: dict[str, Any]) -> Artefact | None:
    """The champion's served files, each checked against its sha256 in the card, opened as
    evaluate opens the candidate's (chestct.inference.artefact.open_artefact); None for a card
    without
    an `inference` entry."""
    if not isinstance(card.get("inference"), dict):
        return None
    try:
        listed = ModelCard.from_dict(card)
    except ValueError as exc:
        raise ModelRefused(f"the champion's card is not valid: {exc}") from None
    if listed.inference is None:
        return None
    ModelFiles(model_dir, listed).check(optional=(listed.model_file,))
    files = {name: model_dir / name for name in listed.files}
    return open_artefact(card["inference"], files, card, listed.image_size)


def build_card(
    *,
    params: PromoteParams,
    preprocessing: Preprocessing,
    candidate: Candidate,
    inference: dict[str, Any],
    model_sha: str,
    release: Release | None = None,
    model_file: str = MODEL_FILE,
) -> dict[str, Any]:
    """The model card: what serving needs to reproduce, calibrate and explain predictions.

    Only what the candidate and params determine: no registry version, run id or time (those
    are in chestct.modelfolder.build_promotion()), so that the same inputs give the same card. It
    goes through
    chestct.modelcard.ModelCard, the type the inference core reads it as, so that a card the
    service would refuse is never written.
    """
    cal = candidate.calibration
    card = {
        "name": params.registered_model,
        "registered_model": params.registered_model,
        "classes": list(CLASSES),
        "display_names": DISPLAY_NAMES,
        **preprocessing.to_card(),  # image_size and preprocessing
        "model_file": model_file,
        "model_sha256": model_sha,
        "temperature": float(cal["temperature"]),
        "temperature_note": cal.get("temperature_reason", ""),
        "thresholds": {
            "abstain_entropy": float(cal["abstain_entropy"]),
            "abstain_rule": cal.get("abstain_rule", ""),
        },
        "inference": inference,
        **(
            release.card
            if release is not None
            else {
                "cam": {
                    "file": CAM_FILE,
                    "method": "CAM from the dense head: relu(features @ kernel[:, class]); "
                    "equals Grad-CAM for the GAP -> dropout -> dense head",
                }
            }
        ),
        "ood": {
            "method": "mahalanobis_gap",
            "file": OOD_FILE,
            "threshold": float(cal["ood_threshold"]),
            "rule": cal.get("ood_rule", ""),
        },
        **(
            {
                "monitoring": {
                    "file": REFERENCE_FILE,
                    "method": "signals of the valid and test splits (chestct.monitoring.signals); "
                    "python -m chestct.monitoring.monitor compares served requests with it",
                }
            }
            if candidate.reference_path is not None
            else {}
        ),
        "metrics": candidate.metrics,
        **({"baseline": entry} if (entry := card_entry(candidate.metrics)) else {}),
        "selection_metric": params.metric,
        "data_digest": candidate.data_digest,
        **({"stress_set": candidate.stress_set} if candidate.stress_set else {}),
        "intended_use": "research and education only; not a medical device",
    }
    try:
        return ModelCard.from_dict(card).to_dict()
    except ValueError as exc:
        raise PromotionError(f"the model card promote built is not valid: {exc}") from None


@dataclass(frozen=True)
class TestSplit:
    """The current test split and how its images are read: what candidate and champion are
    judged on, and a winner's export is checked on."""

    frame: pd.DataFrame
    root: Path  # the folder the manifest's paths are relative to
    batch_size: int


def judge(
    candidate: Candidate, split: TestSplit, params: PromoteParams, model_dir: Path
) -> Decision:
    """The decision against the champion in `model_dir` (chestct.evaluation.selection), the
    champion re-scored first when its card's figures cannot be compared (`stale_champion`)
    and a margin win put to the paired test."""
    card = read_card(model_dir)
    champion_metrics, rescored = None, False
    champion_table: list[pd.DataFrame] = []  # the champion's predictions, once scored
    if card is not None:
        champion_metrics = card.get("metrics") or {}
        stale = stale_champion(card, candidate.data_digest, candidate.stress_set, params.metric)
        if stale:
            log.info("%s since the champion was promoted: re-scoring it", stale)
            champion_metrics, table = rescore_champion_full(
                model_dir, card, split.frame, split.root, split.batch_size
            )
            champion_table.append(table)
            rescored = True
    try:
        decision = decide(params, candidate.metrics, champion_metrics, rescored)
    except SelectionError as exc:
        raise PromotionError(str(exc)) from None
    if card is None or decision.rule not in (RULE_BETTER, RULE_BETTER_LOWER):
        return decision

    def champion_predictions() -> pd.DataFrame:
        if not champion_table:
            log.info("scoring the champion image by image for the paired test")
            champion_table.append(
                rescore_champion_full(model_dir, card, split.frame, split.root, split.batch_size)[
                    1
                ]
            )
        return champion_table[0]

    return apply_paired(decision, params, paired_test(params, candidate, champion_predictions))


def export_winner(
    decision: Decision, candidate: Candidate, split: TestSplit, work_dir: Path
) -> tuple[Decision, Release | None]:
    """A winner's served files (chestct.evaluation.release); a failed export or parity check
    turns the win into a rejection naming it."""
    if not decision.promote:
        return decision, None
    try:
        return decision, release_for(
            candidate.model_path, split.frame, split.root, split.batch_size, work_dir
        )
    except (ExportError, FamilyError) as exc:
        log.error("%s", exc)
        return replace(
            decision,
            promote=False,
            rule=RULE_EXPORT_FAILED,
            # Keep the figures that won, then say why the win does not count.
            reason=f"rejected ({RULE_EXPORT_FAILED}): "
            f"{decision.reason.split(': ', 1)[1]}; but {exc}",
        ), None


def folder_contents(
    candidate: Candidate,
    release: Release,
    params: PromoteParams,
    preprocessing: Preprocessing,
    registered: dict[str, Any],
    git_sha: str | None,
    run_ids: Mapping[str, str | None],
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Path]]:
    """The new model folder: its card (every file pinned), promotion.json and its files."""
    card = build_card(
        params=params,
        preprocessing=preprocessing,
        candidate=candidate,
        inference=release.inference,
        model_sha=sha256_file(candidate.model_path),
        release=release,
        # A CNN is installed as model.keras whatever train named it; the other families keep
        # their names (ensemble.json names its members by theirs).
        model_file=MODEL_FILE if release.card["family"] == "cnn" else candidate.model_path.name,
    )
    files = {
        card["model_file"]: candidate.model_path,
        **release.files,
        OOD_FILE: candidate.ood_path,
        **({REFERENCE_FILE: candidate.reference_path} if candidate.reference_path else {}),
    }
    promotion = build_promotion(registered, git_sha, run_ids, card["model_sha256"])
    return pin_digests(card, files), promotion, files


def promote_candidate(
    candidate: Candidate,
    test: pd.DataFrame,
    params: PromoteParams,
    *,
    model_dir: Path,
    root: Path,
    batch_size: int,
    preprocessing: Preprocessing,
    work_dir: Path,
    register: Register,
    run_ids: Mapping[str, str | None] | None = None,
    before_swap: Callable[[PromoteResult, Path | None], None] | None = None,
    after_swap: Callable[[PromoteResult], None] | None = None,
) -> PromoteResult:
    """Decide, export and install (or leave model/ alone); returns what happened.

    Args:
        candidate: the evaluated model.
        test: the current test split (DATASET_COLUMNS), for re-scoring and parity.
        params: the promote params.
        model_dir: the champion's folder (model/).
        root: the folder the manifests' paths are relative to.
        batch_size: prediction batch size.
        preprocessing: how the candidate's images were prepared (its input size included),
            for the card: serving prepares uploads with it.
        work_dir: scratch folder for the exported files (inside the stage's output folder).
        register: logs and registers the model under an alias (MLflow in main()).
        run_ids: MLflow run ids of the stages behind the candidate, for the card.
        before_swap: called with the result and the new model's card file (None when
            rejected) before model/ changes: the MLflow calls that may fail go here.
        after_swap: called once model/ holds the outcome (the pointer); if it raises after
            a swap, the previous model/ is put back (chestct.modelfolder.write_model_folder).
    """
    split = TestSplit(test, root, batch_size)
    decision = judge(candidate, split, params, model_dir)
    decision, release = export_winner(decision, candidate, split, work_dir)
    log.info("decision: %s", decision.reason)
    registered: dict[str, Any] = {}
    if decision.rule != RULE_TIE:  # a tie is the champion again: no new registry version
        alias = "champion" if decision.promote else "challenger"
        registered = register(candidate.model_path, alias)
    if not decision.promote or release is None:
        # DVC expects model/ to exist after the stage; an empty folder means "no champion".
        rejected = PromoteResult(decision, registered, None)
        if before_swap is not None:
            before_swap(rejected, None)
        model_dir.mkdir(parents=True, exist_ok=True)
        if after_swap is not None:
            after_swap(rejected)
        return rejected
    new_card, promotion, files = folder_contents(
        candidate, release, params, preprocessing, registered, git_state(root).sha, run_ids or {}
    )
    result = PromoteResult(decision, registered, new_card, promotion)
    if before_swap is not None:
        card_file = work_dir / CARD_NAME
        atomic_write_json(card_file, new_card)
        before_swap(result, card_file)
    try:
        write_model_folder(
            model_dir,
            new_card,
            files,
            promotion=promotion,
            after_swap=None if after_swap is None else lambda: after_swap(result),
        )
    except ModelFolderError as exc:
        raise PromotionError(f"the promoted model folder cannot be written: {exc}") from None
    log.info(
        "promoted %s version %s into %s",
        params.registered_model,
        registered.get("version"),
        model_dir,
    )
    return result
