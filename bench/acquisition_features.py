"""Time per slice of `chestct.data.acquisition.acquisition_features` (validate's and serving's
acquisition cues).

    python bench/acquisition_features.py [--source FOLDER] [--repeat 3] [--record FILE.json]

Without --source, 200 chest-CT-like slices of the embedded synthetic default (mixed sizes and
modes) are generated in a temporary folder. Slices are decoded once beforehand; only the
feature computation is timed, single-threaded (OpenCV runs one thread, as in a worker). Reported:
wall-clock milliseconds per slice (median over the rounds, with the range), the process's CPU
time per slice (less sensitive to other load on the machine), and the share of slices where a
body was found. --record also writes the figures as a results file for the docs
(bench/results.py).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import cv2

from chestct.data.acquisition import acquisition_features
from slices import decoded_slices


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, help="folder of slices (default: synthetic)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--record", type=Path, help="also write the table as a docs results file")
    args = parser.parse_args()
    cv2.setNumThreads(1)
    greys = decoded_slices(args.source)
    rounds, cpu = [], []
    found = 0.0
    for _ in range(args.repeat):
        start, start_cpu = time.perf_counter(), time.process_time()
        features = [acquisition_features(g) for g in greys]
        rounds.append((time.perf_counter() - start) / len(greys) * 1000)
        cpu.append((time.process_time() - start_cpu) / len(greys) * 1000)
        found = sum(f["body_found"] for f in features) / len(features)
    sides = sorted(max(g.shape) for g in greys)
    print(
        f"{len(greys)} slices (longer side {sides[0]}..{sides[-1]} px, median "
        f"{sides[len(sides) // 2]}): {statistics.median(rounds):.2f} ms per slice "
        f"(range {min(rounds):.2f}..{max(rounds):.2f} over {args.repeat} rounds; CPU time "
        f"{statistics.median(cpu):.2f} ms); "
        f"body found in {found:.0%}"
    )
    if args.record is not None:
        from results import write_result

        source = args.source.name if args.source else "the synthetic default"
        write_result(
            args.record,
            f"`acquisition_features` per slice, single-threaded, {len(greys)} slices of {source} "
            f"(longer side {sides[0]}..{sides[-1]} px), {args.repeat} rounds",
            ["CPU ms per slice (median)", "wall-clock ms per slice (median, range)", "body found"],
            [
                [
                    f"{statistics.median(cpu):.2f}",
                    f"{statistics.median(rounds):.2f} ({min(rounds):.2f}..{max(rounds):.2f})",
                    f"{found:.0%}",
                ]
            ],
        )
        print(f"recorded {args.record}")


if __name__ == "__main__":
    main()
