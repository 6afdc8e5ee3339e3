"""validate: check the split dataset before any model sees it, and hand on clean manifests.

Every check has a default severity (`CHECKS`; `validate.severities` overrides it):

- per file: undecodable (error), small_file, dimensions, near_blank, unexpected_mode (warning),
  format_mismatch (info: e.g. JPEG data under a .png name);
- copies: duplicate_within_split (warning), near_duplicate (info), label_conflict (error),
  near_label_conflict (warning), cross_split_duplicate (error: leakage),
  cross_split_near_duplicate (warning), cross_split_identity (warning: one patient, study or
  user group in two splits; chestct.grouping);
- the dataset: class_count (error), class_imbalance (warning), shortcut (warning): a model
  on file metadata and acquisition cues that predicts the class well above chance, and
  acquisition_shortcut (warning): the pixels' acquisition cues alone (how much of the frame the
  body fills, its aspect, background and body grey levels; chestct.acquisition, measured at
  ingest) predict it. The report names the features that give the class away on their own.

`validate.quarantine: true` leaves the files that a warning or error names out of the
downstream manifests (the source is never touched; `quarantine.csv` lists them and why); a
finding whose files are all quarantined no longer counts towards `validate.fail_on`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd

from chestct.dedup import group_files
from chestct.fsutil import atomic_write_json, atomic_write_text, staged_file
from chestct.grouping import identity_keys, identity_leaks, split_groups
from chestct.labels import CLASSES
from chestct.manifest import (
    ACQUISITION_COLUMNS,
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
from chestct.shortcuts import PIXEL_FEATURES, ShortcutResult, detect_shortcut

log = logging.getLogger(__name__)

SEVERITY_RANK = {"info": 0, "warning": 1, "error": 2}

# check -> (default severity, what it looks for)
CHECKS: dict[str, tuple[str, str]] = {
    "undecodable": ("error", "files that cannot be decoded (at ingest or at resize)"),
    "small_file": ("warning", "files smaller than validate.min_file_bytes"),
    "dimensions": ("warning", "width or height outside validate.min_side..max_side"),
    "near_blank": ("warning", "resized slices with grey-level std below validate.min_std"),
    "unexpected_mode": ("warning", "colour modes not in validate.allowed_modes"),
    "format_mismatch": ("info", "names whose extension disagrees with the content"),
    "duplicate_within_split": ("warning", "identical files within one split"),
    "near_duplicate": ("info", "near-identical files within one split (perceptual hash)"),
    "label_conflict": ("error", "one content filed under two classes"),
    "near_label_conflict": ("warning", "near-identical files filed under two classes"),
    "cross_split_duplicate": ("error", "identical files in two splits (leakage)"),
    "cross_split_near_duplicate": ("warning", "near-identical files in two splits (leakage)"),
    "cross_split_identity": (
        "warning",
        "slices of one patient, study or group-column id in two splits (leakage)",
    ),
    "class_count": ("error", "classes with fewer than validate.min_class_count images"),
    "class_imbalance": ("warning", "largest / smallest class above validate.max_imbalance"),
    "shortcut": (
        "warning",
        "file metadata and acquisition cues predict the class (cross-validated)",
    ),
    "acquisition_shortcut": (
        "warning",
        "body framing and grey levels in the pixels alone predict the class (cross-validated)",
    ),
}
QUARANTINE_COLUMNS: tuple[str, ...] = ("split", "label", "source_path", "sha256", "checks")
_EXTENSIONS = {
    ".png": "png",
    ".jpg": "jpeg",
    ".jpeg": "jpeg",
    ".bmp": "bmp",
    ".tif": "tiff",
    ".tiff": "tiff",
    ".dcm": "dicom",
}
_MAX_LISTED = 20


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
        return {
            "check": self.check,
            "severity": self.severity,
            "message": self.message,
            "files": self.files,
            "quarantined": self.quarantined,
            "resolved": self.resolved,
            "picture": self.picture,
        }


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

    @property
    def worst(self) -> str:
        """The highest severity among findings that quarantine did not resolve."""
        ranks = [SEVERITY_RANK[f.severity] for f in self.findings if not f.resolved]
        return {v: k for k, v in SEVERITY_RANK.items()}[max(ranks, default=0)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.worst,
            "counts": self.counts,
            "summary": self.summary,
            "checks": self.checks,
            "findings": [f.to_dict() for f in self.findings],
            "quarantined": self.quarantined,
            "shortcut": self.shortcut,
            "pictures": self.pictures,
        }

    def to_markdown(self) -> str:
        lines = ["# chestct data validation report", "", f"Status: **{self.worst}**", ""]
        if self.summary:
            lines += [
                ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in self.summary.items()),
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
            note = ""
            if f.quarantined:
                note = (
                    f" ({f.quarantined} file(s) quarantined{'; resolved' if f.resolved else ''})"
                )
            lines.append(f"- **{f.severity}** `{f.check}`: {f.message}{note}")
            for path in f.files[:_MAX_LISTED]:
                lines.append(f"  - `{path}`")
            if len(f.files) > _MAX_LISTED:
                lines.append(f"  - … and {len(f.files) - _MAX_LISTED} more (see report.json)")
            if f.picture:
                lines += ["", f"  ![{f.check}]({f.picture})", ""]
        if self.shortcut:
            s = self.shortcut
            lines += [
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
            if "shortcut" in self.pictures:
                lines += ["", f"![shortcut]({self.pictures['shortcut']})"]
            if "acquisition" in self.pictures:
                lines += ["", f"![acquisition]({self.pictures['acquisition']})"]
        if self.quarantined:
            lines += [
                "",
                "## Quarantined",
                "",
                f"{len(self.quarantined)} file(s), see "
                "`quarantine.csv`; the source files are untouched.",
            ]
        return "\n".join(lines) + "\n"


def _severities(params: ValidateParams) -> dict[str, str]:
    unknown = sorted(set(params.severities) - set(CHECKS))
    if unknown:
        raise StageFailed(
            f"validate.severities: unknown check {unknown[0]!r}; checks are {', '.join(CHECKS)}"
        )
    return {name: params.severities.get(name, default) for name, (default, _) in CHECKS.items()}


def _name(path: str) -> str:
    """The file part of a source path (archive sources read `archive::inner/path`)."""
    return PurePosixPath(path.split("::")[-1].replace("\\", "/")).name


def _caption(row: Any) -> str:
    return f"{row.split}/{row.label}\n{_name(str(row.source_path))[:28]}"


def _examples(members: pd.DataFrame) -> list[tuple[str, str]]:
    return [(str(r.resized), _caption(r)) for r in members.itertuples() if r.resized]


class _Checker:
    """Runs the checks over one frame (all splits, one row per file, resize index merged)."""

    def __init__(self, frame: pd.DataFrame, params: ValidateParams) -> None:
        self.frame = frame
        self.params = params
        self.severity = _severities(params)
        self.findings: list[Finding] = []
        self.results: dict[str, str] = {}

    def add(self, check: str, message: str, files: list[str], rows: list[Any], **kw: Any) -> None:
        self.findings.append(Finding(check, self.severity[check], message, files, rows=rows, **kw))
        self.results[check] = "found"

    def per_file(self, check: str, mask: pd.Series, message: str, detail: Any) -> None:
        hits = self.frame[mask]
        if len(hits):
            files = [f"{r.source_path}: {detail(r)}" for r in hits.itertuples()]
            examples = [[(str(r.resized), _caption(r))] for r in hits.head(8).itertuples()]
            self.add(check, f"{len(hits)} {message}", files, list(hits.index), examples=examples)

    def file_checks(self, skipped: list[dict[str, str]]) -> None:
        f, p = self.frame, self.params
        ok = f["ok"].astype(bool)
        bad = f[~ok]
        if len(bad) or skipped:
            files = [f"{s['path']}: {s['reason']}" for s in skipped]
            files += [f"{p_}: {e}" for p_, e in zip(bad["source_path"], bad["error"], strict=True)]
            where = f" ({len(skipped)} skipped at ingest)" if skipped else ""
            self.add(
                "undecodable",
                f"{len(files)} file(s) could not be decoded; they are left out{where}",
                files,
                list(bad.index),
            )
        self.per_file(
            "small_file",
            ok & (f["bytes"].astype(int) < p.min_file_bytes),
            f"file(s) smaller than validate.min_file_bytes ({p.min_file_bytes} bytes)",
            lambda r: f"{r.bytes} bytes",
        )
        width, height = f["width"].astype(int), f["height"].astype(int)
        self.per_file(
            "dimensions",
            ok
            & ((width.clip(upper=height) < p.min_side) | (width.clip(lower=height) > p.max_side)),
            f"file(s) with a side outside {p.min_side}..{p.max_side} pixels",
            lambda r: f"{r.width}x{r.height}",
        )
        self.per_file(
            "near_blank",
            ok & (f["std"].astype(float) < p.min_std),
            f"near-blank slice(s) (grey-level std below validate.min_std = {p.min_std:g})",
            lambda r: f"std {float(r.std):.2f}",
        )
        self.per_file(
            "unexpected_mode",
            ok & ~f["mode"].astype(str).isin(p.allowed_modes),
            f"file(s) in a colour mode not in validate.allowed_modes "
            f"({', '.join(p.allowed_modes)})",
            lambda r: f"mode {r.mode}",
        )
        named = (
            f["source_path"]
            .astype(str)
            .map(lambda s: _EXTENSIONS.get(Path(_name(s)).suffix.lower()))
        )
        mismatch = ok & named.notna() & (named != f["format"].astype(str))
        if mismatch.any():
            hits = f[mismatch]
            kinds = sorted(
                {
                    f"{r.format} under .{Path(_name(str(r.source_path))).suffix[1:]}"
                    for r in hits.itertuples()
                }
            )
            self.add(
                "format_mismatch",
                f"{len(hits)} file(s) whose name says another format than their content "
                f"({', '.join(kinds)}); chestct decodes by content, other tools may not",
                [f"{r.source_path}: {r.format} data" for r in hits.itertuples()],
                [],
            )

    def copy_checks(self) -> None:
        f = self.frame[self.frame["ok"].astype(bool)]
        order = f["split"].map({s: i for i, s in enumerate(SPLITS)})
        f = f.assign(_order=order).sort_values(["_order", "source_path"], kind="stable")
        for split, part in f.groupby("split", sort=False):
            dup = part[part.duplicated("sha256", keep=False)]
            if len(dup):
                n_extra = len(dup) - dup["sha256"].nunique()
                groups = [g for _, g in dup.groupby("sha256", sort=False)]
                self.add(
                    "duplicate_within_split",
                    f"{split}: {n_extra} redundant cop(ies) in {dup['sha256'].nunique()} group(s)",
                    sorted(dup["source_path"]),
                    list(dup[dup.duplicated("sha256", keep="first")].index),
                    examples=[_examples(g.head(4)) for g in groups[:6]],
                )
            near = part.groupby("group").filter(lambda g: g["sha256"].nunique() > 1)
            if len(near):
                groups = [g for _, g in near.groupby("group", sort=False)]
                redundant = [i for g in groups for i in g.drop_duplicates("sha256").index[1:]]
                self.add(
                    "near_duplicate",
                    f"{split}: {len(redundant)} near-duplicate file(s) in {len(groups)} group(s) "
                    f"(perceptual hashes within {self.params.near_duplicate_distance} bits)",
                    [
                        f"group {k + 1}: {p}"
                        for k, g in enumerate(groups)
                        for p in g["source_path"]
                    ],
                    redundant,
                    examples=[_examples(g.drop_duplicates("sha256").head(4)) for g in groups[:6]],
                )

        labels_per_hash = f.groupby("sha256")["label"].nunique()
        conflict = f[f["sha256"].isin(labels_per_hash[labels_per_hash > 1].index)]
        if len(conflict):
            self.add(
                "label_conflict",
                f"{conflict['sha256'].nunique()} content(s) are filed under more than one class",
                sorted(
                    f"{lbl}: {p}"
                    for lbl, p in zip(conflict["label"], conflict["source_path"], strict=True)
                ),
                list(conflict.index),
                examples=[_examples(g.head(4)) for _, g in conflict.groupby("sha256")][:6],
            )
        near_conflict = f.groupby("group").filter(
            lambda g: g["label"].nunique() > 1 and g["sha256"].nunique() > 1
        )
        near_conflict = near_conflict[~near_conflict.index.isin(conflict.index)]
        if len(near_conflict):
            groups = [g for _, g in near_conflict.groupby("group")]
            self.add(
                "near_label_conflict",
                f"{len(groups)} group(s) of near-identical files are filed under more than one "
                "class",
                sorted(f"{r.label}: {r.source_path}" for r in near_conflict.itertuples()),
                list(near_conflict.index),
                examples=[_examples(g.head(4)) for g in groups[:6]],
            )

        splits_per_hash = f.groupby("sha256")["split"].nunique()
        leaked = f[f["sha256"].isin(splits_per_hash[splits_per_hash > 1].index)]
        first_split_of_hash = leaked.groupby("sha256")["_order"].transform("min")
        if len(leaked):
            copies = leaked[leaked["_order"] > first_split_of_hash]
            first_name = leaked.groupby("sha256")["_order"].min().map(dict(enumerate(SPLITS)))
            pairs = copies.assign(first=copies["sha256"].map(first_name))
            detail = ", ".join(
                f"{n} {later} file(s) identical to {first} files"
                for (later, first), n in pairs.groupby(["split", "first"], sort=False)
                .size()
                .items()
            )
            self.add(
                "cross_split_duplicate",
                f"{leaked['sha256'].nunique()} content(s) appear in more than one split "
                f"(leakage): {detail}",
                [
                    f"{r.split}: {r.source_path}"
                    for _, g in leaked.groupby("sha256")
                    for r in g.sort_values("_order", ascending=False).itertuples()
                ],
                list(copies.index),
                examples=[_examples(g.head(4)) for _, g in leaked.groupby("sha256")][:6],
            )
        spread = f.groupby("group")["split"].nunique()
        in_groups = f[f["group"].isin(spread[spread > 1].index)]
        first_split_of_group = in_groups.groupby("group")["_order"].transform("min")
        later = in_groups[in_groups["_order"] > first_split_of_group]
        near_leak = later[~later.index.isin(leaked.index)]
        if len(near_leak):
            groups = in_groups[in_groups["group"].isin(near_leak["group"])]
            self.add(
                "cross_split_near_duplicate",
                f"{len(near_leak)} file(s) in a later split are near-identical to a file in an "
                f"earlier split (leakage; perceptual hashes within "
                f"{self.params.near_duplicate_distance} bits)",
                sorted(f"{r.split}: {r.source_path}" for r in groups.itertuples()),
                list(near_leak.index),
                examples=[
                    _examples(g.drop_duplicates("sha256").head(4))
                    for _, g in groups.groupby("group")
                ][:6],
            )

    def identity_checks(self) -> None:
        f = self.frame[self.frame["ok"].astype(bool)]
        leaks = identity_leaks(f)
        if leaks:
            kinds = pd.Series([g["kind"] for g in leaks]).value_counts()
            # The slices in a later split than their id's first are the ones to quarantine.
            keys = identity_keys(f)[0]
            order = f["split"].map({s: i for i, s in enumerate(SPLITS)})
            leaked = keys.isin({f"{g['kind']}:{g['key']}" for g in leaks})
            rows = list(f.index[leaked & (order > order.groupby(keys).transform("min"))])
            self.add(
                "cross_split_identity",
                f"{len(leaks)} id(s) have slices in more than one split ("
                + ", ".join(f"{n} {kind}" for kind, n in kinds.items())
                + "): a model is then scored on patients it trained on. Use split.mode: pool "
                "(groups move together) or fix the source's splits",
                [f"{g['kind']} {g['key']}: {path}" for g in leaks for path in g["files"]],
                rows,
            )

    def dataset_checks(self, good: pd.DataFrame, seed: int) -> tuple[dict, ShortcutResult | None]:
        p = self.params
        counts = {
            s: {c: int((good[good["split"] == s]["label"] == c).sum()) for c in CLASSES}
            for s in SPLITS
        }
        for split, by_class in counts.items():
            low = [c for c, n in by_class.items() if n < p.min_class_count]
            if low:
                self.add(
                    "class_count",
                    f"{split}: class(es) {', '.join(low)} have fewer than "
                    f"{p.min_class_count} images",
                    [],
                    [],
                )
            present = {c: n for c, n in by_class.items() if n > 0}
            if len(present) > 1:
                big = max(present, key=present.__getitem__)
                small = min(present, key=present.__getitem__)
                ratio = present[big] / present[small]
                if ratio > p.max_imbalance:
                    self.add(
                        "class_imbalance",
                        f"{split}: the largest class ({big}, {present[big]}) is {ratio:.1f}x the "
                        f"smallest ({small}, {present[small]}); above validate.max_imbalance = "
                        f"{p.max_imbalance:g}",
                        [],
                        [],
                    )
        shortcut = None
        if len(good) < p.shortcut_min_images:
            self.results["shortcut"] = (
                f"skipped: {len(good)} images, fewer than validate.shortcut_min_images"
            )
        else:
            # Folds keep copies and slices of one patient/study/group on one side.
            cohorts = split_groups(good, p.near_duplicate_distance)[0]
            shortcut = detect_shortcut(
                good, cohorts, seed, family_margin=min(p.shortcut_margin, 0.1)
            )
            if shortcut is None:
                self.results["shortcut"] = "skipped: too few images per class for two folds"
            elif shortcut.leaks(p.shortcut_margin):
                leak = shortcut.strongest()
                self.add(
                    "shortcut",
                    f"file metadata and acquisition cues predict the class: balanced accuracy "
                    f"{shortcut.score:.2f} against chance {shortcut.chance:.2f} "
                    f"({shortcut.folds}-fold); strongest alone: {leak} "
                    f"({shortcut.by_family[leak]:.2f}); features alone: "
                    f"{shortcut.top_features(3)}. A model can learn this instead of the "
                    "anatomy: compare models only on resized images, prefer resize.mode "
                    "stretch or crop (pad bands show the aspect ratio), and build test sets "
                    "without this bias",
                    [],
                    [],
                )
            else:
                self.results["shortcut"] = (
                    f"passed: balanced accuracy {shortcut.score:.2f} "
                    f"(chance {shortcut.chance:.2f})"
                )
            self.acquisition_check(shortcut)
        if "acquisition_shortcut" not in self.results and shortcut is None:
            self.results["acquisition_shortcut"] = self.results["shortcut"]
        return counts, shortcut

    def acquisition_check(self, shortcut: ShortcutResult | None) -> None:
        """The pixel cues alone (chestct.acquisition) against validate.shortcut_margin."""
        margin = self.params.shortcut_margin
        if shortcut is None:
            return
        if shortcut.pixels is None:
            self.results["acquisition_shortcut"] = (
                "skipped: no acquisition features (rerun ingest to measure them)"
            )
        elif shortcut.pixels_leak(margin):
            self.add(
                "acquisition_shortcut",
                f"how the slices were acquired predicts the class: the pixels' framing and grey "
                f"levels alone reach a balanced accuracy of {shortcut.pixels:.2f} against chance "
                f"{shortcut.chance:.2f} ({shortcut.folds}-fold); on their own: "
                f"{shortcut.top_features(3, PIXEL_FEATURES)}. A model can learn the scanner or "
                "the export instead of the anatomy: crop to the body and normalise grey levels "
                "before resizing, and test on data acquired elsewhere",
                [],
                [],
            )
        else:
            self.results["acquisition_shortcut"] = (
                f"passed: balanced accuracy {shortcut.pixels:.2f} (chance {shortcut.chance:.2f})"
            )


def run_validate(
    manifests: dict[str, pd.DataFrame],
    index: pd.DataFrame,
    params: ValidateParams,
    *,
    seed: int = 0,
    skipped: list[dict[str, str]] | None = None,
    acquisition: pd.DataFrame | None = None,
) -> tuple[dict[str, pd.DataFrame], Report]:
    """Run the checks; returns per-split datasets (decodable, not quarantined) and the report.

    Args:
        manifests: split -> ingest-manifest rows of that split.
        index: the resize index (one row per distinct content).
        params: validate params.
        seed: for the shortcut detector's folds.
        skipped: files ingest could not decode ({path, reason}), reported as undecodable.
        acquisition: ingest's acquisition features (ACQUISITION_COLUMNS, by sha256); without
            them the acquisition_shortcut check is skipped.
    """
    frame = pd.concat([m.assign(split=s) for s, m in manifests.items()], ignore_index=True).merge(
        index, on="sha256", how="left", validate="many_to_one"
    )
    if acquisition is not None:
        pixels = acquisition[["sha256", "frame_mean", *PIXEL_FEATURES]].drop_duplicates("sha256")
        frame = frame.merge(pixels, on="sha256", how="left", validate="many_to_one")
    frame["ok"] = frame["ok"].fillna(False).astype(bool)
    frame["resized"] = frame["resized"].fillna("").astype(str)
    frame["group"] = group_files(frame, params.near_duplicate_distance)
    checker = _Checker(frame, params)
    checker.file_checks(skipped or [])
    checker.copy_checks()
    checker.identity_checks()

    quarantine: dict[Any, list[str]] = {}
    if params.quarantine:
        for finding in checker.findings:
            if SEVERITY_RANK[finding.severity] < SEVERITY_RANK["warning"]:
                continue
            if finding.rows or finding.check == "undecodable":
                for row in finding.rows:
                    quarantine.setdefault(row, []).append(finding.check)
                finding.quarantined = len(
                    finding.files if finding.check == "undecodable" else set(finding.rows)
                )
                finding.resolved = True
    good = frame[frame["ok"] & ~frame.index.isin(list(quarantine))]
    counts, shortcut = checker.dataset_checks(good, seed)

    checks = {
        name: {
            "severity": checker.severity[name],
            "result": checker.results.get(name, "passed"),
            "looks_for": description,
        }
        for name, (_, description) in CHECKS.items()
    }
    if params.near_duplicate_distance < 0:
        for name in ("near_duplicate", "near_label_conflict", "cross_split_near_duplicate"):
            checks[name]["result"] = "off: validate.near_duplicate_distance is -1"
    decodable = frame[frame["ok"]]
    summary = {
        "files": len(frame) + len(skipped or []),
        "decodable": len(decodable),
        "distinct_contents": int(decodable["sha256"].nunique()),
        "exact_redundant_copies": int(len(decodable) - decodable["sha256"].nunique()),
        "exact_copy_groups": int((decodable.groupby("sha256").size() > 1).sum()),
        "quarantined": len(quarantine),
        "handed_on": len(good),
    }
    quarantined = [
        {
            "split": str(frame.at[i, "split"]),
            "label": str(frame.at[i, "label"]),
            "source_path": str(frame.at[i, "source_path"]),
            "sha256": str(frame.at[i, "sha256"]),
            "checks": ",".join(sorted(set(c))),
        }
        for i, c in sorted(quarantine.items())
    ]
    datasets = {
        s: good[good["split"] == s]
        .rename(columns={"path": "original", "resized": "path"})[list(DATASET_COLUMNS)]
        .reset_index(drop=True)
        for s in SPLITS
    }
    report = Report(
        findings=checker.findings,
        counts=counts,
        checks=checks,
        summary=summary,
        quarantined=quarantined,
        shortcut=None
        if shortcut is None
        else {
            "score": shortcut.score,
            "chance": shortcut.chance,
            "folds": shortcut.folds,
            "images": shortcut.images,
            "by_family": shortcut.by_family,
            "pixels": shortcut.pixels,
            "by_feature": shortcut.by_feature,
        },
        metadata=good[
            ["label", "width", "height", *[c for c in PIXEL_FEATURES if c in good.columns]]
        ].copy(),
    )
    return datasets, report


def fails(report: Report, fail_on: str) -> bool:
    if fail_on == "never":
        return False
    return SEVERITY_RANK[report.worst] >= SEVERITY_RANK[fail_on]


def write_pictures(report: Report, out_dir: Path, root: Path) -> dict[str, str]:
    """Montages of example files per finding, and the size-by-class plot when the shortcut check
    fires; returns name -> picture path relative to `out_dir` (also set on the report)."""
    import cv2
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pictures: dict[str, str] = {}
    folder = out_dir / "examples"
    for number, finding in enumerate(report.findings, start=1):
        groups = [g for g in finding.examples if g][:6]
        if not groups:
            continue
        cols = max(len(g) for g in groups)
        fig, axes = plt.subplots(
            len(groups), cols, figsize=(2.0 * cols, 2.3 * len(groups)), squeeze=False
        )
        for r, group in enumerate(groups):
            for c in range(cols):
                ax = axes[r][c]
                ax.axis("off")
                if c < len(group):
                    path, caption = group[c]
                    img = cv2.imread(str(root / path), cv2.IMREAD_GRAYSCALE)
                    if img is not None:
                        ax.imshow(img, cmap="gray", vmin=0, vmax=255)
                    ax.set_title(caption, fontsize=6)
        fig.suptitle(f"{finding.check}: examples (one row per group)", fontsize=8)
        fig.tight_layout()
        target = folder / f"{number:02d}_{finding.check}.png"
        with staged_file(target) as tmp:
            fig.savefig(tmp, dpi=90)
        plt.close(fig)
        finding.picture = target.relative_to(out_dir).as_posix()
        pictures[target.stem] = finding.picture
    meta = report.metadata
    if any(f.check == "shortcut" for f in report.findings) and meta is not None and len(meta):
        fig, ax = plt.subplots(figsize=(5.5, 4.5))
        for label in CLASSES:
            part = meta[meta["label"] == label]
            ax.scatter(part["width"], part["height"], s=8, alpha=0.6, label=label)
        ax.set_xlabel("width (px)")
        ax.set_ylabel("height (px)")
        ax.set_title("Image size by class: a shortcut a model can learn")
        ax.legend(fontsize=7)
        fig.tight_layout()
        target = folder / "shortcut.png"
        with staged_file(target) as tmp:
            fig.savefig(tmp, dpi=90)
        plt.close(fig)
        pictures["shortcut"] = target.relative_to(out_dir).as_posix()
    fired = any(f.check == "acquisition_shortcut" for f in report.findings)
    if fired and meta is not None and all(c in meta.columns for c in PIXEL_FEATURES):
        fig, axes = plt.subplots(1, len(PIXEL_FEATURES), figsize=(3.0 * len(PIXEL_FEATURES), 3.6))
        present = [c for c in CLASSES if (meta["label"] == c).any()]
        for ax, feature in zip(axes, PIXEL_FEATURES, strict=True):
            ax.boxplot(
                [meta.loc[meta["label"] == c, feature].astype(float) for c in present],
                showfliers=False,
            )
            ax.set_xticks(range(1, len(present) + 1), [c[:10] for c in present], fontsize=6)
            ax.set_title(feature, fontsize=8)
        fig.suptitle("Acquisition cues by class: what a model can learn instead of anatomy")
        fig.tight_layout()
        target = folder / "acquisition.png"
        with staged_file(target) as tmp:
            fig.savefig(tmp, dpi=90)
        plt.close(fig)
        pictures["acquisition"] = target.relative_to(out_dir).as_posix()
    report.pictures = pictures
    return pictures


def main() -> None:
    with stage_session("validate") as session:
        s = session.settings
        ingest = read_pointer(s.paths, "ingest", verify=False)
        split = read_pointer(s.paths, "split")
        resize = read_pointer(s.paths, "resize")
        manifests = {
            n: read_manifest(split.output_path(n, s.paths.root), INGEST_COLUMNS) for n in SPLITS
        }
        index = read_manifest(resize.output_path("index", s.paths.root), INDEX_COLUMNS)
        skipped = list(ingest.details.get("skipped", []))
        acquisition = None
        if "acquisition" in ingest.outputs:
            acquisition = read_manifest(
                ingest.output_path("acquisition", s.paths.root), ACQUISITION_COLUMNS
            )
        datasets, report = run_validate(
            manifests,
            index,
            s.params.validate,
            seed=s.params.base.seed,
            skipped=skipped,
            acquisition=acquisition,
        )
        out = session.out_dir
        write_pictures(report, out, s.paths.root)
        atomic_write_json(out / "report.json", report.to_dict())
        atomic_write_text(out / "report.md", report.to_markdown())
        quarantine_path = out / "quarantine.csv"
        write_manifest(
            quarantine_path, pd.DataFrame(report.quarantined, columns=list(QUARANTINE_COLUMNS))
        )
        session.log_artifact(out / "report.md")
        for picture in report.pictures.values():
            session.log_artifact(out / picture, "examples")
        for f in report.findings:
            level = {"error": logging.ERROR, "warning": logging.WARNING}.get(
                f.severity, logging.INFO
            )
            log.log(level, "%s %s: %s", f.severity, f.check, f.message)
        if fails(report, s.params.validate.fail_on):
            worst = [f for f in report.findings if f.severity == report.worst and not f.resolved]
            named = "; ".join(
                f"{f.check}: {f.message}"
                + (f" (e.g. {', '.join(f.files[:3])})" if f.files else "")
                for f in worst
            )
            raise StageFailed(
                f"data validation found {report.worst}s: {named}. See {out / 'report.md'}; "
                "fix the data, set validate.quarantine: true to leave such files out, or set "
                "validate.fail_on in params.yaml"
            )
        outputs: dict[str, Path] = {"report": out / "report.json", "quarantine": quarantine_path}
        for name, frame in datasets.items():
            outputs[name] = out / f"{name}.csv"
            write_manifest(outputs[name], frame)
        session.finish(
            inputs=["ingest", "split", "resize"],
            outputs=outputs,
            metrics={
                "status": report.worst,
                "findings": len(report.findings),
                "quarantined": len(report.quarantined),
                **{f"{n}_images": len(d) for n, d in datasets.items()},
                **{k: v for k, v in report.summary.items() if isinstance(v, int)},
                **({"shortcut_score": report.shortcut["score"]} if report.shortcut else {}),
                **(
                    {"acquisition_shortcut_score": report.shortcut["pixels"]}
                    if report.shortcut and report.shortcut["pixels"] is not None
                    else {}
                ),
            },
            details={"checks": sorted({f.check for f in report.findings})},
        )


if __name__ == "__main__":
    run_main("validate", main)
