"""Which calibration survives the shift stress? Compare ways of fitting the served temperature.

Run in a project after `dvc repro evaluate` (it reads artifacts/validate and the trained model):

    PYTHONPATH=src python bench/shift_calibration.py [project_root] [--record FILE.json]

For each scheme, fitted on the valid split (and, where said, its copies under every perturbation
of chestct.imaging.perturb.SHIFTS), prints the ECE of the test split clean and under each
perturbation
(worst and mean), and per perturbation the model's accuracy and the median Mahalanobis distance
of its pooled features (relative to valid's median). Schemes: no scaling; evaluate's temperature
on valid; on valid + shifted copies (evaluate.calibrate_on: valid_and_shifted); the temperature
minimising the mean ECE over the valid conditions; and, not in the product, a temperature growing
with the OOD distance, T(d) = T0 + b * max(0, d / d0 - 1), fitted by NLL on valid + shifted.
With --record, the table is also written as a results file for the docs (bench/results.py;
`python bench/docsgen.py` renders it).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def main(root: Path, record: Path | None = None) -> None:
    from scipy.optimize import minimize

    from chestct.data.manifest import DATASET_COLUMNS, read_manifest
    from chestct.evaluation.metrics import expected_calibration_error
    from chestct.evaluation.scoring import (
        load_images,
        original_slices,
        output_heads,
        resize_preprocessing,
    )
    from chestct.imaging.perturb import SHIFT_NAMES, apply_shift
    from chestct.imaging.preparation import prepare_slice
    from chestct.model.calibration import Mahalanobis, fit_temperature, nll, softmax
    from chestct.model.modeling import label_indices, load_model
    from chestct.settings import load_settings

    splits = {
        s: read_manifest(root / f"artifacts/validate/{s}.csv", DATASET_COLUMNS)
        for s in ("train", "valid", "test")
    }
    model = load_model(root / "artifacts/train/model.keras")
    size = int(model.input_shape[1])
    heads = output_heads(model, ["logits", "gap"])
    # Prepare shifted slices as the resize stage prepared the training images (its pointer's
    # params: body crop and intensity window on the default), as evaluate does.
    prep = resize_preprocessing(load_settings(root).paths, size).with_size(size)

    def run(images: np.ndarray) -> dict[str, np.ndarray]:
        logits, gap = heads.predict(images, batch_size=64, verbose=0)
        return {"logits": logits, "gap": gap}

    def outputs(frame) -> dict[str, dict[str, np.ndarray]]:
        res = {"clean": run(load_images(frame, root, size, prep))}
        slices, _ = original_slices(frame, root)
        for name in SHIFT_NAMES:
            images = np.stack(
                [
                    prepare_slice(apply_shift(name, g, k), prep).image
                    for g, k in zip(slices, frame["sha256"], strict=True)
                ]
            )[..., None].astype(np.float32)
            res[name] = run(images)
        return res

    ood = Mahalanobis.fit(run(load_images(splits["train"], root, size, prep))["gap"])
    valid, test = outputs(splits["valid"]), outputs(splits["test"])
    yv = label_indices(list(splits["valid"]["label"]))
    yt = label_indices(list(splits["test"]["label"]))
    d0 = float(np.median(ood.distance(valid["clean"]["gap"])))

    def by_distance(o, t0, b):
        t = t0 + b * np.maximum(0.0, ood.distance(o["gap"]) / d0 - 1.0)
        return softmax(o["logits"] / t[:, None])

    rows: list[list[str]] = []

    def report(name, probs):
        ece = {k: expected_calibration_error(yt, probs(o)) for k, o in test.items()}
        shifted = [ece[k] for k in SHIFT_NAMES]
        worst = SHIFT_NAMES[int(np.argmax(shifted))]
        rows.append(
            [
                name,
                f"{ece['clean']:.3f}",
                f"{max(shifted):.3f} (`{worst}`)",
                f"{np.mean(shifted):.3f}",
            ]
        )
        print(
            f"{name}: clean ECE {ece['clean']:.3f}, shifted worst {max(shifted):.3f} ({worst}), "
            f"mean {np.mean(shifted):.3f}"
        )

    report("no scaling", lambda o: softmax(o["logits"]))
    t_valid = fit_temperature(yv, valid["clean"]["logits"]).temperature
    report(f"T on valid ({t_valid:.3f})", lambda o: softmax(o["logits"], t_valid))
    pooled = np.concatenate([o["logits"] for o in valid.values()])
    t_both = fit_temperature(np.concatenate([yv] * len(valid)), pooled).temperature
    report(f"T on valid + shifted ({t_both:.3f})", lambda o: softmax(o["logits"], t_both))
    grid = np.exp(np.linspace(np.log(0.3), np.log(10.0), 80))
    mean_ece = [
        np.mean([expected_calibration_error(yv, softmax(o["logits"], t)) for o in valid.values()])
        for t in grid
    ]
    t_ece = float(grid[int(np.argmin(mean_ece))])
    report(f"T minimising mean valid ECE ({t_ece:.3f})", lambda o: softmax(o["logits"], t_ece))
    fit = minimize(
        lambda p: np.mean([nll(yv, by_distance(o, p[0], p[1])) for o in valid.values()]),
        [1.0, 1.0],
        method="L-BFGS-B",
        bounds=[(0.05, 20.0), (0.0, 50.0)],
    )
    t0, b = fit.x
    report(f"T(d) on valid + shifted (T0 {t0:.3f}, b {b:.3f})", lambda o: by_distance(o, t0, b))
    rows_note: list[str] = []
    for k, o in test.items():
        accuracy = float((o["logits"].argmax(axis=1) == yt).mean())
        ratio = float(np.median(ood.distance(o["gap"])) / d0)
        print(f"  {k}: accuracy {accuracy:.3f}, median distance / valid median {ratio:.2f}")
        if k == worst_of(rows):
            rows_note.append(
                f"Under `{k}` the model is right on {accuracy:.0%} of the test slices, which "
                f"sit at {ratio:.1f}× the valid median OOD distance."
            )
    if record is not None:
        from results import write_result

        write_result(
            record,
            "ECE of the test split (15 bins) by the way the served temperature is fitted, on the "
            "embedded default's trained model: clean, worst perturbation, mean over the nine",
            ["fitted on (T)", "clean", "worst", "mean"],
            rows,
            note=" ".join(rows_note),
        )
        print(f"recorded {record}")


def worst_of(rows: list[list[str]]) -> str:
    """The perturbation that was worst without scaling (the first scheme's row)."""
    return rows[0][2].split("`")[1]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", type=Path, default=Path())
    parser.add_argument("--record", type=Path, help="also write the table as a docs results file")
    args = parser.parse_args()
    main(args.root.resolve(), args.record)
