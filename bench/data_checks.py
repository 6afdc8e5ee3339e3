"""The figures of docs/data-checks.md, measured on a copy of the Chest CT-Scan images set.

    python bench/data_checks.py /path/to/chest-ct    # holds train/ and valid/ class folders

Prints: how close each folder sits to train (nearest-train thumbnail correlation), series per
train class at two thresholds, validate's pixel checks per folder (not_chest,
annotation_marks), and a pooled split of the train folder with and without series grouping
(split.series_similarity), with the test side's nearest-train distribution. Nothing is
written; nothing of the dataset leaves the machine.
"""

from __future__ import annotations

import argparse
import hashlib
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from chestct.data.content_checks import annotation_marks
from chestct.data.dedup import phash
from chestct.data.manifest import INGEST_COLUMNS
from chestct.data.similarity import nearest, series_groups, thumbnails
from chestct.imaging.decoding import decode
from chestct.imaging.lungs import lung_field
from chestct.labels import label_for_folder
from chestct.settings import SplitParams, defaults
from chestct.stages.split import run_split

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def _describe(sims: np.ndarray, threshold: float = 0.9) -> str:
    q = " ".join(f"{v:.3f}" for v in np.quantile(sims, QUANTILES))
    return (
        f"q05..q95 {q}; share >= {threshold:g}: {np.mean(sims >= threshold):.2f} (n={len(sims)})"
    )


def _folder(folder: Path) -> pd.DataFrame:
    rows = []
    for path in sorted(p for p in folder.glob("*/*") if p.is_file()):
        data = path.read_bytes()
        grey = decode(data).grey
        raw = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        rows.append(
            {
                "path": str(path),
                "label": label_for_folder(path.parent.name),
                "sha256": hashlib.sha256(data).hexdigest(),
                "grey": grey,
                "lungs": lung_field(grey).reason,
                "marks": annotation_marks(raw if raw is not None else grey),
            }
        )
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, help="folder holding train/ and valid/")
    args = parser.parse_args()
    train, valid = _folder(args.data / "train"), _folder(args.data / "valid")
    t_thumbs, v_thumbs = thumbnails(train["grey"]), thumbnails(valid["grey"])
    unique = valid.drop_duplicates("sha256")
    print(
        f"train vs train without itself: {_describe(nearest(t_thumbs, t_thumbs, True).similarity)}"
    )
    print(f"valid folder vs train:         {_describe(nearest(v_thumbs, t_thumbs).similarity)}")
    u_thumbs = thumbnails(unique["grey"])
    print(f"valid, distinct files:         {_describe(nearest(u_thumbs, t_thumbs).similarity)}")
    for threshold in (0.9, 0.95):
        per_class = {
            label: len(
                set(series_groups(t_thumbs[(train["label"] == label).to_numpy()], threshold))
            )
            for label in sorted(train["label"].unique())
        }
        print(f"train series per class at {threshold}: {per_class}")
    for name, frame in (("train", train), ("valid", valid)):
        print(
            f"{name}: not_chest {Counter(frame.loc[frame['lungs'] != '', 'label'])}, "
            f"annotation_marks {Counter(frame.loc[frame['marks'] != '', 'label'])}"
        )
    normals = valid[(valid["label"] == "normal")].drop_duplicates("sha256")
    for row in normals.itertuples():
        print(
            f"  valid normal {Path(row.path).name}: lungs: {row.lungs or 'found'}; "
            f"marks: {row.marks or '-'}"
        )

    manifest = pd.DataFrame(
        [
            {
                "split": "",
                "label": r.label,
                "path": r.path,
                "source_path": r.path,
                "sha256": r.sha256,
                "width": r.grey.shape[1],
                "height": r.grey.shape[0],
                "mode": "L",
                "format": "png",
                "bytes": 0,
                "phash": phash(r.grey),
                "patient_hash": "",
                "study_hash": "",
                "group_hash": "",
            }
            for r in train.itertuples()
        ],
        columns=list(INGEST_COLUMNS),
    )
    index = {h: i for i, h in enumerate(manifest["sha256"])}
    for series in (-1.0, 0.95, 0.9):
        params = defaults(SplitParams, mode="pool", series_similarity=series)
        parts, summary = run_split(manifest, params, 42, None if series == -1 else t_thumbs)
        rows = {s: np.array([index[h] for h in parts[s]["sha256"]]) for s in ("train", "test")}
        sims = nearest(t_thumbs[rows["test"]], t_thumbs[rows["train"]]).similarity
        print(
            f"pooled split, split.series_similarity {series:g} ({summary.groups['groups']} "
            f"groups): test vs train {_describe(sims)}"
        )


if __name__ == "__main__":
    main()
