"""Perceptual hashing, duplicate groups, and splits in which a group never straddles two sides."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from chestct.data.dedup import distance, duplicate_groups, group_files, near_pairs, phash
from chestct.data.manifest import INGEST_COLUMNS, SPLITS
from chestct.labels import CLASSES
from chestct.runner import StageFailed
from chestct.settings import (
    SplitParams,
)
from chestct.stages.split import run_split
from helpers import (
    ingest_folder,
    ingest_row,
    make_kaggle_folder,
)
from shipped import shipped


def slice_like(seed: int, width: int = 160, height: int = 120) -> np.ndarray:
    """A smooth random grey picture: distinct per seed, robust to re-encoding and resizing."""
    coarse = np.random.default_rng(seed).integers(0, 255, (6, 8)).astype(np.uint8)
    return cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)


# --------------------------------------------------------------------------- dedup


def test_phash_is_stable_under_resizing_and_reencoding_but_not_across_images() -> None:
    img = slice_like(1)
    base = phash(img)
    assert len(base) == 64
    smaller = cv2.resize(img, (80, 60), interpolation=cv2.INTER_AREA)
    ok, jpeg = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 70])
    assert ok
    recoded = cv2.imdecode(jpeg, cv2.IMREAD_GRAYSCALE)
    assert distance(base, phash(smaller)) <= 6
    assert distance(base, phash(recoded)) <= 6
    others = [distance(base, phash(slice_like(s))) for s in range(2, 12)]
    assert min(others) > 40


def test_near_pairs_and_groups_are_transitive() -> None:
    a = "0" * 64
    b = "0" * 63 + "7"  # 3 bits from a
    c = "0" * 62 + "77"  # 3 bits from b, 6 from a
    far = "f" * 64
    assert near_pairs([a, b, c, far], 3).tolist() == [[0, 1], [1, 2]]
    assert duplicate_groups(["x", "y", "z", "w"], [a, b, c, far], 3) == [0, 0, 0, 3]
    # Exact copies group without hashes; -1 turns near-grouping off.
    assert duplicate_groups(["x", "y", "x"], None, 3) == [0, 1, 0]
    assert duplicate_groups(["x", "y", "z"], [a, b, ""], -1) == [0, 1, 2]
    assert duplicate_groups(["x", "y", "z"], [a, "", a], 0) == [0, 1, 0]


def test_near_pairs_blocks_agree_with_a_single_block() -> None:
    rng = np.random.default_rng(0)
    hashes = [rng.bytes(32).hex() for _ in range(50)]
    hashes += [h[:-1] + ("0" if h[-1] != "0" else "1") for h in hashes[:10]]
    one = near_pairs(hashes, 4, block=1000).tolist()
    assert near_pairs(hashes, 4, block=7).tolist() == one
    assert len(one) == 10


# --------------------------------------------------------------------------- split


def manifest(spec: dict[str, int], extra: list[dict] | None = None) -> pd.DataFrame:
    """Rows per split and class with distinct contents and far-apart hashes."""
    rng = np.random.default_rng(5)
    rows = [
        ingest_row(split, label, f"{split}-{label}-{i}") | {"phash": rng.bytes(32).hex()}
        for split, n in spec.items()
        for label in CLASSES
        for i in range(n)
    ]
    return pd.DataFrame(rows + (extra or []), columns=list(INGEST_COLUMNS))


def test_keep_carves_only_the_missing_split_out_of_train() -> None:
    frame = manifest({"train": 20, "valid": 4})
    parts, summary = run_split(frame, shipped(SplitParams, test_fraction=0.25), seed=0)
    assert summary.mode == "keep"
    assert summary.carved == ["test"]
    pd.testing.assert_frame_equal(
        parts["valid"], frame[frame["split"] == "valid"].reset_index(drop=True)
    )
    assert summary.counts["test"] == dict.fromkeys(sorted(CLASSES), 5)
    assert summary.counts["train"] == dict.fromkeys(sorted(CLASSES), 15)
    assert set(parts["test"]["source_path"]) <= set(
        frame[frame["split"] == "train"]["source_path"]
    )


def test_keep_without_a_train_folder_asks_for_pool() -> None:
    frame = manifest({"valid": 3, "test": 3})
    with pytest.raises(StageFailed, match=r"no train folder.*split\.mode: pool"):
        run_split(frame, shipped(SplitParams), seed=0)
    parts, summary = run_split(frame, shipped(SplitParams, mode="pool"), seed=0)
    assert summary.mode == "pool" and all(len(p) for p in parts.values())


def test_near_duplicates_move_together_when_pooling() -> None:
    base = manifest({"": 10})
    # Five near-identical copies (different bytes, hashes 1-5 bits apart) of one normal image.
    anchor = "c3" * 32
    copies = [
        ingest_row("", "normal", f"near-{i}") | {"phash": anchor[:-1] + "0123f"[i]}
        for i in range(5)
    ]
    frame = pd.concat([base, pd.DataFrame(copies)], ignore_index=True)
    for seed in range(6):
        parts, summary = run_split(frame, shipped(SplitParams, mode="pool"), seed=seed)
        sides = [s for s in SPLITS if parts[s]["source_path"].str.contains("near-").any()]
        assert len(sides) == 1, (seed, sides)
        assert summary.groups["near_duplicate_groups"] == 1


def test_keep_reports_and_drops_groups_the_source_spreads(tmp_path) -> None:
    leak = ingest_row("train", "normal", "shared") | {"phash": "ab" * 32}
    leaked = dict(leak, split="valid", source_path="valid/normal/copy.png")
    near = dict(
        leak,
        split="test",
        sha256="f" * 64,
        source_path="test/normal/near.png",
        phash="ab" * 31 + "aa",
    )
    frame = manifest({"train": 6, "valid": 2, "test": 2}, [leak, leaked, near])

    parts, summary = run_split(frame, shipped(SplitParams), seed=0)
    assert len(summary.cross_split) == 1
    assert summary.cross_split[0]["kind"] == "near"
    assert "valid: valid/normal/copy.png" in summary.cross_split[0]["files"]
    assert summary.dropped == []
    assert "valid/normal/copy.png" in set(parts["valid"]["source_path"])

    parts, summary = run_split(frame, shipped(SplitParams, dedupe="drop"), seed=0)
    assert sorted(d["source_path"] for d in summary.dropped) == [
        "test/normal/near.png",
        "valid/normal/copy.png",
    ]
    assert {d["kept_in"] for d in summary.dropped} == {"train"}
    assert "valid/normal/copy.png" not in set(parts["valid"]["source_path"])
    assert "test/normal/near.png" not in set(parts["test"]["source_path"])
    assert leak["source_path"] in set(parts["train"]["source_path"])


def test_drop_keeps_one_of_each_group_of_copies_inside_a_split() -> None:
    """`split.dedupe: drop` also drops repeats inside one split (on the real data 66/17/14
    stayed in train/valid/test before): of each group with one label in one split, the first
    stays; copies with different labels stay (a conflict is validate's to report)."""
    shared = ingest_row("train", "normal", "a") | {"phash": "ab" * 32}
    exact = dict(shared, source_path="train/normal/a-again.png")
    near = dict(shared, source_path="train/normal/a-near.png", sha256="e" * 64)
    near["phash"] = "ab" * 31 + "aa"
    other_label = dict(shared, label="adenocarcinoma", source_path="train/adeno/a.png")
    in_valid = ingest_row("valid", "normal", "v") | {"phash": "cd" * 32}
    in_valid_again = dict(in_valid, source_path="valid/normal/v-again.png")
    frame = manifest(
        {"train": 6, "valid": 2, "test": 2},
        [shared, exact, near, other_label, in_valid, in_valid_again],
    )
    parts, summary = run_split(frame, shipped(SplitParams), seed=0)
    assert summary.dropped == [] and len(parts["train"]) == 6 * 4 + 4

    parts, summary = run_split(frame, shipped(SplitParams, dedupe="drop"), seed=0)
    dropped = {d["source_path"]: d["reason"] for d in summary.dropped}
    assert dropped == {
        "train/normal/a-again.png": "exact copy of another train file",
        "train/normal/a-near.png": "near duplicate of another train file",
        "valid/normal/v-again.png": "exact copy of another valid file",
    }
    train = set(parts["train"]["source_path"])
    assert shared["source_path"] in train and "train/adeno/a.png" in train
    assert len(parts["train"]) == 6 * 4 + 2 and len(parts["valid"]) == 2 * 4 + 1


def test_group_files_tolerates_manifests_without_hashes() -> None:
    frame = pd.DataFrame({"sha256": ["a", "b", "a"], "phash": ["", "nan", None]})
    assert group_files(frame, 10).tolist() == [0, 1, 0]
    assert group_files(frame.drop(columns="phash"), 10).tolist() == [0, 1, 0]


def test_split_keeps_the_source_splits(tmp_path: Path) -> None:
    make_kaggle_folder(tmp_path / "kaggle", {"train": 3, "valid": 2, "test": 2})
    frame, _ = ingest_folder(tmp_path)
    parts, summary = run_split(frame, shipped(SplitParams), seed=0)
    assert summary.mode == "keep"
    for split in SPLITS:
        expected = frame[frame["split"] == split].reset_index(drop=True)
        pd.testing.assert_frame_equal(parts[split], expected)
    assert summary.counts["valid"] == dict.fromkeys(sorted(CLASSES), 2)


@pytest.fixture
def pooled_source(tmp_path: Path) -> pd.DataFrame:
    """An ingest manifest with only train and valid, and copies of one image on both sides."""
    source = make_kaggle_folder(tmp_path / "kaggle", {"train": 8, "valid": 2})
    original = next((source / "train" / "normal").iterdir())
    shutil.copy(original, source / "valid" / "normal" / "copy.png")
    shutil.copy(original, source / "train" / "normal" / "copy.png")
    frame, _ = ingest_folder(tmp_path)
    assert set(frame["split"]) == {"train", "valid"}
    return frame


def test_split_pools_when_a_split_is_missing(pooled_source: pd.DataFrame) -> None:
    params = shipped(SplitParams, mode="pool", valid_fraction=0.2, test_fraction=0.2)
    parts, summary = run_split(pooled_source, params, seed=0)

    assert summary.mode == "pool"
    assert sum(len(p) for p in parts.values()) == len(pooled_source)
    sides = {s: set(p["sha256"]) for s, p in parts.items()}
    assert not sides["train"] & sides["valid"]
    assert not sides["train"] & sides["test"]
    assert not sides["valid"] & sides["test"]
    for split, part in parts.items():
        assert set(part["label"]) == set(CLASSES), split
        assert (part["split"] == split).all()
    # Each class gives test and valid their share of its images, overshooting by less than
    # one group (the three copies of one normal image move together).
    for label in CLASSES:
        total = int((pooled_source["label"] == label).sum())
        for split in ("test", "valid"):
            want = round(total * 0.2)
            assert want <= summary.counts[split][label] < want + 3, (split, label)


def test_split_pool_is_deterministic_for_a_seed(pooled_source: pd.DataFrame) -> None:
    params = shipped(SplitParams, mode="pool")

    def assignment(seed: int) -> dict[str, str]:
        parts, _ = run_split(pooled_source, params, seed=seed)
        return {p: s for s, part in parts.items() for p in part["path"]}

    assert assignment(1) == assignment(1)
    assert assignment(1) != assignment(2)


def test_split_fails_when_a_split_would_be_empty(tmp_path: Path) -> None:
    make_kaggle_folder(tmp_path / "kaggle", {"train": 1})
    frame, _ = ingest_folder(tmp_path)
    message = r"split '(train|valid)' is empty.*too few images \(4, in 4 groups"
    with pytest.raises(StageFailed, match=message):
        run_split(frame, shipped(SplitParams), seed=0)


# --------------------------------------------------------------------------- series


def test_series_grouping_keeps_a_series_on_one_side() -> None:
    """Slices of one synthetic patient (near-copies, distinct files and hashes) are linked by
    thumbnail correlation and never straddle train and test; without thumbnails they do."""
    from chestct.data.similarity import series_groups, thumbnails
    from chestct.data.synthetic import PATIENT_FIELD, render_slice, series_jitter

    rng = np.random.default_rng(0)
    rows, slices, patient_of = [], [], []
    for k, label in enumerate(CLASSES):
        for patient in range(6):
            base = render_slice(
                label, np.random.default_rng(1000 * k + patient), patient_field=PATIENT_FIELD
            )
            for j in range(4):
                rows.append(ingest_row("", label, f"{label}-{patient}-{j}"))
                slices.append(series_jitter(base, rng))
                patient_of.append(f"{label}-{patient}")
    manifest = pd.DataFrame(rows, columns=list(INGEST_COLUMNS)).fillna("")
    thumbs = thumbnails(slices)
    params = shipped(
        SplitParams,
        mode="pool",
        valid_fraction=0.2,
        test_fraction=0.2,
        near_duplicate_distance=-1,
        series_similarity=0.9,
    )

    def straddling(parts: dict[str, pd.DataFrame]) -> int:
        side = {key: split for split, part in parts.items() for key in part["sha256"]}
        sides = pd.Series([side[key] for key in manifest["sha256"]])
        return int(sides.groupby(pd.Series(patient_of)).nunique().gt(1).sum())

    grouped, summary = run_split(manifest, params, seed=3, thumbs=thumbs)
    series = series_groups(thumbs, 0.9)
    assert 20 <= summary.groups["series"] == len(set(series)) <= 28  # 24 patients
    side = {key: split for split, part in grouped.items() for key in part["sha256"]}
    sides = pd.Series([side[key] for key in manifest["sha256"]])
    assert sides.groupby(pd.Series(series)).nunique().max() == 1  # a series on one side
    loose, _ = run_split(manifest, params, seed=3)
    assert straddling(grouped) < straddling(loose)
