"""What validate reports: findings, the report with its JSON and Markdown, and quarantine.

A `Finding` is one check that fired, with the files it names; the `Report` holds the findings,
the counts per split and class, the checks' table and the shortcut detector's result, and
writes report.json (`to_dict`) and report.md (`to_markdown`). `quarantine` says which files a
warning or error leaves out; `fails` whether the report stops the stage (`validate.fail_on`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from chestct.data.shortcuts import PIXEL_FEATURES
from chestct.labels import CLASSES

SEVERITY_RANK = {"info": 0, "warning": 1, "error": 2}

QUARANTINE_COLUMNS: tuple[str, ...] = ("split", "label", "source_path", "sha256", "checks")
_MAX_LISTED = 20


def _fields(obj: Any, names: str) -> dict[str, Any]:
    return {name: getattr(obj, name) for name in names.split()}


@dataclass
class Finding:
    check: str
    severity: str  # info | warning | error
    message: str
    files: list[str] = field(default_factory=list)
    quarantined: int = 0
    resolved: bool = False  # every file it names was quarantined
    picture: str = ""  # example montage, relative to the report
    # Not in the report: frame rows that offend (quarantine candidates) and example groups
    # of (resized path, caption) for pictures.
    rows: list[Any] = field(default_factory=list, repr=False)
    examples: list[list[tuple[str, str]]] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """What report.json holds of a finding (not the rows and example groups)."""
        return _fields(self, "check severity message files quarantined resolved picture")


@dataclass
class Report:
    findings: list[Finding]
    counts: dict[str, dict[str, int]]
    checks: dict[str, dict[str, str]] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    quarantined: list[dict[str, str]] = field(default_factory=list)
    shortcut: dict[str, Any] | None = None
    pictures: dict[str, str] = field(default_factory=dict)
    metadata: pd.DataFrame | None = field(default=None, repr=False)  # for the shortcut plot
    # Nearest-train similarities per split (chestct.data.content_checks), for novelty.csv/png.
    novelty_values: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def worst(self) -> str:
        """The highest severity among findings that quarantine did not resolve."""
        ranks = [SEVERITY_RANK[f.severity] for f in self.findings if not f.resolved]
        return {v: k for k, v in SEVERITY_RANK.items()}[max(ranks, default=0)]

    def to_dict(self) -> dict[str, Any]:
        """report.json: the status, then the report's fields (not the metadata frame)."""
        return {
            "status": self.worst,
            **_fields(self, "counts summary checks"),
            "findings": [f.to_dict() for f in self.findings],
            **_fields(self, "quarantined shortcut pictures"),
        }

    def to_markdown(self) -> str:
        """report.md: status, counts, the checks' table, the findings, near-copies of train,
        the shortcut detector and what quarantine left out."""
        lines = ["# chestct data validation report", "", f"Status: **{self.worst}**", ""]
        if self.summary:
            lines += [
                ", ".join(
                    f"{k.replace('_', ' ')}: {v}"
                    for k, v in self.summary.items()
                    if k != "novelty"
                ),
                "",
            ]
        lines += ["| split | " + " | ".join(CLASSES) + " |", "|---" * (len(CLASSES) + 1) + "|"]
        for split, by_class in self.counts.items():
            lines.append(
                f"| {split} | " + " | ".join(str(by_class.get(c, 0)) for c in CLASSES) + " |"
            )
        if self.checks:
            lines += ["", "## Checks", "", "| check | severity | result |", "|---|---|---|"]
            for name, info in self.checks.items():
                lines.append(f"| `{name}` | {info['severity']} | {info['result']} |")
        lines += ["", "## Findings", ""]
        if not self.findings:
            lines.append("No problem found.")
        for f in self.findings:
            lines += _finding_lines(f)
        novelty = self.summary.get("novelty") if self.summary else None
        if novelty:
            lines += _novelty_lines(novelty, self.pictures)
        if self.shortcut:
            lines += _shortcut_lines(self.shortcut, self.pictures)
        if self.quarantined:
            lines += [
                "",
                "## Quarantined",
                "",
                f"{len(self.quarantined)} file(s), see "
                "`quarantine.csv`; the source files are untouched.",
            ]
        return "\n".join(lines) + "\n"


def _finding_lines(f: Finding) -> list[str]:
    """One finding: severity, check and message, the files it names and its picture."""
    note = ""
    if f.quarantined:
        note = f" ({f.quarantined} file(s) quarantined{'; resolved' if f.resolved else ''})"
    lines = [f"- **{f.severity}** `{f.check}`: {f.message}{note}"]
    for path in f.files[:_MAX_LISTED]:
        lines.append(f"  - `{path}`")
    if len(f.files) > _MAX_LISTED:
        lines.append(f"  - … and {len(f.files) - _MAX_LISTED} more (see report.json)")
    if f.picture:
        lines += ["", f"  ![{f.check}]({f.picture})", ""]
    return lines


def _novelty_lines(novelty: dict[str, Any], pictures: dict[str, str]) -> list[str]:
    """How close each split's slices come to train (chestct.data.content_checks)."""
    lines = [
        "",
        "## Near-copies of train",
        "",
        "Thumbnail correlation of each slice with its nearest train slice "
        "(train: without itself).",
        "",
        "| set | images | near-copy share | q05 | q25 | median | q75 | q95 |",
        "|---|---|---|---|---|---|---|---|",
        *(
            f"| {k} | {v['images']} | {v['near_copy_share']:.2f} | "
            + " | ".join(str(v.get(q, "")) for q in ("q05", "q25", "q50", "q75", "q95"))
            + " |"
            for k, v in novelty.items()
        ),
    ]
    return lines + _pictures(pictures, "novelty")


def _shortcut_lines(s: dict[str, Any], pictures: dict[str, str]) -> list[str]:
    """What the shortcut detector scored, in all and per family and feature."""
    lines = [
        "",
        "## Shortcut detector",
        "",
        f"Balanced accuracy of a random forest on file metadata and acquisition cues "
        f"({s['folds']}-fold, grouped by copies and patients, {s['images']} images): "
        f"**{s['score']:.2f}** (chance {s['chance']:.2f}).",
        "",
    ]
    if s.get("pixels") is not None:
        lines += [
            f"The pixels' acquisition cues alone ({', '.join(PIXEL_FEATURES)}): "
            f"**{s['pixels']:.2f}**.",
            "",
        ]
    if s["by_family"]:
        lines += [
            "",
            "| features alone | balanced accuracy |",
            "|---|---|",
            *(f"| {k} | {v:.2f} |" for k, v in s["by_family"].items()),
        ]
    if s.get("by_feature"):
        lines += [
            "",
            "| one feature alone | balanced accuracy |",
            "|---|---|",
            *(f"| `{k}` | {v:.2f} |" for k, v in s["by_feature"].items()),
        ]
    return lines + _pictures(pictures, "shortcut", "acquisition")


def _pictures(pictures: dict[str, str], *names: str) -> list[str]:
    """The named pictures the report has, each after a blank line."""
    lines: list[str] = []
    for name in names:
        if name in pictures:
            lines += ["", f"![{name}]({pictures[name]})"]
    return lines


def fails(report: Report, fail_on: str) -> bool:
    """True when the report's worst unresolved severity reaches `fail_on` (never: False)."""
    if fail_on == "never":
        return False
    return SEVERITY_RANK[report.worst] >= SEVERITY_RANK[fail_on]


def quarantine(findings: list[Finding]) -> dict[Any, list[str]]:
    """Frame row -> the checks that leave it out (`validate.quarantine: true`).

    Only warnings and errors quarantine; a finding whose files all leave is marked resolved, so
    that it no longer counts towards `validate.fail_on`.
    """
    rows: dict[Any, list[str]] = {}
    for finding in findings:
        if SEVERITY_RANK[finding.severity] < SEVERITY_RANK["warning"]:
            continue
        if finding.rows or finding.check == "undecodable":
            for row in finding.rows:
                rows.setdefault(row, []).append(finding.check)
            finding.quarantined = len(
                finding.files if finding.check == "undecodable" else set(finding.rows)
            )
            finding.resolved = True
    return rows
