"""A CSV listing as an ingest source: one row per image, read and checked before any copy.

Columns `path` (relative to the CSV's folder, or absolute), `label` (a class or class-folder
name) and, optionally, `split` (train | valid | test, on every row or on none) and `group` (any
id: slices sharing it are kept in one split). `relpath` and `class` are accepted for `path` and
`label`. A row that cannot be used raises SourceError naming the row and the fix.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from chestct.data.manifest import SPLITS
from chestct.data.source_limits import SourceError
from chestct.data.sources import check_file
from chestct.labels import CLASSES, label_for_folder

# Accepted names of a CSV listing's columns (the first found is used).
LISTING_COLUMNS: dict[str, tuple[str, ...]] = {
    "path": ("path", "relpath"),
    "label": ("label", "class"),
    "split": ("split",),
    "group": ("group",),
}


def is_listing(source: str) -> bool:
    """True when `ingest.source` names a CSV listing rather than a folder or an archive."""
    return source.lower().endswith(".csv")


def scan_listing(
    listing: Path, class_map: dict[str, str], max_file_bytes: int | None = None
) -> list[tuple[str, str, Path, str]]:
    """(split, label, file, group) for every row of a CSV listing (see the module docstring).

    A listed file that is a FIFO, a device or larger than `max_file_bytes` is refused.
    """
    if not listing.is_file():
        raise SourceError(
            f"ingest.source {str(listing)!r}: CSV listing not found; give the path of a CSV "
            "with columns path,label[,split][,group] (relative paths are relative to the "
            "project root)"
        )
    try:
        table = pd.read_csv(listing, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise SourceError(f"{listing}: not a readable CSV listing ({exc})") from None
    table.columns = [str(c).strip().lower() for c in table.columns]
    found = {
        role: next((n for n in names if n in table.columns), None)
        for role, names in LISTING_COLUMNS.items()
    }
    missing = [role for role in ("path", "label") if found[role] is None]
    if missing:
        raise SourceError(
            f"{listing}: CSV listing has no {' or '.join(missing)} column (columns: "
            f"{', '.join(table.columns)}); it needs path,label and optionally split and group"
        )
    if table.empty:
        raise SourceError(f"{listing}: CSV listing has a header but no rows")
    splits = table[found["split"]].str.strip() if found["split"] else pd.Series("", table.index)
    bad_split = sorted(set(splits) - {"", *SPLITS})
    if bad_split:
        raise SourceError(
            f"{listing}: split column has {bad_split[0]!r}; use train, valid or test"
        )
    if splits.eq("").any() and splits.ne("").any():
        raise SourceError(
            f"{listing}: row {int(splits.eq('').to_numpy().argmax()) + 2} has no split while "
            "others do; give every row a split, or none (split then carves them)"
        )
    rows: list[tuple[str, str, Path, str]] = []
    for number, (rel, name, split) in enumerate(
        zip(table[found["path"]], table[found["label"]], splits, strict=True), start=2
    ):
        label = label_for_folder(name.strip(), class_map)
        if label not in CLASSES:
            raise SourceError(
                f"{listing}: row {number}: label {name!r} does not name a class "
                f"({', '.join(CLASSES)}); fix it or map it under ingest.class_map"
            )
        path = Path(rel.strip()).expanduser()
        path = path if path.is_absolute() else listing.parent / path
        if not rel.strip() or not path.is_file():
            raise SourceError(
                f"{listing}: row {number}: file {rel!r} not found (paths are relative to "
                f"{listing.parent})"
            )
        if max_file_bytes is not None:
            try:
                check_file(path, max_file_bytes)
            except SourceError as exc:
                raise SourceError(f"{listing}: row {number}: {exc}") from None
        group = table.at[number - 2, found["group"]] if found["group"] else ""
        rows.append((split, label, path, group))
    return rows
