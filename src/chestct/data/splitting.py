"""Splitting a manifest so that a group of copies never straddles two splits.

Files are first grouped: exact copies (same sha256), near-duplicates (perceptual hashes at
most `split.near_duplicate_distance` bits apart) and slices of one patient (DICOM PatientID,
else StudyInstanceUID, or the `group` column of a CSV listing; see chestct.data.grouping) form one
group, transitively; series of similar slices (chestct.data.similarity) join them. `carve`
assigns whole groups to splits, stratified by class and seeded; `split_manifest` is the split
stage's work, and what it finds spread over two splits (copies, identities) it reports.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from chestct.data.dedup import group_files
from chestct.data.grouping import identity_leaks, join_series, split_groups
from chestct.data.manifest import SPLITS
from chestct.data.similarity import series_groups
from chestct.imaging.decoding import decode
from chestct.imaging.formats import ImageError
from chestct.settings import SplitParams

log = logging.getLogger(__name__)

_ORDER = {s: i for i, s in enumerate(SPLITS)}


class SplitError(ValueError):
    """A source that cannot be split as the params ask; the message says what to change."""


@dataclass(frozen=True)
class SplitSummary:
    mode: str  # keep | pool
    counts: dict[str, dict[str, int]]
    carved: list[str] = field(default_factory=list)  # splits made here rather than kept
    groups: dict[str, int] = field(default_factory=dict)  # exact / near / identity counts
    cross_split: list[dict[str, Any]] = field(default_factory=list)  # copies over two splits
    cross_split_identities: list[dict[str, Any]] = field(default_factory=list)  # patients...
    dropped: list[dict[str, str]] = field(default_factory=list)


def carve(
    pool: pd.DataFrame, targets: list[str], params: SplitParams, seed: int
) -> dict[int, str]:
    """Assign whole groups of `pool` to the `targets` splits (the rest to train), per class."""
    rng = np.random.default_rng(seed)
    fractions = {"valid": params.valid_fraction, "test": params.test_fraction}
    # A group's class is its most common label; a group with two labels is a conflict that
    # validate reports, but the group still moves as one.
    labels = pool.groupby("group")["label"].agg(lambda s: s.value_counts().index[0])
    sizes = pool.groupby("group").size()
    assignment: dict[int, str] = {}
    for label in sorted(labels.unique()):
        members = np.array(sorted(labels[labels == label].index))
        rng.shuffle(members)
        total = int(sizes[members].sum())
        want = {t: max(round(total * fractions[t]), 1) for t in targets}
        taken = dict.fromkeys(targets, 0)
        for group in members:
            size = int(sizes[group])
            target = next((t for t in ("test", "valid") if t in want and taken[t] < want[t]), "")
            # A group bigger than a whole target share stays in train rather than swamp it.
            if not target or size > want[target]:
                assignment[int(group)] = "train"
                continue
            taken[target] += size
            assignment[int(group)] = target
    return assignment


def split_manifest(
    ingest_manifest: pd.DataFrame,
    params: SplitParams,
    seed: int,
    thumbs: np.ndarray | None = None,
) -> tuple[dict[str, pd.DataFrame], SplitSummary]:
    """Split the ingest manifest; returns one frame per split (ingest columns) and a summary.

    `thumbs` (chestct.data.similarity thumbnails, one per manifest row) adds series: rows linked
    at `split.series_similarity` or above move together, like one patient's slices. Raises
    SplitError when the source cannot be split as asked.
    """
    frame = ingest_manifest.copy()
    # Copies decide what dedupe drops; the union with patients/studies/user groups decides
    # what moves together.
    frame["copies"] = group_files(frame, params.near_duplicate_distance)
    frame["group"], sources = split_groups(frame, params.near_duplicate_distance)
    series_count = 0
    if thumbs is not None and params.series_similarity != -1:
        series = series_groups(thumbs, params.series_similarity)
        series_count = len(set(series))
        frame["group"] = join_series(frame["group"], series)
    carved, present = _assign(frame, params, seed)
    cross, dropped, drop_index = _cross_split_groups(frame, params.dedupe == "drop")
    if params.dedupe == "drop":
        inside, inside_index = _redundant_copies(frame.drop(index=drop_index))
        dropped += inside
        drop_index += inside_index
    identities = identity_leaks(frame)
    kept = frame.drop(index=drop_index)
    columns = [c for c in ingest_manifest.columns if c not in ("group", "copies")]
    out = {s: kept[kept["split"] == s][columns].reset_index(drop=True) for s in SPLITS}
    for split, part in out.items():
        if part.empty:
            largest = int(frame.groupby("group").size().max())
            raise SplitError(
                f"split {split!r} is empty: the source has too few images "
                f"({len(frame)}, in {frame['group'].nunique()} groups of up to {largest} that "
                "move as one: copies and slices of one patient, study or group id) for "
                "split.valid_fraction/test_fraction; add data or raise the fractions"
            )
    counts = {
        s: {k: int(v) for k, v in p["label"].value_counts().sort_index().items()}
        for s, p in out.items()
    }
    groups = _group_counts(frame, sources, series_count)
    mode = "pool" if params.mode == "pool" or not present else "keep"
    return out, SplitSummary(
        mode=mode,
        counts=counts,
        carved=carved,
        groups=groups,
        cross_split=cross,
        cross_split_identities=identities,
        dropped=dropped,
    )


def _cross_split_groups(
    frame: pd.DataFrame, drop: bool
) -> tuple[list[dict[str, Any]], list[dict[str, str]], list[Any]]:
    """Copy groups over more than one split; with `drop`, the rows to remove from later
    splits."""
    spread = frame.groupby("copies")["split"].nunique()
    cross: list[dict[str, Any]] = []
    dropped: list[dict[str, str]] = []
    drop_index: list[Any] = []
    for group in spread[spread > 1].index:
        members = frame[frame["copies"] == group]
        # Later split first: the copy that leaks is what a reader looks for.
        members = members.iloc[np.argsort([-_ORDER[s] for s in members["split"]], kind="stable")]
        first = min(members["split"], key=_ORDER.__getitem__)
        exact = members["sha256"].nunique() == 1
        cross.append(
            {
                "kind": "exact" if exact else "near",
                "files": [
                    f"{s}: {p}"
                    for s, p in zip(members["split"], members["source_path"], strict=True)
                ],
            }
        )
        if drop:
            later = members[members["split"] != first]
            drop_index.extend(later.index)
            dropped.extend(
                {
                    "split": str(r.split),
                    "label": str(r.label),
                    "source_path": str(r.source_path),
                    "sha256": str(r.sha256),
                    "kept_in": first,
                    "reason": f"{'exact copy' if exact else 'near duplicate'} of a {first} file",
                }
                for r in later.itertuples()
            )
    return cross, dropped, drop_index


def _redundant_copies(frame: pd.DataFrame) -> tuple[list[dict[str, str]], list[Any]]:
    """Rows that repeat an earlier row of the same copy group, split and label: the rows
    `split.dedupe: drop` removes inside a split, with why."""
    repeats = frame.duplicated(subset=["copies", "split", "label"], keep="first")
    first = frame[~repeats].set_index(["copies", "split", "label"])["sha256"]
    dropped = [
        {
            "split": str(r.split),
            "label": str(r.label),
            "source_path": str(r.source_path),
            "sha256": str(r.sha256),
            "kept_in": str(r.split),
            "reason": (
                "exact copy"
                if first[(r.copies, r.split, r.label)] == r.sha256
                else "near duplicate"
            )
            + f" of another {r.split} file",
        }
        for r in frame[repeats].itertuples()
    ]
    return dropped, list(frame.index[repeats])


def grey_of(path: Path) -> np.ndarray:
    """The ingested file as grey (a file that no longer decodes: a flat slice, which links to
    nothing)."""
    try:
        return decode(path.read_bytes()).grey
    except (OSError, ImageError):
        return np.zeros((32, 32), np.uint8)


def _assign(frame: pd.DataFrame, params: SplitParams, seed: int) -> tuple[list[str], list[str]]:
    """Give every row of `frame` its split, in place: kept from the source or carved. Returns
    the splits carved here and those the source had."""
    frame["split"] = frame["split"].astype(str).replace({"<NA>": "", "nan": ""})
    present = [s for s in SPLITS if (frame["split"] == s).any()]
    if params.mode == "pool" or not present:
        carved = ["valid", "test"]
        pool_mask = pd.Series(True, index=frame.index)
    else:
        if "train" not in present:
            raise SplitError(
                f"split.mode keep: the source has {' and '.join(present)} but no train folder; "
                "add one, or set split.mode: pool to re-split everything"
            )
        carved = [s for s in SPLITS if s not in present]
        # Groups that also sit in a split the source fixed stay in train: carving them into
        # another split would create a leak the source did not have.
        fixed_groups = set(frame.loc[frame["split"].isin(["valid", "test"]), "group"])
        pool_mask = (frame["split"] == "train") & ~frame["group"].isin(fixed_groups)
    if carved:
        assignment = carve(frame[pool_mask], carved, params, seed)
        frame.loc[pool_mask, "split"] = frame.loc[pool_mask, "group"].map(assignment)
        log.info("carved %s out of %d files", " and ".join(carved), int(pool_mask.sum()))
    return carved, present


def _group_counts(
    frame: pd.DataFrame, sources: dict[str, Any], series_count: int
) -> dict[str, int]:
    """How many files, groups, copy groups and series the split saw, and where ids came from."""
    sizes = frame.groupby("copies").agg(n=("sha256", "size"), distinct=("sha256", "nunique"))
    return {
        "files": len(frame),
        "groups": int(frame["group"].nunique()),
        "exact_copy_groups": int((frame.groupby("sha256").size() > 1).sum()),
        "near_duplicate_groups": int((sizes["distinct"] > 1).sum()),
        **{k: v for k, v in sources.items() if k.startswith("groups_from_")},
        "files_without_identity": sources["files_without_identity"],
        "series": series_count,
    }
