"""Epoch time of training through the tf.data pipeline against the compute limit.

    python bench/train_input.py [--images 480] [--size 128] [--batch-size 32] [--epochs 4]
                                [--filters 16,32,64,128,256] [--record FILE.json]

Generates `--images` synthetic chest-CT-like PNGs (already at `--size`, as resize writes them)
in a temporary folder, then fits the same small CNN (same seed, same weights at the start)
three ways and reports the median time of the epochs after the first (the first one traces
the graph and fills the cache):

- in-memory: model.fit() on decoded images held as one float32 array (the compute limit:
  nothing left to do but the training step);
- pipeline: chestct.model.inputs.make_dataset as train uses it (decode, cache, shuffle, batch,
  augmentation with the default train.augment, prefetch);
- pipeline without augmentation: the same, with augmentation off, to show what it costs;
- pipeline with shift augmentation: the default plus every acquisition-shift transform.

The ratio pipeline / in-memory is the number the pipeline is held to (target <= 1.10).
--record also writes the table as a results file for the docs (bench/results.py).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from chestct.labels import CLASSES
from chestct.settings import AugmentParams, BaseModelParams, TrainParams, defaults

# Every acquisition-shift augmentation on (train.augment.zoom_out ... noise), on top of
# params.yaml's flip/rotation/zoom/contrast, to show what they cost.
SHIFT_AUGMENT = {
    "zoom_out": 0.4,
    "aspect": 0.2,
    "translation": 0.1,
    "gamma": 0.4,
    "window": 0.1,
    "blur": 1.0,
    "noise": 4.0,
}


def write_images(folder: Path, count: int, size: int) -> tuple[list[Path], list[str]]:
    from chestct.data.synthetic import render_slice

    rng = np.random.default_rng(0)
    paths, labels = [], []
    for i in range(count):
        label = CLASSES[i % len(CLASSES)]
        grey = cv2.resize(
            render_slice(label, rng, 256), (size, size), interpolation=cv2.INTER_AREA
        )
        path = folder / f"{i:05d}.png"
        cv2.imwrite(str(path), grey)
        paths.append(path)
        labels.append(label)
    return paths, labels


def epoch_times(fit) -> list[float]:
    import keras

    class Timer(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.times: list[float] = []

        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            self.times.append(time.perf_counter() - self.started)

    timer = Timer()
    fit(timer)
    return timer.times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=480)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=4)
    default = ",".join(map(str, defaults(BaseModelParams).filters))
    parser.add_argument(
        "--filters", default=default, help=f"small_cnn filters (default {default})"
    )
    parser.add_argument("--record", type=Path, help="also write the table as a docs results file")
    args = parser.parse_args()

    import keras

    from chestct.model.inputs import augmenter, make_dataset
    from chestct.model.modeling import build_model, label_indices
    from chestct.model.training import compile_model

    params = defaults(BaseModelParams, filters=[int(f) for f in args.filters.split(",")])
    train = defaults(TrainParams, batch_size=args.batch_size)
    with tempfile.TemporaryDirectory(prefix="chestct-bench-") as tmp:
        print(f"writing {args.images} images of {args.size} px ...")
        paths, labels = write_images(Path(tmp), args.images, args.size)

        def fresh() -> keras.Model:
            model = build_model(params, args.size, seed=0)
            compile_model(model, train, train.learning_rate)
            return model

        x = np.stack([cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in paths])
        x = x[..., None].astype(np.float32)
        y = np.eye(len(CLASSES), dtype=np.float32)[label_indices(labels)]

        results: dict[str, list[float]] = {}
        results["in-memory"] = epoch_times(
            lambda cb: fresh().fit(
                x,
                y,
                batch_size=args.batch_size,
                epochs=args.epochs,
                shuffle=True,
                callbacks=[cb],
                verbose=0,
            )
        )
        for name, augment in (
            ("pipeline", train.augment),
            (
                "pipeline, no augmentation",
                defaults(AugmentParams, flip=False, rotation=0.0, zoom=0.0, contrast=0.0),
            ),
            ("pipeline, + shift aug.", defaults(AugmentParams, **SHIFT_AUGMENT)),
        ):
            ds = make_dataset(
                paths,
                labels,
                args.batch_size,
                shuffle_seed=0,
                augment=augmenter(augment, 0),
                one_hot=True,
            )
            results[name] = epoch_times(
                lambda cb, ds=ds: fresh().fit(ds, epochs=args.epochs, callbacks=[cb], verbose=0)
            )

    limit = statistics.median(results["in-memory"][1:])
    print(
        f"\n{args.images} images, {args.size} px, batch {args.batch_size}, "
        f"filters {params.filters}; median of epochs 2..{args.epochs}"
    )
    print(f"{'input':<28}{'first epoch s':>15}{'epoch s':>10}{'ratio':>8}")
    rows = []
    for name, times in results.items():
        steady = statistics.median(times[1:])
        print(f"{name:<28}{times[0]:>15.2f}{steady:>10.2f}{steady / limit:>8.2f}")
        rows.append([name, f"{times[0]:.2f}", f"{steady:.2f}", f"{steady / limit:.2f}"])
    ratio = statistics.median(results["pipeline"][1:]) / limit
    print(f"\npipeline / in-memory = {ratio:.2f} (target <= 1.10)")
    if args.record is not None:
        from results import write_result

        write_result(
            args.record,
            f"Epoch time through the training pipeline against the same images in memory: "
            f"{args.images} synthetic images, {args.size} px, batch {args.batch_size}, "
            f"filters {params.filters}, median of epochs 2..{args.epochs} (target: ratio <= 1.10)",
            ["input", "first epoch s", "epoch s", "ratio to in-memory"],
            rows,
        )
        print(f"recorded {args.record}")


if __name__ == "__main__":
    main()
