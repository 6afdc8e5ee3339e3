"""Grouping beyond pixels: DICOM patients and studies, a CSV listing's group column, and what
split and validate do with them."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pandas as pd
import pydicom
import pytest

from chestct.data.grouping import hash_id, identity_keys, identity_leaks, split_groups
from chestct.data.manifest import SPLITS
from chestct.imaging.encoding import encode_dicom
from chestct.labels import CLASSES
from chestct.runner import StageFailed
from chestct.settings import BaseParams, IngestParams, SplitParams, ValidateParams
from chestct.stages.ingest import run_ingest
from chestct.stages.split import run_split
from chestct.stages.validate import run_validate
from helpers import ok_index, pixels, write_image
from shipped import shipped


def _dicom(seed: int, patient: str | None, study: str | None) -> bytes:
    """A 40x40 CT slice (random pixels, so no two are near-duplicates) with the given ids."""
    ds = pydicom.dcmread(io.BytesIO(encode_dicom(pixels(40, 40, seed=seed))))
    for tag, value in (("PatientID", patient), ("StudyInstanceUID", study)):
        if value is not None:
            setattr(ds, tag, value)
        elif tag in ds:
            delattr(ds, tag)
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def _ingest(root: Path, source: str) -> pd.DataFrame:
    frame, _ = run_ingest(
        shipped(BaseParams, seed=3, image_size=32),
        shipped(IngestParams, source=source),
        root / "artifacts" / "ingest",
        root,
        workers=1,
    )
    return frame


def _dicom_tree(root: Path, slices: int = 5, splits: tuple[str, ...] = ("",)) -> Path:
    """Per class, three patients with `slices` slices each; one class's patients lack
    PatientID (their StudyInstanceUID groups them instead)."""
    source = root / "dicom"
    seed = 0
    for split in splits:
        for label in CLASSES:
            for p in range(3):
                for s in range(slices):
                    seed += 1
                    no_patient = label == "normal"
                    data = _dicom(
                        seed,
                        None if no_patient else f"PAT-{label}-{p}",
                        f"1.2.826.0.1.{CLASSES.index(label)}.{p}",
                    )
                    folder = source / split / label if split else source / label
                    folder.mkdir(parents=True, exist_ok=True)
                    (folder / f"p{p}_s{s}.dcm").write_bytes(data)
    return source


def test_hash_id_is_a_salt_free_sha256_prefix_and_empty_for_no_id() -> None:
    assert hash_id("PAT-1") == hashlib.sha256(b"PAT-1").hexdigest()[:16]
    assert hash_id(" PAT-1 ") == hash_id("PAT-1")
    assert hash_id("") == hash_id(None) == hash_id(float("nan")) == ""


def test_ingest_records_hashed_dicom_ids_and_never_the_raw_ones(tmp_path: Path) -> None:
    _dicom_tree(tmp_path, slices=2)
    frame = _ingest(tmp_path, "dicom")
    cancer = frame[frame["label"] != "normal"]
    assert set(cancer["patient_hash"]) == {
        hash_id(f"PAT-{label}-{p}") for label in CLASSES if label != "normal" for p in range(3)
    }
    normal = frame[frame["label"] == "normal"]
    assert set(normal["patient_hash"]) == {""}
    assert set(normal["study_hash"]) == {hash_id(f"1.2.826.0.1.3.{p}") for p in range(3)}
    assert set(frame["group_hash"]) == {""}
    text = frame.to_csv()
    assert "PAT-" not in text and "1.2.826.0.1" not in text


def test_pooled_split_keeps_each_patient_and_study_in_one_split(tmp_path: Path) -> None:
    _dicom_tree(tmp_path, slices=5)
    frame = _ingest(tmp_path, "dicom")
    # 15 slices a class: a share of 5 slices takes one whole patient.
    params = shipped(SplitParams, mode="pool", valid_fraction=0.34, test_fraction=0.34)
    parts, summary = run_split(frame, params, seed=1)
    keys, sources = identity_keys(pd.concat(parts.values(), ignore_index=True))
    assert set(sources) == {"DICOM PatientID", "DICOM StudyInstanceUID"}
    splits_of = {
        key: {s for s, part in parts.items() if (identity_keys(part)[0] == key).any()}
        for key in set(keys)
    }
    assert all(len(found) == 1 for found in splits_of.values()), splits_of
    assert all(len(part) for part in parts.values())
    # What split reports: where its groups came from.
    assert summary.groups["groups_from_patient"] == 9  # three cancer classes x 3 patients
    assert summary.groups["groups_from_study"] == 3  # normal: study only
    assert summary.groups["groups_from_group"] == 0
    assert summary.groups["groups"] == 12 and summary.groups["files_without_identity"] == 0
    assert summary.cross_split_identities == []


def test_a_csv_listing_supplies_labels_splits_and_groups(tmp_path: Path) -> None:
    rows = []
    for number, label in enumerate(CLASSES * 12):
        name = f"img/{label}_{number}.png"
        write_image(tmp_path / "data" / name, 30, 30, seed=number)
        # Five groups per class (a few slices each) plus one slice without a group.
        group = "" if number < 4 else f"case-{label}-{number % 5}"
        rows.append({"path": name, "label": label, "group": group})
    pd.DataFrame(rows).to_csv(tmp_path / "data" / "list.csv", index=False)
    frame = _ingest(tmp_path, "data/list.csv")
    assert len(frame) == 48 and set(frame["split"]) == {""}
    assert frame.loc[frame["source_path"].str.endswith("normal_3.png"), "group_hash"].item() == ""
    assert "case-" not in frame.to_csv()
    params = shipped(SplitParams, mode="pool", valid_fraction=0.2, test_fraction=0.2)
    parts, summary = run_split(frame, params, seed=0)
    both = pd.concat([p.assign(split=s) for s, p in parts.items()], ignore_index=True)
    assert both.groupby("group_hash")["split"].nunique().drop("").max() == 1
    assert summary.groups["groups_from_group"] == 20  # 4 classes x 5 cases
    assert summary.groups["files_without_identity"] == 4


def test_a_listing_with_split_column_and_class_aliases(tmp_path: Path) -> None:
    lines = ["relpath,class,split"]
    for number, label in enumerate(CLASSES * 3):
        split = SPLITS[number // 4]
        write_image(tmp_path / f"{number}.png", 24, 24, seed=number)
        lines.append(f"{tmp_path / f'{number}.png'},{label.replace('_', '.')},{split}")
    (tmp_path / "list.csv").write_text("\n".join(lines) + "\n")
    frame = _ingest(tmp_path, str(tmp_path / "list.csv"))
    assert frame.groupby("split").size().to_dict() == dict.fromkeys(SPLITS, 4)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("file,label\na.png,normal\n", r"no path column .*path,label"),
        ("path,label\na.png,lymphoma\n", r"row 2: label 'lymphoma' does not name a class"),
        ("path,label\nmissing.png,normal\n", r"row 2: file 'missing.png' not found"),
        ("path,label,split\na.png,normal,train\na.png,normal,\n", r"row 3 has no split"),
        ("path,label,split\na.png,normal,holdout\n", r"'holdout'; use train, valid or test"),
        ("path,label\n", r"header but no rows"),
    ],
)
def test_a_bad_listing_stops_naming_the_row_and_the_fix(
    tmp_path: Path, content: str, message: str
) -> None:
    write_image(tmp_path / "a.png")
    (tmp_path / "list.csv").write_text(content)
    with pytest.raises(StageFailed, match=message):
        _ingest(tmp_path, "list.csv")


def test_a_missing_listing_names_the_expected_columns(tmp_path: Path) -> None:
    with pytest.raises(StageFailed, match=r"CSV listing not found.*path,label"):
        _ingest(tmp_path, "nowhere.csv")


def test_groups_are_the_union_of_copies_and_identities() -> None:
    frame = pd.DataFrame(
        {
            "split": ["train"] * 5,
            "label": ["normal"] * 5,
            "source_path": list("abcde"),
            "sha256": ["s1", "s2", "s2", "s3", "s4"],
            "phash": [""] * 5,
            "patient_hash": ["p1", "p1", "", "", ""],
            "study_hash": ["", "", "", "t1", "t1"],
            "group_hash": ["", "", "g1", "", ""],
        }
    )
    ids, counts = split_groups(frame, max_distance=12)
    # a~b (same patient), b~c (same bytes), d~e (same study, no patient).
    assert ids.tolist() == [0, 0, 0, 3, 3]
    assert counts["groups_from_patient"] == 1 and counts["groups_from_study"] == 1
    assert counts["groups_from_group"] == 1 and counts["copy_groups"] == 1
    assert counts["split_groups"] == 2


def test_keep_mode_reports_a_patient_the_source_spreads_and_validate_warns(
    tmp_path: Path,
) -> None:
    _dicom_tree(tmp_path, slices=2, splits=SPLITS)
    frame = _ingest(tmp_path, "dicom")
    # The source put the same three patients per class in train, valid and test.
    parts, summary = run_split(frame, shipped(SplitParams, mode="keep"), seed=0)
    assert len(summary.cross_split_identities) == 12
    leak = summary.cross_split_identities[0]
    assert leak["splits"] == list(SPLITS) and leak["kind"] in {"patient", "study"}
    assert not summary.dropped  # slices of a patient are not copies: never dropped
    _, report = run_validate(
        parts, ok_index(parts), shipped(ValidateParams, shortcut_min_images=10_000)
    )
    finding = next(f for f in report.findings if f.check == "cross_split_identity")
    assert finding.severity == "warning"
    assert "12 id(s) have slices in more than one split (9 patient, 3 study)" in finding.message
    assert len(finding.rows) == 48  # every valid and test slice: 12 ids x 2 splits x 2 slices
    quarantined = run_validate(
        parts,
        ok_index(parts),
        shipped(ValidateParams, shortcut_min_images=10_000, quarantine=True, fail_on="never"),
    )[0]
    assert len(quarantined["valid"]) == len(quarantined["test"]) == 0


def test_identity_leaks_name_hashes_only() -> None:
    frame = pd.DataFrame(
        {
            "split": ["train", "test"],
            "source_path": ["a.dcm", "b.dcm"],
            "patient_hash": [hash_id("PAT-9")] * 2,
        }
    )
    (leak,) = identity_leaks(frame)
    assert leak == {
        "kind": "patient",
        "key": hash_id("PAT-9"),
        "splits": ["train", "test"],
        "files": ["train: a.dcm", "test: b.dcm"],
    }


def test_patients_too_big_for_the_fractions_stop_naming_the_groups(tmp_path: Path) -> None:
    _dicom_tree(tmp_path, slices=5)
    frame = _ingest(tmp_path, "dicom")
    # 15 slices a class, a share of 2: no patient of 5 slices fits, so nothing is carved.
    with pytest.raises(StageFailed, match=r"12 groups of up to 5 that move as one"):
        run_split(frame, shipped(SplitParams, mode="pool"), seed=0)
