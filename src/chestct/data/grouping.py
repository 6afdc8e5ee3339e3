"""Which slices belong together beyond their pixels: one patient, one study, one user group.

Slices of one patient look alike without being copies; a split that puts some in train and
some in test measures how well a model recognises the patient. Ingest records, per file, who
it belongs to, as salt-free sha256 prefixes so that raw identifiers never reach an artifact,
MLflow or dvc.lock (`hash_id`; ingest reads the two DICOM tags):

- `patient_hash`: the DICOM `PatientID` (empty for other formats or when the tag is absent);
- `study_hash`: the DICOM `StudyInstanceUID`;
- `group_hash`: the `group` column of a CSV listing source (see `chestct.stages.ingest`).

`identity_keys` turns those into one key per file (the user group, else the patient, else the
study), and `split_groups` joins them with the exact / near-duplicate groups of
`chestct.data.dedup`: two files share a split group when any constraint links them, transitively.
A salt-free hash of a short identifier can be reversed by someone who can list candidate ids;
it keeps identifiers out of files, it does not anonymise.
"""

from __future__ import annotations

import hashlib
from typing import Any

import pandas as pd

from chestct.data.dedup import UnionFind, group_files
from chestct.data.manifest import SPLITS

ID_DIGITS = 16  # 64 bits of the sha256: collisions are negligible for any dataset size
IDENTITY_COLUMNS: tuple[str, ...] = ("patient_hash", "study_hash", "group_hash")
# Where a file's identity key came from, strongest first: a user's grouping overrides DICOM.
KEY_SOURCES: dict[str, str] = {
    "group_hash": "group column",
    "patient_hash": "DICOM PatientID",
    "study_hash": "DICOM StudyInstanceUID",
}


def hash_id(value: object) -> str:
    """A salt-free sha256 prefix of an identifier; '' for an empty or missing one."""
    if value is None or (isinstance(value, float) and value != value):  # None or NaN
        return ""
    text = str(value).strip()
    if not text:
        return ""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:ID_DIGITS]


def _column(frame: pd.DataFrame, name: str) -> pd.Series:
    if name not in frame.columns:
        return pd.Series("", index=frame.index, dtype=object)
    return frame[name].fillna("").astype(str).replace({"nan": "", "<NA>": ""})


def identity_keys(frame: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """Per manifest row: its identity key ('' when none) and where the key came from.

    The key is the user's group when given, else the DICOM patient, else the DICOM study
    (prefixed by its kind, so a patient hash never meets a study hash).
    """
    keys = pd.Series("", index=frame.index, dtype=object)
    sources = pd.Series("", index=frame.index, dtype=object)
    for column, source in KEY_SOURCES.items():
        values = _column(frame, column)
        fill = (keys == "") & (values != "")
        keys[fill] = column.split("_")[0] + ":" + values[fill]
        sources[fill] = source
    return keys, sources


def split_groups(frame: pd.DataFrame, max_distance: int) -> tuple[pd.Series, dict[str, int]]:
    """One group id per row: the union of copies, near-duplicates and identity keys.

    Returns the ids (the smallest member row position of each group) and a count of where the
    groups came from: identity keys per source, copy groups, and the groups that result.
    """
    duplicates = group_files(frame, max_distance)
    keys, sources = identity_keys(frame)
    uf = UnionFind(len(frame))
    for position, dup in enumerate(duplicates):
        uf.union(int(dup), position)
    first: dict[str, int] = {}
    for position, key in enumerate(keys):
        if key:
            uf.union(first.setdefault(key, position), position)
    ids = pd.Series([uf.find(i) for i in range(len(frame))], index=frame.index, name="group")
    copy_groups = duplicates.value_counts()
    counts = {
        **{
            f"groups_from_{column.removesuffix('_hash')}": int(keys[sources == source].nunique())
            for column, source in KEY_SOURCES.items()
        },
        "copy_groups": int((copy_groups > 1).sum()),
        "files_without_identity": int((keys == "").sum()),
        "split_groups": int(ids.nunique()),
    }
    return ids, counts


def identity_leaks(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """Identity keys (patient, study, user group) whose files sit in more than one split.

    Each entry: kind (group | patient | study), the hashed key, the splits, and the files as
    `split: source_path`. The hash, never the raw id, names the key.
    """
    keys, _ = identity_keys(frame)
    with_key = frame.assign(_key=keys)[keys != ""]
    spread = with_key.groupby("_key")["split"].nunique()
    leaks = []
    for key in sorted(spread[spread > 1].index):
        members = with_key[with_key["_key"] == key]
        kind, digest = key.split(":", 1)
        leaks.append(
            {
                "kind": kind,
                "key": digest,
                "splits": [s for s in SPLITS if s in set(members["split"])],
                "files": [
                    f"{s}: {p}"
                    for s, p in zip(members["split"], members["source_path"], strict=True)
                ],
            }
        )
    return leaks


def join_series(groups: pd.Series, series: list[int]) -> pd.Series:
    """`groups` (split_groups' ids) joined with series ids (chestct.data.similarity.series_groups,
    one per row in the same order): rows linked by either share a group, transitively."""
    if len(series) != len(groups):
        raise ValueError(f"{len(series)} series ids for {len(groups)} rows")
    uf = UnionFind(len(groups))
    first: dict[Any, int] = {}
    for position, (group, one) in enumerate(zip(groups, series, strict=True)):
        uf.union(first.setdefault(("g", group), position), position)
        uf.union(first.setdefault(("s", one), position), position)
    return pd.Series([uf.find(i) for i in range(len(groups))], index=groups.index, name="group")
