"""validate: check the split dataset before any model sees it, and hand on clean manifests.

Checks (severity): undecodable files (error), exact duplicates within a split (warning), the
same content in two splits (error: leakage), one content filed under two classes (error: label
conflict), classes with fewer than `validate.min_class_count` images in a split (error).
`validate.fail_on` decides which severity stops the pipeline.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from chestct.fsutil import atomic_write_json, atomic_write_text
from chestct.labels import CLASSES
from chestct.manifest import (
    DATASET_COLUMNS,
    INDEX_COLUMNS,
    INGEST_COLUMNS,
    SPLITS,
    read_manifest,
    write_manifest,
)
from chestct.pointers import read_pointer
from chestct.runner import StageFailed, run_main, stage_session
from chestct.settings import ValidateParams

log = logging.getLogger(__name__)

SEVERITY_RANK = {"info": 0, "warning": 1, "error": 2}


@dataclass
class Finding:
    check: str
    severity: str  # info | warning | error
    message: str
    files: list[str] = field(default_factory=list)


@dataclass
class Report:
    findings: list[Finding]
    counts: dict[str, dict[str, int]]

    @property
    def worst(self) -> str:
        ranks = [SEVERITY_RANK[f.severity] for f in self.findings]
        return {v: k for k, v in SEVERITY_RANK.items()}[max(ranks, default=0)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.worst,
            "counts": self.counts,
            "findings": [asdict(f) for f in self.findings],
        }

    def to_markdown(self) -> str:
        lines = ["# chestct data validation report", "", f"Status: **{self.worst}**", ""]
        lines += ["| split | " + " | ".join(CLASSES) + " |", "|---" * (len(CLASSES) + 1) + "|"]
        for split, by_class in self.counts.items():
            lines.append(
                f"| {split} | " + " | ".join(str(by_class.get(c, 0)) for c in CLASSES) + " |"
            )
        lines += ["", "## Findings", ""]
        if not self.findings:
            lines.append("No problem found.")
        for f in self.findings:
            lines.append(f"- **{f.severity}** `{f.check}`: {f.message}")
            for path in f.files[:20]:
                lines.append(f"  - `{path}`")
            if len(f.files) > 20:
                lines.append(f"  - … and {len(f.files) - 20} more (see report.json)")
        return "\n".join(lines) + "\n"


def run_validate(
    manifests: dict[str, pd.DataFrame], index: pd.DataFrame, params: ValidateParams
) -> tuple[dict[str, pd.DataFrame], Report]:
    """Run the checks; returns per-split datasets (decodable files only) and the report."""
    findings: list[Finding] = []
    frame = pd.concat([m.assign(split=s) for s, m in manifests.items()], ignore_index=True).merge(
        index, on="sha256", how="left", validate="many_to_one"
    )

    bad = frame[~frame["ok"].astype(bool)]
    if len(bad):
        findings.append(
            Finding(
                "undecodable",
                "error",
                f"{len(bad)} file(s) could not be decoded; they are left out",
                [f"{p}: {e}" for p, e in zip(bad["source_path"], bad["error"], strict=True)],
            )
        )

    for split, part in frame.groupby("split"):
        dup = part[part.duplicated("sha256", keep=False)]
        if len(dup):
            n_extra = len(dup) - dup["sha256"].nunique()
            findings.append(
                Finding(
                    "duplicate_within_split",
                    "warning",
                    f"{split}: {n_extra} redundant cop(ies) in {dup['sha256'].nunique()} group(s)",
                    sorted(dup["source_path"]),
                )
            )

    splits_per_hash = frame.groupby("sha256")["split"].nunique()
    leaked = frame[frame["sha256"].isin(splits_per_hash[splits_per_hash > 1].index)]
    if len(leaked):
        findings.append(
            Finding(
                "cross_split_duplicate",
                "error",
                f"{leaked['sha256'].nunique()} content(s) appear in more than one split (leakage)",
                sorted(
                    f"{s}: {p}"
                    for s, p in zip(leaked["split"], leaked["source_path"], strict=True)
                ),
            )
        )

    labels_per_hash = frame.groupby("sha256")["label"].nunique()
    conflict = frame[frame["sha256"].isin(labels_per_hash[labels_per_hash > 1].index)]
    if len(conflict):
        findings.append(
            Finding(
                "label_conflict",
                "error",
                f"{conflict['sha256'].nunique()} content(s) are filed under more than one class",
                sorted(
                    f"{lbl}: {p}"
                    for lbl, p in zip(conflict["label"], conflict["source_path"], strict=True)
                ),
            )
        )

    good = frame[frame["ok"].astype(bool)]
    counts = {
        s: {c: int((good[good["split"] == s]["label"] == c).sum()) for c in CLASSES}
        for s in SPLITS
    }
    for split, by_class in counts.items():
        low = [c for c, n in by_class.items() if n < params.min_class_count]
        if low:
            findings.append(
                Finding(
                    "class_count",
                    "error",
                    f"{split}: class(es) {', '.join(low)} have fewer than "
                    f"{params.min_class_count} images",
                )
            )

    datasets = {
        s: good[good["split"] == s]
        .rename(columns={"path": "original", "resized": "path"})[list(DATASET_COLUMNS)]
        .reset_index(drop=True)
        for s in SPLITS
    }
    return datasets, Report(findings=findings, counts=counts)


def fails(report: Report, fail_on: str) -> bool:
    if fail_on == "never":
        return False
    return SEVERITY_RANK[report.worst] >= SEVERITY_RANK[fail_on]


def main() -> None:
    with stage_session("validate") as session:
        s = session.settings
        split = read_pointer(s.paths, "split")
        resize = read_pointer(s.paths, "resize")
        manifests = {
            n: read_manifest(split.output_path(n, s.paths.root), INGEST_COLUMNS) for n in SPLITS
        }
        index = read_manifest(resize.output_path("index", s.paths.root), INDEX_COLUMNS)
        datasets, report = run_validate(manifests, index, s.params.validate)
        out = session.out_dir
        atomic_write_json(out / "report.json", report.to_dict())
        atomic_write_text(out / "report.md", report.to_markdown())
        session.log_artifact(out / "report.md")
        for f in report.findings:
            log.log(
                logging.ERROR if f.severity == "error" else logging.WARNING,
                "%s %s: %s",
                f.severity,
                f.check,
                f.message,
            )
        if fails(report, s.params.validate.fail_on):
            worst = [f for f in report.findings if f.severity == report.worst]
            named = "; ".join(
                f"{f.check}: {f.message} (e.g. {', '.join(f.files[:3])})" for f in worst
            )
            raise StageFailed(
                f"data validation found {report.worst}s: {named}. See {out / 'report.md'}; "
                "fix the data or set validate.fail_on in params.yaml"
            )
        outputs: dict[str, Path] = {"report": out / "report.json"}
        for name, frame in datasets.items():
            outputs[name] = out / f"{name}.csv"
            write_manifest(outputs[name], frame)
        session.finish(
            inputs=["split", "resize"],
            outputs=outputs,
            metrics={
                "status": report.worst,
                "findings": len(report.findings),
                **{f"{n}_images": len(d) for n, d in datasets.items()},
            },
            details={"checks": sorted({f.check for f in report.findings})},
        )


if __name__ == "__main__":
    run_main("validate", main)
