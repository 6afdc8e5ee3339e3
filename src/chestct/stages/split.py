"""split: train/valid/test manifests, with identical files never on two sides.

If the source brought all three splits they are kept as they are (leakage between them is
reported by validate). Otherwise every file is pooled and re-split: stratified by class, seeded,
and grouped by content hash so that copies of one image land in one split.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from chestct.manifest import INGEST_COLUMNS, SPLITS, read_manifest, write_manifest
from chestct.pointers import read_pointer
from chestct.runner import StageFailed, run_main, stage_session
from chestct.settings import SplitParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SplitSummary:
    mode: str  # keep | pool
    counts: dict[str, dict[str, int]]


def _pool_split(frame: pd.DataFrame, params: SplitParams, seed: int) -> pd.Series:
    """Assign each content group to a split, per class, by image counts."""
    rng = np.random.default_rng(seed)
    # A group's class is its most common label; a group with two labels is a conflict that
    # validate reports, but the group still moves as one.
    groups = frame.groupby("sha256")["label"].agg(lambda s: s.value_counts().index[0])
    sizes = frame.groupby("sha256").size()
    assignment: dict[str, str] = {}
    for label in sorted(groups.unique()):
        members = np.array(sorted(groups[groups == label].index))
        rng.shuffle(members)
        total = int(sizes[members].sum())
        want = {
            "test": round(total * params.test_fraction),
            "valid": round(total * params.valid_fraction),
        }
        taken = {"test": 0, "valid": 0}
        for sha in members:
            target = "train"
            for split in ("test", "valid"):
                if taken[split] < max(want[split], 1):
                    target = split
                    break
            if target != "train":
                taken[target] += int(sizes[sha])
            assignment[sha] = target
    return frame["sha256"].map(assignment)


def run_split(
    ingest_manifest: pd.DataFrame, params: SplitParams, seed: int
) -> tuple[dict[str, pd.DataFrame], SplitSummary]:
    """Split the ingest manifest; returns one frame per split and a summary."""
    present = set(ingest_manifest["split"].unique()) & set(SPLITS)
    frame = ingest_manifest.copy()
    if present == set(SPLITS):
        mode = "keep"
    else:
        mode = "pool"
        if present:
            log.info("source has only %s; pooling and re-splitting", sorted(present))
        frame["split"] = _pool_split(frame, params, seed)
    out = {s: frame[frame["split"] == s].reset_index(drop=True) for s in SPLITS}
    for split, part in out.items():
        if part.empty:
            raise StageFailed(
                f"split {split!r} is empty: the source has too few images "
                f"({len(frame)}) for split.valid_fraction/test_fraction"
            )
    counts = {
        s: {k: int(v) for k, v in p["label"].value_counts().sort_index().items()}
        for s, p in out.items()
    }
    return out, SplitSummary(mode=mode, counts=counts)


def main() -> None:
    with stage_session("split") as session:
        s = session.settings
        ingest = read_pointer(s.paths, "ingest")
        manifest = read_manifest(ingest.output_path("manifest", s.paths.root), INGEST_COLUMNS)
        parts, summary = run_split(manifest, s.params.split, s.params.base.seed)
        outputs: dict[str, Path] = {}
        for split, part in parts.items():
            outputs[split] = session.out_dir / f"{split}.csv"
            write_manifest(outputs[split], part)
        log.info("split (%s): %s", summary.mode, summary.counts)
        session.finish(
            inputs=["ingest"],
            outputs=outputs,
            metrics={"counts": summary.counts, **{f"{k}_files": len(v) for k, v in parts.items()}},
            details={"mode": summary.mode},
        )


if __name__ == "__main__":
    run_main("split", main)
