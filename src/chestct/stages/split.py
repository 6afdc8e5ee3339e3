"""split: train/valid/test manifests in which a group of copies never straddles two splits.

Files are first grouped: exact copies (same sha256), near-duplicates (perceptual hashes at
most `split.near_duplicate_distance` bits apart) and slices of one patient (DICOM PatientID,
else StudyInstanceUID, or the `group` column of a CSV listing; see chestct.data.grouping) form one
group, transitively: the union of all these constraints.

- `split.mode: keep` keeps the source's splits. A split the source lacks is carved out of the
  source's train files (out of everything when the source has no split folders). Groups that the
  source itself spreads over two splits are reported; with `split.dedupe: drop` the copies in
  the later split (train < valid < test) are removed. A patient, study or user group that the
  source spreads over two splits is reported (never dropped: they are not copies); validate
  warns about it.
- `split.mode: pool` re-splits everything.

With `split.dedupe: drop`, in either mode, redundant copies inside one split go too: of the
exact copies and near-duplicates with the same label in one split, the first (manifest order)
stays. Copies with different labels are kept (a label conflict is validate's to report; which
label is right is the data owner's call).

Carving is stratified by class (a group's class is its most common label), seeded, and moves
whole groups, so copies of one slice land in one split. The per-split manifests are the only
thing downstream stages read.
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
from chestct.data.manifest import INGEST_COLUMNS, SPLITS, read_manifest, write_manifest
from chestct.data.similarity import series_groups, thumbnails
from chestct.imaging.decoding import decode
from chestct.imaging.formats import ImageError
from chestct.pointers import read_pointer
from chestct.runner import StageFailed, run_main, stage_session
from chestct.settings import SplitParams

log = logging.getLogger(__name__)

_ORDER = {s: i for i, s in enumerate(SPLITS)}
_LISTED = 10  # files named per identity in the pointer
DROPPED_COLUMNS: tuple[str, ...] = ("split", "label", "source_path", "sha256", "kept_in", "reason")


@dataclass(frozen=True)
class SplitSummary:
    mode: str  # keep | pool
    counts: dict[str, dict[str, int]]
    carved: list[str] = field(default_factory=list)  # splits made here rather than kept
    groups: dict[str, int] = field(default_factory=dict)  # exact / near / identity counts
    cross_split: list[dict[str, Any]] = field(default_factory=list)  # copies over two splits
    cross_split_identities: list[dict[str, Any]] = field(default_factory=list)  # patients...
    dropped: list[dict[str, str]] = field(default_factory=list)


def _carve(
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


def run_split(
    ingest_manifest: pd.DataFrame,
    params: SplitParams,
    seed: int,
    thumbs: np.ndarray | None = None,
) -> tuple[dict[str, pd.DataFrame], SplitSummary]:
    """Split the ingest manifest; returns one frame per split (ingest columns) and a summary.

    `thumbs` (chestct.data.similarity thumbnails, one per manifest row) adds series: rows linked
    at `split.series_similarity` or above move together, like one patient's slices.
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
    frame["split"] = frame["split"].astype(str).replace({"<NA>": "", "nan": ""})
    present = [s for s in SPLITS if (frame["split"] == s).any()]
    if params.mode == "pool" or not present:
        carved = ["valid", "test"]
        pool_mask = pd.Series(True, index=frame.index)
    else:
        if "train" not in present:
            raise StageFailed(
                f"split.mode keep: the source has {' and '.join(present)} but no train folder; "
                "add one, or set split.mode: pool to re-split everything"
            )
        carved = [s for s in SPLITS if s not in present]
        # Groups that also sit in a split the source fixed stay in train: carving them into
        # another split would create a leak the source did not have.
        fixed_groups = set(frame.loc[frame["split"].isin(["valid", "test"]), "group"])
        pool_mask = (frame["split"] == "train") & ~frame["group"].isin(fixed_groups)
    if carved:
        assignment = _carve(frame[pool_mask], carved, params, seed)
        frame.loc[pool_mask, "split"] = frame.loc[pool_mask, "group"].map(assignment)
        log.info("carved %s out of %d files", " and ".join(carved), int(pool_mask.sum()))

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
            raise StageFailed(
                f"split {split!r} is empty: the source has too few images "
                f"({len(frame)}, in {frame['group'].nunique()} groups of up to {largest} that "
                "move as one: copies and slices of one patient, study or group id) for "
                "split.valid_fraction/test_fraction; add data or raise the fractions"
            )
    counts = {
        s: {k: int(v) for k, v in p["label"].value_counts().sort_index().items()}
        for s, p in out.items()
    }
    sizes = frame.groupby("copies").agg(n=("sha256", "size"), distinct=("sha256", "nunique"))
    groups = {
        "files": len(frame),
        "groups": int(frame["group"].nunique()),
        "exact_copy_groups": int((frame.groupby("sha256").size() > 1).sum()),
        "near_duplicate_groups": int((sizes["distinct"] > 1).sum()),
        **{k: v for k, v in sources.items() if k.startswith("groups_from_")},
        "files_without_identity": sources["files_without_identity"],
        "series": series_count,
    }
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


def _grey(path: Path) -> np.ndarray:
    """The ingested file as grey (a file that no longer decodes: a flat slice, which links to
    nothing)."""
    try:
        return decode(path.read_bytes()).grey
    except (OSError, ImageError):
        return np.zeros((32, 32), np.uint8)


def main() -> None:
    with stage_session("split") as session:
        s = session.settings
        ingest = read_pointer(s.paths, "ingest")
        manifest = read_manifest(ingest.output_path("manifest", s.paths.root), INGEST_COLUMNS)
        thumbs = None
        if s.params.split.series_similarity != -1:
            thumbs = thumbnails(_grey(s.paths.root / p) for p in manifest["path"])
        parts, summary = run_split(manifest, s.params.split, s.params.base.seed, thumbs)
        outputs: dict[str, Path] = {}
        for split, part in parts.items():
            outputs[split] = session.out_dir / f"{split}.csv"
            write_manifest(outputs[split], part)
        outputs["dropped"] = session.out_dir / "dropped.csv"
        write_manifest(
            outputs["dropped"], pd.DataFrame(summary.dropped, columns=list(DROPPED_COLUMNS))
        )
        log.info("split (%s): %s", summary.mode, summary.counts)
        log.info(
            "split groups: %d from %d files; ids from the group column %d, DICOM PatientID %d, "
            "DICOM StudyInstanceUID %d; copy groups %d exact, %d near",
            summary.groups["groups"],
            summary.groups["files"],
            summary.groups["groups_from_group"],
            summary.groups["groups_from_patient"],
            summary.groups["groups_from_study"],
            summary.groups["exact_copy_groups"],
            summary.groups["near_duplicate_groups"],
        )
        if summary.cross_split:
            log.warning(
                "%d group(s) of copies span two splits in the source (%s): %s",
                len(summary.cross_split),
                "dropped from the later split"
                if s.params.split.dedupe == "drop"
                else "reported; validate checks them, split.dedupe: drop removes them",
                "; ".join(f"{g['files'][0]} ~ {g['files'][-1]}" for g in summary.cross_split[:3]),
            )
        if summary.dropped:
            by_split = pd.Series([d["split"] for d in summary.dropped]).value_counts()
            log.info(
                "split.dedupe: drop removed %d redundant copies (%s; dropped.csv says why)",
                len(summary.dropped),
                ", ".join(f"{k} {v}" for k, v in by_split.sort_index().items()),
            )
        if summary.cross_split_identities:
            log.warning(
                "%d patient/study/group id(s) span two splits in the source (reported; "
                "validate warns): %s",
                len(summary.cross_split_identities),
                "; ".join(
                    f"{g['kind']} {g['key']} in {'+'.join(g['splits'])}"
                    for g in summary.cross_split_identities[:3]
                ),
            )
        session.finish(
            inputs=["ingest"],
            outputs=outputs,
            metrics={
                "counts": summary.counts,
                **{f"{k}_files": len(v) for k, v in parts.items()},
                "cross_split_groups": len(summary.cross_split),
                "cross_split_identities": len(summary.cross_split_identities),
                "dropped": len(summary.dropped),
                **summary.groups,
            },
            details={
                "mode": summary.mode,
                "carved": summary.carved,
                "cross_split": summary.cross_split,
                # A patient has hundreds of slices: the pointer names a few of each.
                "cross_split_identities": [
                    {**g, "files": g["files"][:_LISTED], "file_count": len(g["files"])}
                    for g in summary.cross_split_identities
                ],
            },
        )


if __name__ == "__main__":
    run_main("split", main)
