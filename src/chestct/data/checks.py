"""The data checks validate runs, one function per family (their report: check_report).

Every check has a default severity (`CHECKS`; `validate.severities` overrides it):

- per file (`file_checks`): undecodable (error), small_file, dimensions, near_blank,
  unexpected_mode (warning), format_mismatch (info: e.g. JPEG data under a .png name);
- copies (`copy_checks`): duplicate_within_split (warning), near_duplicate (info),
  label_conflict (error), near_label_conflict (warning), cross_split_duplicate (error: leakage),
  cross_split_near_duplicate (warning);
- identities (`identity_checks`): cross_split_identity (warning: one patient, study or user
  group in two splits; chestct.data.grouping);
- the dataset (`dataset_checks`, `acquisition_check`): class_count (error), class_imbalance
  (warning), shortcut (warning): a model on file metadata and acquisition cues that predicts
  the class well above chance, and acquisition_shortcut (warning): the pixels' acquisition cues
  alone (how much of the frame the body fills, its aspect, background and body grey levels;
  chestct.data.acquisition, measured at ingest) predict it. The report names the features that give
  the class away on their own.

Each family adds its findings to a `Checker` over one frame (all splits, one row per file, the
resize index merged); chestct.data.validation builds that frame, runs the families and
applies quarantine, and the validate stage writes the report.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd

from chestct.data.check_report import Finding
from chestct.data.grouping import identity_keys, identity_leaks, join_series, split_groups
from chestct.data.manifest import SPLITS
from chestct.data.shortcuts import PIXEL_FEATURES, ShortcutResult, detect_shortcut
from chestct.labels import CLASSES
from chestct.settings import ValidateParams


class ChecksError(ValueError):
    """The checks are misconfigured; the message names the key and the allowed values."""


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
    # chestct.data.content_checks: what the pixels say about the dataset.
    "near_copy_split": (
        "warning",
        "a split mostly made of near-copies of train (thumbnail correlation)",
    ),
    "few_series": ("warning", "a train class drawn from fewer than min_series_per_class series"),
    "not_chest": ("warning", "slices without a lung field (abdomen, pelvis)"),
    "annotation_marks": ("warning", "burned-in marks drawn on the pixels (lines, boxes)"),
}
_EXTENSIONS = {
    ".png": "png",
    ".jpg": "jpeg",
    ".jpeg": "jpeg",
    ".bmp": "bmp",
    ".tif": "tiff",
    ".tiff": "tiff",
    ".dcm": "dicom",
}


def severities(params: ValidateParams) -> dict[str, str]:
    """Check -> severity: the defaults of CHECKS with `validate.severities` applied."""
    unknown = sorted(set(params.severities) - set(CHECKS))
    if unknown:
        raise ChecksError(
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


class Checker:
    """Runs the checks over one frame (all splits, one row per file, resize index merged)."""

    def __init__(self, frame: pd.DataFrame, params: ValidateParams) -> None:
        self.frame = frame
        self.params = params
        self.severity = severities(params)
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


def file_checks(checker: Checker, skipped: list[dict[str, str]]) -> None:
    """Per file: undecodable (with ingest's `skipped`), small_file, dimensions, near_blank,
    unexpected_mode, format_mismatch."""
    f, p = checker.frame, checker.params
    ok = f["ok"].astype(bool)
    bad = f[~ok]
    if len(bad) or skipped:
        files = [f"{s['path']}: {s['reason']}" for s in skipped]
        files += [f"{p_}: {e}" for p_, e in zip(bad["source_path"], bad["error"], strict=True)]
        where = f" ({len(skipped)} skipped at ingest)" if skipped else ""
        checker.add(
            "undecodable",
            f"{len(files)} file(s) could not be decoded; they are left out{where}",
            files,
            list(bad.index),
        )
    checker.per_file(
        "small_file",
        ok & (f["bytes"].astype(int) < p.min_file_bytes),
        f"file(s) smaller than validate.min_file_bytes ({p.min_file_bytes} bytes)",
        lambda r: f"{r.bytes} bytes",
    )
    width, height = f["width"].astype(int), f["height"].astype(int)
    checker.per_file(
        "dimensions",
        ok & ((width.clip(upper=height) < p.min_side) | (width.clip(lower=height) > p.max_side)),
        f"file(s) with a side outside {p.min_side}..{p.max_side} pixels",
        lambda r: f"{r.width}x{r.height}",
    )
    checker.per_file(
        "near_blank",
        ok & (f["std"].astype(float) < p.min_std),
        f"near-blank slice(s) (grey-level std below validate.min_std = {p.min_std:g})",
        lambda r: f"std {float(r.std):.2f}",
    )
    checker.per_file(
        "unexpected_mode",
        ok & ~f["mode"].astype(str).isin(p.allowed_modes),
        f"file(s) in a colour mode not in validate.allowed_modes ({', '.join(p.allowed_modes)})",
        lambda r: f"mode {r.mode}",
    )
    named = (
        f["source_path"].astype(str).map(lambda s: _EXTENSIONS.get(Path(_name(s)).suffix.lower()))
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
        checker.add(
            "format_mismatch",
            f"{len(hits)} file(s) whose name says another format than their content "
            f"({', '.join(kinds)}); chestct decodes by content, other tools may not",
            [f"{r.source_path}: {r.format} data" for r in hits.itertuples()],
            [],
        )


def copy_checks(checker: Checker) -> None:
    """Exact and near copies: within a split, under two classes, across splits (leakage)."""
    f = checker.frame[checker.frame["ok"].astype(bool)]
    order = f["split"].map({s: i for i, s in enumerate(SPLITS)})
    f = f.assign(_order=order).sort_values(["_order", "source_path"], kind="stable")
    _within_split(checker, f)
    _label_conflicts(checker, f)
    _across_splits(checker, f)


def _within_split(checker: Checker, f: pd.DataFrame) -> None:
    """duplicate_within_split and near_duplicate, split by split."""
    for split, part in f.groupby("split", sort=False):
        dup = part[part.duplicated("sha256", keep=False)]
        if len(dup):
            n_extra = len(dup) - dup["sha256"].nunique()
            groups = [g for _, g in dup.groupby("sha256", sort=False)]
            checker.add(
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
            checker.add(
                "near_duplicate",
                f"{split}: {len(redundant)} near-duplicate file(s) in {len(groups)} group(s) "
                f"(perceptual hashes within {checker.params.near_duplicate_distance} bits)",
                [f"group {k + 1}: {p}" for k, g in enumerate(groups) for p in g["source_path"]],
                redundant,
                examples=[_examples(g.drop_duplicates("sha256").head(4)) for g in groups[:6]],
            )


def _label_conflicts(checker: Checker, f: pd.DataFrame) -> None:
    """label_conflict (one content, two classes) and near_label_conflict."""
    labels_per_hash = f.groupby("sha256")["label"].nunique()
    conflict = f[f["sha256"].isin(labels_per_hash[labels_per_hash > 1].index)]
    if len(conflict):
        checker.add(
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
        checker.add(
            "near_label_conflict",
            f"{len(groups)} group(s) of near-identical files are filed under more than one class",
            sorted(f"{r.label}: {r.source_path}" for r in near_conflict.itertuples()),
            list(near_conflict.index),
            examples=[_examples(g.head(4)) for g in groups[:6]],
        )


def _across_splits(checker: Checker, f: pd.DataFrame) -> None:
    """cross_split_duplicate and cross_split_near_duplicate: leakage, the later copy named."""
    splits_per_hash = f.groupby("sha256")["split"].nunique()
    leaked = f[f["sha256"].isin(splits_per_hash[splits_per_hash > 1].index)]
    first_split_of_hash = leaked.groupby("sha256")["_order"].transform("min")
    if len(leaked):
        copies = leaked[leaked["_order"] > first_split_of_hash]
        first_name = leaked.groupby("sha256")["_order"].min().map(dict(enumerate(SPLITS)))
        pairs = copies.assign(first=copies["sha256"].map(first_name))
        detail = ", ".join(
            f"{n} {later} file(s) identical to {first} files"
            for (later, first), n in pairs.groupby(["split", "first"], sort=False).size().items()
        )
        checker.add(
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
        checker.add(
            "cross_split_near_duplicate",
            f"{len(near_leak)} file(s) in a later split are near-identical to a file in an "
            f"earlier split (leakage; perceptual hashes within "
            f"{checker.params.near_duplicate_distance} bits)",
            sorted(f"{r.split}: {r.source_path}" for r in groups.itertuples()),
            list(near_leak.index),
            examples=[
                _examples(g.drop_duplicates("sha256").head(4)) for _, g in groups.groupby("group")
            ][:6],
        )


def identity_checks(checker: Checker) -> None:
    """cross_split_identity: one patient, study or listing group in two splits."""
    f = checker.frame[checker.frame["ok"].astype(bool)]
    leaks = identity_leaks(f)
    if leaks:
        kinds = pd.Series([g["kind"] for g in leaks]).value_counts()
        # The slices in a later split than their id's first are the ones to quarantine.
        keys = identity_keys(f)[0]
        order = f["split"].map({s: i for i, s in enumerate(SPLITS)})
        leaked = keys.isin({f"{g['kind']}:{g['key']}" for g in leaks})
        rows = list(f.index[leaked & (order > order.groupby(keys).transform("min"))])
        checker.add(
            "cross_split_identity",
            f"{len(leaks)} id(s) have slices in more than one split ("
            + ", ".join(f"{n} {kind}" for kind, n in kinds.items())
            + "): a model is then scored on patients it trained on. Use split.mode: pool "
            "(groups move together) or fix the source's splits",
            [f"{g['kind']} {g['key']}: {path}" for g in leaks for path in g["files"]],
            rows,
        )


def dataset_checks(
    checker: Checker, good: pd.DataFrame, seed: int, series: dict[Any, int] | None = None
) -> tuple[dict, ShortcutResult | None]:
    """On the files handed on (`good`): class_count, class_imbalance, shortcut and
    acquisition_shortcut; returns the counts per split and class, and the detector's result.
    `series` (frame row -> series id, chestct.data.content_checks) keeps a series in one fold."""
    p = checker.params
    counts = {
        s: {c: int((good[good["split"] == s]["label"] == c).sum()) for c in CLASSES}
        for s in SPLITS
    }
    for split, by_class in counts.items():
        low = [c for c, n in by_class.items() if n < p.min_class_count]
        if low:
            checker.add(
                "class_count",
                f"{split}: class(es) {', '.join(low)} have fewer than {p.min_class_count} images",
                [],
                [],
            )
        present = {c: n for c, n in by_class.items() if n > 0}
        if len(present) > 1:
            big = max(present, key=present.__getitem__)
            small = min(present, key=present.__getitem__)
            ratio = present[big] / present[small]
            if ratio > p.max_imbalance:
                checker.add(
                    "class_imbalance",
                    f"{split}: the largest class ({big}, {present[big]}) is {ratio:.1f}x the "
                    f"smallest ({small}, {present[small]}); above validate.max_imbalance = "
                    f"{p.max_imbalance:g}",
                    [],
                    [],
                )
    shortcut = None
    if len(good) < p.shortcut_min_images:
        checker.results["shortcut"] = (
            f"skipped: {len(good)} images, fewer than validate.shortcut_min_images"
        )
    else:
        # Folds keep copies and slices of one patient/study/group on one side.
        cohorts = split_groups(good, p.near_duplicate_distance)[0]
        if series:
            # Rows without a thumbnail get an id of their own (negative: never a series id).
            ids = [series.get(i, -1 - k) for k, i in enumerate(good.index)]
            cohorts = join_series(cohorts, ids)
        shortcut = detect_shortcut(good, cohorts, seed, family_margin=min(p.shortcut_margin, 0.1))
        if shortcut is None:
            checker.results["shortcut"] = "skipped: too few images per class for two folds"
        elif shortcut.leaks(p.shortcut_margin):
            leak = shortcut.strongest()
            checker.add(
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
            checker.results["shortcut"] = (
                f"passed: balanced accuracy {shortcut.score:.2f} (chance {shortcut.chance:.2f})"
            )
        acquisition_check(checker, shortcut)
    if "acquisition_shortcut" not in checker.results and shortcut is None:
        checker.results["acquisition_shortcut"] = checker.results["shortcut"]
    return counts, shortcut


def acquisition_check(checker: Checker, shortcut: ShortcutResult | None) -> None:
    """The pixel cues alone (chestct.data.acquisition) against validate.shortcut_margin."""
    margin = checker.params.shortcut_margin
    if shortcut is None:
        return
    if shortcut.pixels is None:
        checker.results["acquisition_shortcut"] = (
            "skipped: no acquisition features (rerun ingest to measure them)"
        )
    elif shortcut.pixels_leak(margin):
        checker.add(
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
        checker.results["acquisition_shortcut"] = (
            f"passed: balanced accuracy {shortcut.pixels:.2f} (chance {shortcut.chance:.2f})"
        )


def check_table(checker: Checker) -> dict[str, dict[str, str]]:
    """Every check with its severity, its result and what it looks for (the report's table)."""
    table = {
        name: {
            "severity": checker.severity[name],
            "result": checker.results.get(name, "passed"),
            "looks_for": description,
        }
        for name, (_, description) in CHECKS.items()
    }
    if checker.params.near_duplicate_distance < 0:
        for name in ("near_duplicate", "near_label_conflict", "cross_split_near_duplicate"):
            table[name]["result"] = "off: validate.near_duplicate_distance is -1"
    return table
