"""Render the measured figures of docs/results/*.json, and the parameter reference of
chestct.settings (bench/reference.py), into docs/generated/*.md for the docs.

    python bench/docsgen.py              # render every results file (make docs runs this)
    python bench/docsgen.py --check      # exit 1 when a generated table is missing or stale
    python bench/docsgen.py --record-run [ROOT]
                                         # record the project's last pipeline run (its
                                         # reports/evaluate/metrics.json) as default-run.json

Pages include a table with `--8<-- "docs/generated/<name>.md"`; a number in a table there is
never typed by hand: it comes from a bench's `--record`, from `--record-run`, or from a dated
run-log entry (`"source": "run log"`) for a measurement no script here can repeat.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import reference
from results import GENERATED, RESULTS, read_result, render, write_result

# The shift-stress perturbations in the order evaluate reports them (chestct.imaging.perturb).
SHIFT_ORDER = (
    "zoom_80",
    "zoom_60",
    "aspect_080",
    "aspect_125",
    "gamma_070",
    "gamma_140",
    "blur",
    "jpeg_q30",
    "noise_8",
)


def expected(results: Path = RESULTS) -> dict[str, str]:
    """{generated file name: its content} for every results file and parameter reference."""
    return {
        f"{path.stem}.md": render(read_result(path), path.stem)
        for path in sorted(results.glob("*.json"))
    } | reference.expected()


def generate(results: Path = RESULTS, generated: Path = GENERATED) -> list[str]:
    """Write every generated table; remove those whose results file is gone. Returns names."""
    want = expected(results)
    generated.mkdir(parents=True, exist_ok=True)
    for name, text in want.items():
        target = generated / name
        if not target.is_file() or target.read_text(encoding="utf-8") != text:
            tmp = target.with_suffix(".md.tmp")
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(target)
    for stale in set(p.name for p in generated.glob("*.md")) - want.keys():
        (generated / stale).unlink()
    return sorted(want)


def stale(results: Path = RESULTS, generated: Path = GENERATED) -> list[str]:
    """Generated files that are missing, differ from their results file, or have none."""
    want = expected(results)
    have = {p.name: p.read_text(encoding="utf-8") for p in generated.glob("*.md")}
    return sorted(n for n in want.keys() | have.keys() if want.get(n) != have.get(n))


def record_run(root: Path, out: Path) -> Path:
    """The shift stress of the project's last evaluate run as a results file."""
    metrics_file = root / "reports" / "evaluate" / "metrics.json"
    if not metrics_file.is_file():
        raise SystemExit(f"{metrics_file} not found: run `make run` (or `dvc repro evaluate`)")
    metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
    shift = metrics["shift"]
    rows = [
        [
            "clean test split",
            f"{metrics['macro_f1']:.3f}",
            f"{metrics['balanced_accuracy']:.3f}",
            f"{metrics['ece_calibrated']:.3f}",
        ]
    ]
    for name in [n for n in SHIFT_ORDER if n in shift] + sorted(
        n for n in shift if isinstance(shift[n], dict) and n not in SHIFT_ORDER
    ):
        s = shift[name]
        rows.append(
            [
                f"`{name}`",
                f"{s['macro_f1']:.3f}",
                f"{s['balanced_accuracy']:.3f}",
                f"{s['ece_calibrated']:.3f}",
            ]
        )
    flat = sum(1 for _ in _leaves(metrics))
    note = (
        f"`shift.worst_macro_f1` {shift['worst_macro_f1']:.3f} (`{shift['worst_shift']}`), "
        f"`shift.mean_macro_f1` {shift['mean_macro_f1']:.3f}, `robust_macro_f1` "
        f"{metrics['robust_macro_f1']:.3f}; metrics.json holds {flat} numbers in all."
    )
    return write_result(
        out,
        "The embedded default's last `make run`, test split clean and under each perturbation",
        ["condition", "macro-F1", "balanced accuracy", "ECE (served)"],
        rows,
        note=note,
        command="make run && python bench/docsgen.py --record-run",
    )


def record_model(root: Path, out: Path) -> Path:
    """The promoted model of the project's last run: size, files, training and LiteRT parity."""
    card_file = root / "model" / "model.json"
    train_file = root / "artifacts" / "train" / "pointer.json"
    for needed in (card_file, train_file):
        if not needed.is_file():
            raise SystemExit(f"{needed} not found: run `make run` first")
    card = json.loads(card_file.read_text(encoding="utf-8"))
    train = json.loads(train_file.read_text(encoding="utf-8"))["details"]
    light = card["inference"]
    members = train["members"]
    rows = [
        ["trainable parameters", f"{train['trainable_parameters']:,}".replace(",", " ")],
        [
            "epochs run (best epoch)",
            ", ".join(f"{m['epochs_run']} ({m['best_epoch']})" for m in members),
        ],
        [
            "`model.keras`",
            f"{(root / 'model' / card['model_file']).stat().st_size:,} bytes".replace(",", " "),
        ],
        [
            "`model.tflite` (float32)",
            f"{(root / 'model' / light['file']).stat().st_size:,} bytes".replace(",", " "),
        ],
        [
            "LiteRT against Keras, max abs difference of the probabilities",
            f"{light['parity_max_abs_diff']:.1e} on {light['parity_images']} test images",
        ],
    ]
    return write_result(
        out,
        "The promoted model of the embedded default's last `make run`",
        ["", "value"],
        rows,
        command="make run && python bench/docsgen.py --record-run",
    )


def _leaves(value: object):
    if isinstance(value, dict):
        for v in value.values():
            yield from _leaves(v)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check, write nothing")
    parser.add_argument("--record-run", nargs="?", const=".", type=Path, metavar="ROOT")
    args = parser.parse_args(argv)
    if args.check:
        out_of_date = stale()
        if out_of_date:
            print(
                f"docs/generated/ is out of date ({', '.join(out_of_date)}): run "
                "`python bench/docsgen.py` and commit docs/generated/",
                file=sys.stderr,
            )
            return 1
        print("docs/generated/ matches docs/results/")
        return 0
    if args.record_run is not None:
        root = args.record_run.resolve()
        print(f"recorded {record_run(root, RESULTS / 'default-run.json')}")
        print(f"recorded {record_model(root, RESULTS / 'default-model.json')}")
    for name in generate():
        print(f"docs/generated/{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
