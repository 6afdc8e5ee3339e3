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
from pathlib import Path

import pandas as pd

from chestct.data.manifest import INGEST_COLUMNS, read_manifest, write_manifest
from chestct.data.similarity import thumbnails
from chestct.data.splitting import SplitError, SplitSummary, grey_of, split_manifest
from chestct.pointers import read_pointer
from chestct.runner import run_main, stage_session, stops_stage

log = logging.getLogger(__name__)

_LISTED = 10  # files named per identity in the pointer
DROPPED_COLUMNS: tuple[str, ...] = ("split", "label", "source_path", "sha256", "kept_in", "reason")


# The stage's work: chestct.data.splitting.split_manifest, a SplitError stopping the stage.
run_split = stops_stage(SplitError)(split_manifest)


def main() -> None:
    with stage_session("split") as session:
        s = session.settings
        ingest = read_pointer(s.paths, "ingest")
        manifest = read_manifest(ingest.output_path("manifest", s.paths.root), INGEST_COLUMNS)
        thumbs = None
        if s.params.split.series_similarity != -1:
            thumbs = thumbnails(grey_of(s.paths.root / p) for p in manifest["path"])
        parts, summary = run_split(manifest, s.params.split, s.params.base.seed, thumbs)
        outputs: dict[str, Path] = {}
        for split, part in parts.items():
            outputs[split] = session.out_dir / f"{split}.csv"
            write_manifest(outputs[split], part)
        outputs["dropped"] = session.out_dir / "dropped.csv"
        write_manifest(
            outputs["dropped"], pd.DataFrame(summary.dropped, columns=list(DROPPED_COLUMNS))
        )
        _log_summary(summary, s.params.split.dedupe)
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


def _log_summary(summary: SplitSummary, dedupe: str) -> None:
    """What the split did, and what it found spread over two splits, for the stage log."""
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
            if dedupe == "drop"
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


if __name__ == "__main__":
    run_main("split", main)
