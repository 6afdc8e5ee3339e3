"""CPU time per request of the monitoring signals (`chestct.monitoring.signals.request_signals`).

    python bench/monitoring_signals.py [--source FOLDER] [--repeat 5] [--record FILE.json]

Three ways of computing one request's signals are timed on the same decoded slices, alternated
over the rounds, single-threaded (OpenCV on one thread, as in a worker):

- `before`: the signals served before the acquisition cues (input size, mean grey, foreground
  share on the SAMPLE_SIDE grid), rebuilt here as the baseline;
- `box reused`: all signals, with the body box the model's body crop found (`resize.crop: body`,
  imaging.Prepared.body) handed in, as the predictor does;
- `box found`: all signals, looking for the body box on the SAMPLE_SIDE grid (a model served
  with `resize.crop: none`).

Also timed: `imaging.body_box` on the full slice alone (what the reuse saves: looking for the
same box a second time, as the crop does). Without --source, the embedded
synthetic default (mixed sizes and modes) is generated in a temporary folder. Reported: the
process's CPU time per slice, median over the rounds with the range. --record also writes the
table as a results file for the docs (bench/results.py; `python bench/docsgen.py` renders it).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from chestct.imaging.body import body_box
from chestct.monitoring.signals import FOREGROUND_GREY, SAMPLE_SIDE, request_signals
from slices import decoded_slices

PROBABILITIES = np.array([0.7, 0.1, 0.1, 0.1])


def before(grey: np.ndarray) -> dict[str, float]:
    """The per-request signals as served before the acquisition cues (the baseline)."""
    step = max(1, max(grey.shape) // SAMPLE_SIDE)
    sample = grey[::step, ::step]
    return {
        "top_probability": float(PROBABILITIES.max()),
        "entropy": 0.5,
        "ood_ratio": 0.5,
        "input_side": float(max(grey.shape)),
        "mean_grey": float(sample.mean()),
        "foreground": float(np.count_nonzero(sample > FOREGROUND_GREY)) / sample.size,
    }


def cpu_ms(fn: Callable[[int], object], n: int) -> float:
    start = time.process_time()
    for i in range(n):
        fn(i)
    return (time.process_time() - start) / n * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, help="folder of slices (default: synthetic)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--record", type=Path, help="also write the table as a docs results file")
    args = parser.parse_args()
    cv2.setNumThreads(1)
    greys = decoded_slices(args.source)
    boxes = [body_box(g, 0.0) for g in greys]
    n = len(greys)
    series: dict[str, Callable[[int], object]] = {
        "before": lambda i: before(greys[i]),
        "box reused": lambda i: request_signals(PROBABILITIES, 0.5, 0.5, 1.0, greys[i], boxes[i]),
        "box found": lambda i: request_signals(PROBABILITIES, 0.5, 0.5, 1.0, greys[i]),
        "body_box alone": lambda i: body_box(greys[i], 0.0),
    }
    for fn in series.values():  # warm-up: imports, caches
        fn(0)
    times: dict[str, list[float]] = {name: [] for name in series}
    for _ in range(args.repeat):
        for name, fn in series.items():
            times[name].append(cpu_ms(fn, n))
    sides = sorted(max(g.shape) for g in greys)
    print(
        f"{n} slices (longer side {sides[0]}..{sides[-1]} px, median {sides[n // 2]}), "
        f"CPU ms per slice, median (range) over {args.repeat} rounds:"
    )
    base = statistics.median(times["before"])
    rows = []
    for name, values in times.items():
        med = statistics.median(values)
        extra = "" if name in ("before", "body_box alone") else f"+{med - base:.3f}"
        print(f"  {name:15} {med:.3f} ({min(values):.3f}..{max(values):.3f})  {extra}")
        rows.append([name, f"{med:.3f}", f"{min(values):.3f}..{max(values):.3f}", extra])
    if args.record is not None:
        from results import write_result

        source = args.source.name if args.source else "the synthetic default"
        write_result(
            args.record,
            f"CPU time of one request's monitoring signals on {n} slices of {source} (longer "
            f"side {sides[0]}..{sides[-1]} px), single-threaded, {args.repeat} rounds alternated",
            ["way", "ms per slice (median)", "range over the rounds", "ms added to `before`"],
            rows,
        )
        print(f"recorded {args.record}")


if __name__ == "__main__":
    main()
