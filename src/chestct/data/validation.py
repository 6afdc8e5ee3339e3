"""Validating the split dataset: the frame the checks run on, the checks, quarantine.

`validate_splits` is the validate stage's work: it joins the split manifests with the resize
index and ingest's acquisition cues into one frame (one row per file), runs every check family
(chestct.data.checks, chestct.data.content_checks), leaves quarantined files out, and returns
the clean per-split datasets with the report (chestct.data.check_report).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from chestct.data.check_report import Report, quarantine
from chestct.data.checks import (
    Checker,
    check_table,
    copy_checks,
    dataset_checks,
    file_checks,
    identity_checks,
)
from chestct.data.content_checks import content_checks, read_slices
from chestct.data.dedup import group_files
from chestct.data.manifest import DATASET_COLUMNS, SPLITS
from chestct.data.shortcuts import PIXEL_FEATURES, ShortcutResult
from chestct.settings import ValidateParams


def validate_splits(
    manifests: dict[str, pd.DataFrame],
    index: pd.DataFrame,
    params: ValidateParams,
    *,
    seed: int = 0,
    skipped: list[dict[str, str]] | None = None,
    acquisition: pd.DataFrame | None = None,
    root: Path | None = None,
    near_copy_similarity: float = 0.9,
) -> tuple[dict[str, pd.DataFrame], Report]:
    """Run the checks; returns per-split datasets (decodable, not quarantined) and the report.
    Raises ChecksError when the checks are misconfigured.

    Args:
        manifests: split -> ingest-manifest rows of that split.
        index: the resize index (one row per distinct content).
        params: validate params.
        seed: for the shortcut detector's folds.
        skipped: files ingest could not decode ({path, reason}), reported as undecodable.
        acquisition: ingest's acquisition features (ACQUISITION_COLUMNS, by sha256); without
            them the acquisition_shortcut check is skipped.
        root: the project root the manifests' paths are relative to; without it the pixel
            checks (chestct.data.content_checks) are skipped.
        near_copy_similarity: params `base.near_copy_similarity`.
    """
    frame = check_frame(manifests, index, acquisition, params)
    checker = Checker(frame, params)
    file_checks(checker, skipped or [])
    copy_checks(checker)
    identity_checks(checker)
    content: dict = {}
    if root is not None:
        content = content_checks(checker, read_slices(frame, root), near_copy_similarity)

    quarantined_rows = quarantine(checker.findings) if params.quarantine else {}
    good = frame[frame["ok"] & ~frame.index.isin(list(quarantined_rows))]
    counts, shortcut = dataset_checks(checker, good, seed, content.get("series_of_row"))
    datasets = {
        s: good[good["split"] == s]
        .rename(columns={"path": "original", "resized": "path"})[list(DATASET_COLUMNS)]
        .reset_index(drop=True)
        for s in SPLITS
    }
    summary = _summary(frame, good, len(skipped or []), len(quarantined_rows))
    if content:
        summary["series_per_class"] = content["series_per_class"]
        summary["novelty"] = content["novelty"]
    report = Report(
        findings=checker.findings,
        counts=counts,
        checks=check_table(checker),
        summary=summary,
        quarantined=_quarantined(frame, quarantined_rows),
        shortcut=_shortcut(shortcut),
        metadata=good[
            ["label", "width", "height", *[c for c in PIXEL_FEATURES if c in good.columns]]
        ].copy(),
    )
    report.novelty_values = content.get("novelty_values", {})
    return datasets, report


def check_frame(
    manifests: dict[str, pd.DataFrame],
    index: pd.DataFrame,
    acquisition: pd.DataFrame | None,
    params: ValidateParams,
) -> pd.DataFrame:
    """All splits in one frame, one row per file: the resize index and the pixels'
    acquisition cues merged in, copies grouped."""
    frame = pd.concat([m.assign(split=s) for s, m in manifests.items()], ignore_index=True).merge(
        index, on="sha256", how="left", validate="many_to_one"
    )
    if acquisition is not None:
        pixels = acquisition[["sha256", "frame_mean", *PIXEL_FEATURES]].drop_duplicates("sha256")
        frame = frame.merge(pixels, on="sha256", how="left", validate="many_to_one")
    frame["ok"] = frame["ok"].fillna(False).astype(bool)
    frame["resized"] = frame["resized"].fillna("").astype(str)
    frame["group"] = group_files(frame, params.near_duplicate_distance)
    return frame


def _summary(
    frame: pd.DataFrame, good: pd.DataFrame, skipped: int, quarantined: int
) -> dict[str, Any]:
    decodable = frame[frame["ok"]]
    return {
        "files": len(frame) + skipped,
        "decodable": len(decodable),
        "distinct_contents": int(decodable["sha256"].nunique()),
        "exact_redundant_copies": int(len(decodable) - decodable["sha256"].nunique()),
        "exact_copy_groups": int((decodable.groupby("sha256").size() > 1).sum()),
        "quarantined": quarantined,
        "handed_on": len(good),
    }


def _quarantined(frame: pd.DataFrame, rows: dict[Any, list[str]]) -> list[dict[str, str]]:
    """quarantine.csv's rows: each file left out and the checks that left it out."""
    return [
        {
            "split": str(frame.at[i, "split"]),
            "label": str(frame.at[i, "label"]),
            "source_path": str(frame.at[i, "source_path"]),
            "sha256": str(frame.at[i, "sha256"]),
            "checks": ",".join(sorted(set(c))),
        }
        for i, c in sorted(rows.items())
    ]


def _shortcut(shortcut: ShortcutResult | None) -> dict[str, Any] | None:
    if shortcut is None:
        return None
    return {
        "score": shortcut.score,
        "chance": shortcut.chance,
        "folds": shortcut.folds,
        "images": shortcut.images,
        "by_family": shortcut.by_family,
        "pixels": shortcut.pixels,
        "by_feature": shortcut.by_feature,
    }
