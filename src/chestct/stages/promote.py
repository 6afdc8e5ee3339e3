"""promote: put the candidate in model/ only if it is better than the champion.

The champion (model/, described by model/model.json) is re-scored on the current test split
when the test data changed since it was promoted, so both are judged on the same images.
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

import contextlib
import json
import logging
import shutil
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd

from chestct.data.manifest import DATASET_COLUMNS, read_manifest
from chestct.evaluation.metrics import lower_is_better, metric_value, numeric_keys
from chestct.evaluation.novelty import card_entry
from chestct.evaluation.release import Release, release_for
from chestct.evaluation.scoring import Preprocessing, ScoringError, score
from chestct.evaluation.uncertainty import PairedResult, paired_on_tables
from chestct.fsutil import atomic_write_json, fsync_dir, sha256_file, swap_dir, sync_tree
from chestct.imaging.preparation import Normalise
from chestct.inference import Artefact, ModelFiles, ModelRefused, open_artefact
from chestct.labels import CLASSES, DISPLAY_NAMES
from chestct.model.export import ExportError
from chestct.model.families import FamilyError, family_of, read_ensemble
from chestct.model.gradcam import CAM_FILE
from chestct.modelcard import FILES_KEY, ModelCard
from chestct.monitoring.signals import REFERENCE_FILE
from chestct.pointers import (
    PointerError,
    git_state,
    lineage_tags,
    now_utc,
    read_pointer,
    run_id_of,
)
from chestct.runner import StageFailed, run_main, stage_session
from chestct.settings import PromoteParams

log = logging.getLogger(__name__)

CARD_NAME = "model.json"
PROMOTION_NAME = "promotion.json"  # run-specific; listed in .dvcignore
MODEL_FILE = "model.keras"
OOD_FILE = "ood.npz"

# register(model_path, alias) -> {"name", "version", "alias", "model_uri"}
Register = Callable[[Path, str], dict[str, Any]]


@dataclass(frozen=True)
class Decision:
    promote: bool
    metric: str
    candidate: float
    champion: float | None
    champion_rescored: bool
    reason: str  # "<verdict> (<rule>): <the figures compared>"
    rule: str  # the RULE_* that decided
    paired: dict[str, Any] | None = None  # the paired bootstrap (PairedResult) when it ran


@dataclass(frozen=True)
class Candidate:
    """What evaluate handed on about the trained model."""

    model_path: Path
    metrics: dict[str, Any]
    calibration: dict[str, Any]  # evaluate's calibration.json
    ood_path: Path  # evaluate's ood.npz
    data_digest: str  # digest of the test split manifest
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


def selection_value(metrics: dict[str, Any], metric: str, whose: str) -> float:
    """The value of promote.metric (a dotted key of metrics.json) in `whose` metrics.

    Raises:
        StageFailed: the key names the external set (reported apart, never selected on) or
            is not a number in the metrics; the message lists the keys that are.
    """
    if metric.split(".")[0] == "external":
        raise StageFailed(
            f"promote.metric {metric!r} points at the external test set, which is reported "
            "apart and never used for selection; choose a key of metrics.json such as "
            "robust_macro_f1"
        )
    value = metric_value(metrics, metric)
    if value is None:
        raise StageFailed(
            f"promote.metric {metric!r} is not among the {whose}'s metrics (valid keys: "
            f"{', '.join(numeric_keys(metrics))}); choose one of those or rerun evaluate"
        )
    return value


# The rules promote applies, in this order; Decision.rule names the one that decided.
RULE_BELOW_MINIMUM = "below promote.minimum"
RULE_ABOVE_MAXIMUM = "above promote.minimum"  # a metric where lower is better
RULE_FIRST_MODEL = "first model"
RULE_TIE = "tie with the champion"
RULE_BETTER = "better than champion + margin"
RULE_NOT_BETTER = "not better than champion + margin"
RULE_BETTER_LOWER = "better than champion - margin"  # lower is better
RULE_NOT_BETTER_LOWER = "not better than champion - margin"
RULE_EXPORT_FAILED = "light model export failed"
RULE_BELOW_MEMORIZER = "below the memorizer"
RULE_NOISE = "difference within noise (paired bootstrap)"
# Equal scores computed from the same test images: a tie, whatever the margin.
TIE_TOLERANCE = 1e-9


def decide(
    params: PromoteParams,
    candidate: dict[str, Any],
    champion: dict[str, Any] | None,
    champion_rescored: bool = False,
) -> Decision:
    """Compare on params.metric and name the rule that decided.

    A candidate worse than `promote.minimum` is rejected; a tie (equal scores) keeps the
    champion: rerunning an unchanged pipeline promotes nothing. A candidate below the
    memorizer on the test split is rejected (`promote.beat_memorizer`); without a champion it
    is promoted; otherwise it must be strictly better than the champion by more than
    `promote.margin` (and then survive `apply_paired`).
    For a metric where lower is better (metrics.lower_is_better: ECE, NLL, rates) the
    comparison turns round: `minimum` is a maximum and the candidate must be below the
    champion - margin.
    """
    metric = params.metric
    score = selection_value(candidate, metric, "candidate")
    higher = not lower_is_better(metric)
    sign = 1.0 if higher else -1.0
    best = None if champion is None else selection_value(champion, metric, "champion")
    against = "no champion" if best is None else f"champion {best:.4f}"
    plus, beats, fails = ("+", ">", "<=") if higher else ("-", "<", ">=")
    if sign * score < sign * params.minimum:
        rule = RULE_BELOW_MINIMUM if higher else RULE_ABOVE_MAXIMUM
        ok = False
        detail = (
            f"candidate {metric} {score:.4f} {'<' if higher else '>'} promote.minimum "
            f"{params.minimum} ({against}{'' if higher else '; a maximum: lower is better'})"
        )
    elif best is not None and abs(score - best) <= TIE_TOLERANCE:
        rule, ok = RULE_TIE, False
        detail = (
            f"candidate {metric} {score:.4f} = champion {best:.4f}; the champion stays and "
            "nothing is registered"
        )
    elif (memo := below_memorizer(params, candidate)) is not None:
        rule, ok = RULE_BELOW_MEMORIZER, False
        detail = f"{memo} ({against})"
    elif best is None:
        rule, ok = RULE_FIRST_MODEL, True
        detail = (
            f"no champion; candidate {metric} {score:.4f} {'>=' if higher else '<='} "
            f"promote.minimum {params.minimum}"
        )
    elif sign * score > sign * (best + sign * params.margin):
        rule, ok = (RULE_BETTER if higher else RULE_BETTER_LOWER), True
        detail = (
            f"candidate {metric} {score:.4f} {beats} champion {best:.4f} {plus} promote.margin "
            f"{params.margin}"
        )
    else:
        rule, ok = (RULE_NOT_BETTER if higher else RULE_NOT_BETTER_LOWER), False
        detail = (
            f"candidate {metric} {score:.4f} {fails} champion {best:.4f} {plus} promote.margin "
            f"{params.margin}"
        )
    verdict = "promoted" if ok else ("kept the champion" if rule == RULE_TIE else "rejected")
    reason = f"{verdict} ({rule}): {detail}"
    return Decision(ok, metric, score, best, champion_rescored, reason, rule)


# The memorizer's metrics (chestct.evaluation.novelty); another selection metric is held against
# its
# macro-F1, the figure the memorizer and every candidate share.
MEMORIZER_METRICS = ("accuracy", "balanced_accuracy", "macro_f1")


def below_memorizer(params: PromoteParams, candidate: dict[str, Any]) -> str | None:
    """Why the candidate is below the nearest-neighbour memorizer on the test split, or None
    (above it, equal, `promote.beat_memorizer` off, or metrics from before the memorizer)."""
    if not params.beat_memorizer:
        return None
    metric = params.metric if params.metric in MEMORIZER_METRICS else "macro_f1"
    memo = metric_value(candidate, f"baseline.nearest_neighbour.{metric}")
    mine = metric_value(candidate, metric)
    if memo is None or mine is None or mine >= memo - TIE_TOLERANCE:
        return None
    return (
        f"candidate {metric} {mine:.4f} < {memo:.4f} of the nearest-neighbour memorizer "
        "(the label of the most similar training slice, no learning) on the test split; "
        "promote.beat_memorizer refuses it"
    )


def apply_paired(
    decision: Decision, params: PromoteParams, paired: PairedResult | str
) -> Decision:
    """A margin win kept only if the paired bootstrap says it is not noise.

    Args:
        decision: what `decide` found (only a RULE_BETTER* decision can change).
        paired: the paired test, or why it could not run (the win then stands on the margin
            and the reason says so).
    """
    if decision.rule not in (RULE_BETTER, RULE_BETTER_LOWER):
        return decision
    if isinstance(paired, str):
        return replace(decision, reason=f"{decision.reason}; paired test not run: {paired}")
    higher = not lower_is_better(decision.metric)
    facts = asdict(paired)
    if paired.significant(higher):
        return replace(decision, reason=f"{decision.reason}; {paired.describe()}", paired=facts)
    detail = decision.reason.split(": ", 1)[1]
    return replace(
        decision,
        promote=False,
        rule=RULE_NOISE,
        reason=f"rejected ({RULE_NOISE}): {detail}, but the {paired.describe()} > 1 - "
        f"promote.confidence ({1 - params.confidence:.2f}): the difference may be noise",
        paired=facts,
    )


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
            Preprocessing.from_spec(card.get("preprocessing")),
            temperature=float(card.get("temperature", 1.0)),
            model=served_champion(model_dir, card),
        )
    except (ScoringError, ModelRefused) as exc:
        raise StageFailed(f"re-scoring the champion in {model_dir}: {exc}") from None
    return metrics, table


def served_champion(model_dir: Path, card: dict[str, Any]) -> Artefact | None:
    """The champion's served files, each checked against its sha256 in the card, opened as
    evaluate opens the candidate's (chestct.inference.open_artefact); None for a card without
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
    image_size: int,
    preprocessing: dict[str, Any],
    candidate: Candidate,
    inference: dict[str, Any],
    model_sha: str,
    release: Release | None = None,
    model_file: str = MODEL_FILE,
) -> dict[str, Any]:
    """The model card: what serving needs to reproduce, calibrate and explain predictions.

    Only what the candidate and params determine: no registry version, run id or time (those
    are in build_promotion()), so that the same inputs give the same card. It goes through
    chestct.modelcard.ModelCard, the type the inference core reads it as, so that a card the
    service would refuse is never written.
    """
    cal = candidate.calibration
    card = {
        "name": params.registered_model,
        "registered_model": params.registered_model,
        "classes": list(CLASSES),
        "display_names": DISPLAY_NAMES,
        "image_size": image_size,
        "preprocessing": preprocessing,
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
        "intended_use": "research and education only; not a medical device",
    }
    try:
        return ModelCard.from_dict(card).to_dict()
    except ValueError as exc:
        raise StageFailed(f"the model card promote built is not valid: {exc}") from None


def build_promotion(
    registered: dict[str, Any],
    git_sha: str | None,
    run_ids: Mapping[str, str | None],
    model_sha: str,
) -> dict[str, Any]:
    """promotion.json: which registry version this is and which runs made it, and when.

    `model_sha256` ties the record to the card it was written with: after `dvc checkout`
    brings back another model/, the left-over record no longer matches and is ignored."""
    return {
        "model_sha256": model_sha,
        "version": registered.get("version"),
        "registered": registered,
        "git_sha": git_sha,
        "mlflow_run_ids": dict(run_ids),
        "promoted_at": now_utc(),
    }


def install_model(
    model_path: Path,
    card: dict[str, Any],
    model_dir: Path,
    extras: Mapping[str, Path] | None = None,
    after_swap: Callable[[], None] | None = None,
    promotion: dict[str, Any] | None = None,
) -> None:
    """Write the new model folder beside model/, then swap it in atomically.

    Args:
        model_path: the .keras file, copied as model.keras.
        card: written as model.json.
        model_dir: the folder to replace.
        extras: further files by their name inside the new folder (light model, OOD, CAM).
        after_swap: what records the swap (the pointer, MLflow); if it raises, the previous
            model/ is swapped back (or removed when there was none) before the error goes on,
            so model/ never holds a model its run did not record.
        promotion: written as promotion.json (registry version, run ids, time).
    """
    staging = model_dir.with_name(f".{model_dir.name}.new-{uuid.uuid4().hex[:8]}")
    staging.mkdir(parents=True)
    previous: Path | None = None
    try:
        shutil.copy2(model_path, staging / str(card.get("model_file", MODEL_FILE)))
        for name, source in (extras or {}).items():
            shutil.copy2(source, staging / name)
        atomic_write_json(staging / CARD_NAME, card)
        if promotion is not None:
            atomic_write_json(staging / PROMOTION_NAME, promotion)
        for path in staging.iterdir():
            # Atomic writes create private (0600) files; the predictor may run as another user.
            path.chmod(0o644)
        # Every file and the folder itself on disk before the swap, so that a crash right
        # after it cannot leave model/ naming files whose data never reached the disk.
        sync_tree(staging)
        previous = swap_dir(staging, model_dir)
        fsync_dir(model_dir.parent)
        try:
            if after_swap is not None:
                after_swap()
        except BaseException:
            if previous is not None:
                failed = swap_dir(previous, model_dir)
                previous = failed  # removed below
            else:
                shutil.rmtree(model_dir)
            fsync_dir(model_dir.parent)
            log.error(
                "recording the promotion failed after model/ was swapped; the previous "
                "model/ is back in place"
            )
            raise
    finally:
        for leftover in (staging, previous):
            if leftover is not None and leftover.exists():
                shutil.rmtree(leftover)


def file_digests(card: dict[str, Any], folder_files: Mapping[str, Path]) -> dict[str, Any]:
    """The card with a sha256 on every file entry it names (inference, cam, ood, monitoring,
    any entry object with a `file` key, and the names of the `files` map), from the files that
    will be installed under those names; serving checks every one at every load
    (chestct.modelcard.card_files lists them the same way)."""
    out = json.loads(json.dumps(card))
    for key, entry in out.items():
        if key != FILES_KEY and isinstance(entry, dict) and entry.get("file") in folder_files:
            entry["sha256"] = sha256_file(folder_files[entry["file"]])
    extra = out.get(FILES_KEY)
    if isinstance(extra, dict):
        for name in extra:
            if name in folder_files:
                extra[name] = sha256_file(folder_files[name])
    return out


def run_promote(
    candidate: Candidate,
    test: pd.DataFrame,
    params: PromoteParams,
    *,
    model_dir: Path,
    root: Path,
    batch_size: int,
    image_size: int,
    preprocessing: dict[str, Any],
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
        image_size: the candidate's input size, for the card.
        preprocessing: how serving must prepare an image, for the card.
        work_dir: scratch folder for the exported files (inside the stage's output folder).
        register: logs and registers the model under an alias (MLflow in main()).
        run_ids: MLflow run ids of the stages behind the candidate, for the card.
        before_swap: called with the result and the new model's card file (None when
            rejected) before model/ changes: the MLflow calls that may fail go here.
        after_swap: called once model/ holds the outcome (the pointer); if it raises after
            a swap, the previous model/ is put back (see install_model).
    """
    card = read_card(model_dir)
    champion_metrics, rescored = None, False
    champion_table: list[pd.DataFrame] = []  # the champion's predictions, once scored
    if card is not None:
        champion_metrics = card.get("metrics") or {}
        if (
            card.get("data_digest") != candidate.data_digest
            or metric_value(champion_metrics, params.metric) is None
        ):
            log.info("test data or metric changed since the champion was promoted: re-scoring")
            champion_metrics, table = rescore_champion_full(
                model_dir, card, test, root, batch_size
            )
            champion_table.append(table)
            rescored = True
    decision = decide(params, candidate.metrics, champion_metrics, rescored)
    if card is not None and decision.rule in (RULE_BETTER, RULE_BETTER_LOWER):

        def champion_predictions() -> pd.DataFrame:
            if not champion_table:
                log.info("scoring the champion image by image for the paired test")
                champion_table.append(
                    rescore_champion_full(model_dir, card, test, root, batch_size)[1]
                )
            return champion_table[0]

        decision = apply_paired(
            decision, params, paired_test(params, candidate, champion_predictions)
        )
    inference: dict[str, Any] | None = None
    release: Release | None = None
    if decision.promote:
        try:
            release = release_for(candidate.model_path, test, root, batch_size, work_dir)
            inference = release.inference
        except (ExportError, FamilyError) as exc:
            log.error("%s", exc)
            decision = replace(
                decision,
                promote=False,
                rule=RULE_EXPORT_FAILED,
                # Keep the figures that won, then say why the win does not count.
                reason=f"rejected ({RULE_EXPORT_FAILED}): "
                f"{decision.reason.split(': ', 1)[1]}; but {exc}",
            )
    log.info("decision: %s", decision.reason)
    registered: dict[str, Any] = {}
    if decision.rule != RULE_TIE:  # a tie is the champion again: no new registry version
        alias = "champion" if decision.promote else "challenger"
        registered = register(candidate.model_path, alias)
    if not decision.promote or inference is None or release is None:
        # DVC expects model/ to exist after the stage; an empty folder means "no champion".
        rejected = PromoteResult(decision, registered, None)
        if before_swap is not None:
            before_swap(rejected, None)
        model_dir.mkdir(parents=True, exist_ok=True)
        if after_swap is not None:
            after_swap(rejected)
        return rejected
    new_card = build_card(
        params=params,
        image_size=image_size,
        preprocessing=preprocessing,
        candidate=candidate,
        inference=inference,
        model_sha=sha256_file(candidate.model_path),
        release=release,
        # A CNN is installed as model.keras whatever train named it; the other families keep
        # their names (ensemble.json names its members by theirs).
        model_file=MODEL_FILE if release.card["family"] == "cnn" else candidate.model_path.name,
    )
    promotion = build_promotion(
        registered, git_state(root).sha, run_ids or {}, new_card["model_sha256"]
    )
    files = {
        **release.files,
        OOD_FILE: candidate.ood_path,
        **({REFERENCE_FILE: candidate.reference_path} if candidate.reference_path else {}),
    }
    new_card = file_digests(new_card, files)
    result = PromoteResult(decision, registered, new_card, promotion)
    if before_swap is not None:
        card_file = work_dir / CARD_NAME
        atomic_write_json(card_file, new_card)
        before_swap(result, card_file)
    install_model(
        candidate.model_path,
        new_card,
        model_dir,
        files,
        after_swap=None if after_swap is None else lambda: after_swap(result),
        promotion=promotion,
    )
    log.info(
        "promoted %s version %s into %s",
        params.registered_model,
        registered.get("version"),
        model_dir,
    )
    return result


# --------------------------------------------------------------------------- MLflow


# The figures a registered version carries as tags (metric.<name>) and in its description.
HEADLINE_METRICS = ("macro_f1", "robust_macro_f1", "balanced_accuracy", "ece_calibrated")


def version_facts(paths: Any, metrics: dict[str, Any]) -> tuple[str, dict[str, str]]:
    """A registered version's description and tags: what data it was trained on (synthetic or
    real, and the source), the model family and the headline test metrics."""
    try:
        source = str(read_pointer(paths, "ingest", verify=False).params["ingest"]["source"])
    except (PointerError, KeyError, TypeError):
        source = "unknown"
    try:
        family = str(
            read_pointer(paths, "base-model", verify=False).params["base_model"]["architecture"]
        )
    except (PointerError, KeyError, TypeError):
        family = "unknown"
    kind = "synthetic" if source == "synthetic" else "unknown" if source == "unknown" else "real"
    tags = {
        "chestct.data_source": kind,
        "chestct.ingest_source": source[:250],
        "chestct.family": family,
    }
    figures = []
    for key in HEADLINE_METRICS:
        value = metrics.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            tags[f"metric.{key}"] = f"{value:.4f}"
            figures.append(f"{key} {value:.4f}")
    description = (
        f"{family} trained on {kind} data (ingest.source: {source}). "
        f"Test split: {', '.join(figures) or 'no metrics'}."
    )
    return description, tags


def mlflow_register(
    model_path: Path,
    name: str,
    alias: str,
    description: str = "",
    facts: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Log the Keras model to the active run, register it with `description` and the tags
    `facts`, and point `alias` at it."""
    import mlflow
    from mlflow import MlflowClient

    from chestct.model.modeling import load_model as load_keras

    client = MlflowClient()
    if family_of(model_path) == "cnn":
        info = mlflow.tensorflow.log_model(
            load_keras(model_path),
            name="model",
            registered_model_name=name,
            # Inferring requirements runs pip for ~20 s; the pins are known.
            pip_requirements=[
                f"tensorflow-cpu=={_version('tensorflow-cpu')}",
                f"keras=={_version('keras')}",
            ],
        )
        version, model_uri = str(info.registered_model_version), info.model_uri
    else:
        # texture / ensemble: the model's files as run artifacts, registered by their URI.
        for member in _family_files(model_path):
            mlflow.log_artifact(str(member), "model")
        run = mlflow.active_run()
        model_uri = f"runs:/{run.info.run_id}/model" if run else str(model_path.parent)
        with contextlib.suppress(mlflow.exceptions.MlflowException):  # registered before
            client.create_registered_model(name)
        created = client.create_model_version(
            name,
            f"{run.info.artifact_uri}/model" if run else model_uri,
            run_id=run.info.run_id if run else None,
        )
        version = str(created.version)
    client.set_registered_model_alias(name, alias, version)
    if description:
        client.update_model_version(name, version, description=description)
    for key, value in (facts or {}).items():
        client.set_model_version_tag(name, version, key, value)
    active = mlflow.active_run()
    if active is not None:
        run = client.get_run(active.info.run_id)
        # compare.py follows these tags from a version to the runs of every stage behind it.
        for key, value in run.data.tags.items():
            if key.startswith("chestct.run.") or key in ("git.sha", "dvc.exp_name"):
                client.set_model_version_tag(name, version, key, value)
        client.set_model_version_tag(name, version, "chestct.run.promote", run.info.run_id)
    return {"name": name, "version": version, "alias": alias, "model_uri": model_uri}


def _family_files(model_path: Path) -> list[Path]:
    """The files that make a texture or ensemble model (the ensemble: its members too)."""
    if family_of(model_path) != "ensemble":
        return [model_path]
    members = read_ensemble(model_path)["members"]
    return [model_path, *(model_path.parent / m["file"] for m in members.values())]


def _decision_tag(decision: Decision) -> str:
    if decision.promote:
        return "promoted"
    return "tie" if decision.rule == RULE_TIE else "rejected"


def _version(pkg: str) -> str:
    from importlib import metadata

    return metadata.version(pkg)


def _preprocessing(settings: Any) -> dict[str, Any]:
    """How serving must prepare an image: from the params the resize stage really ran with."""
    resize = read_pointer(settings.paths, "resize", verify=False).params.get("resize", {})
    spec: dict[str, Any] = {
        "decode": "by content (PNG, JPEG, BMP, TIFF, DICOM); any mode to 8-bit grey; "
        "transparent pixels over black",
        "resize": resize.get("mode", "stretch"),
        "interpolation": resize.get("interpolation", "area"),
        "input": "float32 in [0, 255], shape (image_size, image_size, 1)",
        # The body crop and intensity normalisation (serving reads them back with
        # imaging.Normalise.from_spec; a resize run from before them recorded none).
        **Normalise.from_spec(resize).card(),
    }
    try:
        ingest = read_pointer(settings.paths, "ingest", verify=False).params.get("ingest", {})
    except PointerError:  # the window only matters for DICOM uploads; serving has a default
        ingest = {}
    if "window" in ingest:
        spec["window"] = ingest["window"]
    return spec


def main() -> None:
    with stage_session("promote") as session:
        s = session.settings
        root, params = s.paths.root, s.params.promote
        evaluate = read_pointer(s.paths, "evaluate")
        train = read_pointer(s.paths, "train")
        validate = read_pointer(s.paths, "validate")
        try:
            calibration = json.loads(
                evaluate.output_path("calibration", root).read_text(encoding="utf-8")
            )
            ood_path = evaluate.output_path("ood", root)
        except (PointerError, OSError, json.JSONDecodeError) as exc:
            raise StageFailed(
                f"evaluate's outputs lack the calibration ({exc}); rerun `dvc repro evaluate`"
            ) from exc
        candidate = Candidate(
            model_path=train.output_path("model", root),
            metrics=evaluate.metrics,
            calibration=calibration,
            ood_path=ood_path,
            data_digest=validate.outputs["test"].digest,
            reference_path=evaluate.output_path("reference", root),
            predictions_path=evaluate.output_path("predictions", root),
        )
        test = read_manifest(validate.output_path("test", root), DATASET_COLUMNS)

        import mlflow

        mlflow.set_tags(lineage_tags(s.paths, "promote"))
        release = session.out_dir / "release"

        def record(result: PromoteResult, card_file: Path | None) -> None:
            """MLflow calls that may fail, made before model/ changes."""
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

        def finish(result: PromoteResult) -> None:
            """The pointer (and its MLflow logging), once model/ holds the outcome; a failure
            here puts the previous model/ back."""
            decision = result.decision
            outputs: dict[str, Path] = {}
            if result.card is not None:
                outputs["card"] = s.paths.model / CARD_NAME
            decision_path = session.out_dir / "decision.json"
            # The registry version is store state, not a function of the inputs: it goes to
            # the MLflow run and model/promotion.json, not to this DVC output.
            atomic_write_json(decision_path, asdict(decision))
            outputs["decision"] = decision_path
            session.finish(
                inputs=["validate", "train", "evaluate"],
                outputs=outputs,
                metrics={
                    "promoted": int(decision.promote),
                    "candidate": decision.candidate,
                    **({"champion": decision.champion} if decision.champion is not None else {}),
                    **(
                        {
                            "paired_difference": decision.paired["difference"],
                            "paired_p_value": decision.paired["p_value"],
                        }
                        if decision.paired
                        else {}
                    ),
                    **(
                        {"parity_max_abs_diff": result.card["inference"]["parity_max_abs_diff"]}
                        if result.card
                        else {}
                    ),
                },
                details={"decision": asdict(decision)},
            )

        run_promote(
            candidate,
            test,
            params,
            model_dir=s.paths.model,
            root=root,
            batch_size=s.params.evaluate.batch_size,
            image_size=s.params.base.image_size,
            preprocessing=_preprocessing(s),
            work_dir=release,
            register=lambda path, alias: mlflow_register(
                path, params.registered_model, alias, *version_facts(s.paths, evaluate.metrics)
            ),
            run_ids={
                "train": run_id_of(s.paths, "train"),
                "evaluate": run_id_of(s.paths, "evaluate"),
                "promote": session.run_id,
            },
            before_swap=record,
            after_swap=finish,
        )


if __name__ == "__main__":
    run_main("promote", main)
