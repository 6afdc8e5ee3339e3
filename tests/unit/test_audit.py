"""chestct.monitoring.audit: a new audit log opened by several gunicorn workers at the same
moment."""

from __future__ import annotations

import multiprocessing as mp
import sqlite3
import sys
import traceback
from pathlib import Path

from chestct.monitoring.audit import AuditLog


def _open(path: str, start) -> None:
    start.wait()
    try:
        AuditLog(Path(path)).open()
    except sqlite3.Error:
        traceback.print_exc()
        sys.exit(1)


def test_workers_opening_a_new_audit_log_together_all_succeed(tmp_path: Path) -> None:
    """Each worker finds or adds the later columns (prediction_id, signals); none fails on a
    column another has just added, which would stop its boot and gunicorn with it."""
    ctx = mp.get_context("spawn")
    for attempt in range(6):
        path = tmp_path / f"audit-{attempt}.sqlite"
        start = ctx.Barrier(6)
        procs = [ctx.Process(target=_open, args=(str(path), start)) for _ in range(6)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(timeout=60)
        assert [proc.exitcode for proc in procs] == [0] * 6, f"attempt {attempt}: see stderr"
        with sqlite3.connect(path) as conn:
            columns = {row[1] for row in conn.execute("PRAGMA table_info(predictions)")}
        assert {"prediction_id", "signals"} <= columns


def _answer(i: int) -> dict:
    return {
        "id": f"{i:032x}",
        "input": {"sha256": f"{i:064x}"},
        "label": "normal",
        "probabilities": {"normal": 0.9, "adenocarcinoma": 0.1},
        "uncertainty": {"abstain": False},
        "ood": {"out_of_distribution": False},
        "model": {"name": "chestct", "version": "1"},
    }


def test_the_monitor_window_takes_the_latest_requests_answered_or_refused(
    tmp_path: Path,
) -> None:
    """Refused slices are stored apart (reason, signals; no pixels) and the monitor's
    `--last N` counts the latest N requests of both kinds, oldest first."""
    from chestct.monitoring.monitor import read_window

    log = AuditLog(tmp_path / "audit.sqlite")
    log.open()
    for i in range(6):
        if i % 2:
            log.record_refusal("/predict", f"{i:064x}", "flat_graphic", ("chestct", "1"), {})
        else:
            log.record("/predict", _answer(i), {"mean_grey": 10.0})
    (refusal,) = log.refusals(last=1)
    assert refusal["reason"] == "flat_graphic" and refusal["sha256"] == f"{5:064x}"
    assert refusal["model_version"] == "1" and refusal["signals"] == {}
    window, rows = read_window(tmp_path / "audit.sqlite", 3, None, "1", ["normal"])
    # The latest three requests: answer 4 and refusals 3 and 5.
    assert window.requests == 3 and window.n == 1 and window.refused == ["flat_graphic"] * 2
    assert [r["sha256"] for r in rows] == [f"{4:064x}"]
    everything, _ = read_window(tmp_path / "audit.sqlite", None, None, None, ["normal"])
    assert everything.requests == 6 and everything.n == 3
    assert log.refusals(model_version="2") == []
