"""Compare served requests with the model's reference profile.

    python -m chestct.monitoring.monitor               # the latest monitor.window_requests
    python -m chestct.monitoring.monitor --last 1000
    python -m chestct.monitoring.monitor --since 24h   # or 30m, 7d, or an ISO time (UTC)
    python -m chestct.monitoring.monitor --db audit/predictions.sqlite --model-dir model \
        --out monitoring

Reads the audit log (serving.audit_db; the service must run with serving.audit_log: true),
takes the predictions of the served model version in the window, and compares them with the
reference profile evaluate fitted on the valid and test splits (model/reference.json, named in
the card): PSI and a two-sample test per signal (Kolmogorov-Smirnov; chi-square for the
predicted-class mix), abstain and OOD rates against evaluate's, the share of requests the input
checks refused (422) with their reasons, and, for predictions labelled through POST /feedback,
live accuracy, balanced accuracy and macro-F1 against the card's test figures. Writes
report.json and report.html (pictures inline) to monitor.report_dir and prints a short verdict
(chestct.monitoring.drift.rule_text states the rule; docs/monitoring.md).

Exit status: 0 no drift, 1 drift beyond the thresholds in config/config.yaml `monitor:`, 2 the
monitor could not run (missing audit log, model or reference; bad arguments), 3 too few
requests to judge (INSUFFICIENT: fewer than monitor.min_requests). A CLI like a stage: no
library module imports it. It reads the audit log through chestct.monitoring.audit, the same
AuditLog the service writes with.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from chestct.fsutil import atomic_write_json, atomic_write_text, sha256_bytes
from chestct.modelcard import CARD_NAME, ModelCard, read_card
from chestct.monitoring.drift import Thresholds, Window, compare
from chestct.monitoring.drift_report import render_html, verdict_lines
from chestct.monitoring.signals import SIGNAL_NAMES, check_reference

EXIT_OK, EXIT_DRIFT, EXIT_ERROR, EXIT_INSUFFICIENT = 0, 1, 2, 3
EXIT_BY_VERDICT = {"no drift": EXIT_OK, "drift": EXIT_DRIFT, "insufficient": EXIT_INSUFFICIENT}
DURATION = re.compile(r"^(\d+)([mhd])$")


class MonitorError(RuntimeError):
    """The monitor cannot run; the message says what is missing and how to fix it."""


@dataclass(frozen=True)
class Served:
    """The served model: its card and its reference profile."""

    card: ModelCard
    reference: dict[str, Any]


def load_served(model_dir: Path) -> Served:
    """The card (read as the inference core reads it, chestct.modelcard) and the reference
    profile in `model_dir`, checked against the card's sha256."""
    card_path = model_dir / CARD_NAME
    try:
        card = read_card(model_dir)[0]
    except FileNotFoundError:
        raise MonitorError(f"{card_path} not found; promote a model first (`make run`)") from None
    except ValueError as exc:
        raise MonitorError(f"{model_dir}: {exc}") from None
    entry = card.monitoring
    if entry is None or not isinstance(entry.file, str):
        raise MonitorError(
            f"{card_path} has no `monitoring` entry: the model was promoted before reference "
            "profiles existed; rerun `dvc repro evaluate promote` to write one"
        )
    ref_path = model_dir / Path(entry.file).name
    if not ref_path.is_file():
        raise MonitorError(f"{ref_path} (card monitoring.file) is missing; promote again")
    data = ref_path.read_bytes()
    if entry.sha256 and sha256_bytes(data) != entry.sha256:
        raise MonitorError(f"{ref_path} does not match monitoring.sha256 in {card_path}")
    try:
        reference = check_reference(json.loads(data), str(ref_path))
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as exc:
        raise MonitorError(str(exc)) from None
    return Served(card, reference)


def parse_since(text: str, now: datetime | None = None) -> str:
    """`30m`, `24h`, `7d` or an ISO time -> the ISO UTC string the audit log is compared to."""
    now = now or datetime.now(UTC)
    match = DURATION.match(text.strip())
    if match:
        amount, unit = int(match.group(1)), match.group(2)
        delta = {"m": timedelta(minutes=amount), "h": timedelta(hours=amount)}.get(
            unit, timedelta(days=amount)
        )
        return (now - delta).isoformat(timespec="milliseconds")
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise MonitorError(
            f"--since {text!r} is neither a duration (30m, 24h, 7d) nor an ISO time "
            "(2026-11-29T08:00:00)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC).isoformat(timespec="milliseconds")


def read_window(
    db: Path, last: int | None, since: str | None, version: str | None, classes: Sequence[str]
) -> tuple[Window, list[dict[str, Any]]]:
    """The window's predictions and refusals from the audit log, as a monitoring.Window: with
    `last`, the latest `last` requests, answered or refused."""
    from chestct.monitoring.audit import AuditLog

    if not db.is_file():
        raise MonitorError(
            f"no audit log at {db}: run the service with serving.audit_log: true "
            "(config/config.yaml) or point --db at the file"
        )
    log = AuditLog(db)
    rows = log.window(last=last, since=since, model_version=version)
    refusals = log.refusals(last=last, since=since, model_version=version)
    if last is not None and len(rows) + len(refusals) > last:
        # The latest `last` of both, by time (ISO strings of one format sort as times).
        events = sorted(
            [(r["time"], 1, r["id"], r) for r in rows]
            + [(r["time"], 0, r["id"], r) for r in refusals],
            key=lambda e: e[:3],
        )[-last:]
        rows = [e[3] for e in events if e[1] == 1]
        refusals = [e[3] for e in events if e[1] == 0]
    signals: dict[str, list[float]] = {name: [] for name in SIGNAL_NAMES}
    for row in rows:
        for name in SIGNAL_NAMES:
            value = row["signals"].get(name)
            if value is not None:
                signals[name].append(float(value))
    feedback = []
    for row in rows:
        if row.get("true_label"):
            # Stored by class name (sorted keys): back into the model's output order.
            probs = row["probabilities"]
            feedback.append((row["true_label"], [float(probs.get(c, 0.0)) for c in classes]))
    times = [r["time"] for r in rows] + [r["time"] for r in refusals]
    window = Window(
        refused=[r["reason"] for r in refusals],
        labels=[row["label"] for row in rows],
        signals=signals,
        abstain=[None if row["abstain"] is None else bool(row["abstain"]) for row in rows],
        ood=[
            None if row["out_of_distribution"] is None else bool(row["out_of_distribution"])
            for row in rows
        ],
        start=min(times) if times else None,
        end=max(times) if times else None,
        feedback=feedback,
    )
    return window, rows


def run_monitor(
    *,
    db: Path,
    model_dir: Path,
    out_dir: Path,
    thresholds: Thresholds,
    last: int | None,
    since: str | None,
    all_versions: bool = False,
) -> dict[str, Any]:
    """Compare the window with the served model's reference; write report.json/.html."""
    served = load_served(model_dir)
    version = None if all_versions else served.card.version
    classes = list(served.card.classes)
    window, _ = read_window(db, last, since, version, classes)
    metrics = None if served.card.metrics is None else dict(served.card.metrics)
    report = compare(served.reference, window, thresholds, classes, metrics)
    report["model"] = {
        "name": served.card.name,
        "version": served.card.version,
        "versions_included": "all" if all_versions else version,
    }
    report["generated_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "report.json", report)
    atomic_write_text(out_dir / "report.html", render_html(report))
    return report


# --------------------------------------------------------------------------- entry point


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m chestct.monitoring.monitor`; returns the exit status."""
    args = _arguments(argv)

    from chestct.settings import SettingsError, load_settings

    try:
        if args.last is not None and args.last < 1:
            raise MonitorError(f"--last must be at least 1, got {args.last}")
        settings = load_settings()
        cfg = settings.config.monitor
        root = settings.paths.root
        since = parse_since(args.since) if args.since else None
        last = args.last if args.last is not None else (None if since else cfg.window_requests)
        report = run_monitor(
            db=args.db or settings.paths.audit_db or root / settings.config.serving.audit_db,
            model_dir=args.model_dir or settings.paths.model,
            out_dir=args.out or root / cfg.report_dir,
            thresholds=Thresholds.from_config(cfg),
            last=last,
            since=since,
            all_versions=args.all_versions,
        )
    except (MonitorError, SettingsError) as exc:
        print(f"chestct monitor: {exc}", file=sys.stderr)
        return EXIT_ERROR
    print("\n".join(verdict_lines(report)))
    out = args.out or settings.paths.root / settings.config.monitor.report_dir
    print(f"  report: {out / 'report.html'} and report.json")
    return EXIT_BY_VERDICT[report["verdict"]]


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line, parsed."""
    parser = argparse.ArgumentParser(
        prog="python -m chestct.monitoring.monitor",
        description="Compare served predictions (audit log) with the model's reference profile.",
    )
    parser.add_argument("--last", type=int, help="the latest N predictions")
    parser.add_argument("--since", help="predictions since a duration ago (30m, 24h, 7d) or ISO")
    parser.add_argument("--db", type=Path, help="audit log (default: serving.audit_db)")
    parser.add_argument("--model-dir", type=Path, help="served model folder (default: model/)")
    parser.add_argument("--out", type=Path, help="report folder (default: monitor.report_dir)")
    parser.add_argument(
        "--all-versions",
        action="store_true",
        help="include predictions of earlier model versions (default: the served one only)",
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    raise SystemExit(main())
