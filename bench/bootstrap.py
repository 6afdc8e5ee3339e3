"""How long the bootstrap intervals and the paired test take, per set size.

    python bench/bootstrap.py [--resamples 1000] [--sizes 100 300 1000 3000]

For each size: the median of 5 runs of chestct.evaluation.uncertainty.bootstrap_intervals
(accuracy,
balanced accuracy, macro-F1, ECE raw and calibrated; groups of 3 slices) and of
paired_bootstrap on robust_macro_f1 with the 8 shift conditions of the stress set.
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import numpy as np

from chestct.evaluation.uncertainty import bootstrap_intervals, paired_bootstrap
from chestct.imaging.perturb import SHIFT_NAMES
from chestct.labels import CLASSES


def _timed(fn, runs: int = 5) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 300, 1000, 3000])
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    k = len(CLASSES)
    print(f"{'n':>6} {'intervals s':>12} {'paired s':>10}  ({args.resamples} resamples)")
    for n in args.sizes:
        y = rng.integers(0, k, n)
        proba = rng.dirichlet(np.ones(k), n)
        groups = [str(i // 3) for i in range(n)]
        conditions = ["clean", *SHIFT_NAMES]
        a = {c: rng.integers(0, k, n) for c in conditions}
        b = {c: rng.integers(0, k, n) for c in conditions}
        t_ci = _timed(
            partial(
                bootstrap_intervals, y, proba, groups, calibrated=proba, resamples=args.resamples
            )
        )
        t_pair = _timed(
            partial(paired_bootstrap, "robust_macro_f1", y, a, b, groups, resamples=args.resamples)
        )
        print(f"{n:>6} {t_ci:>12.3f} {t_pair:>10.3f}")


if __name__ == "__main__":
    main()
