"""chestct.audit: a new audit log opened by several gunicorn workers at the same moment."""

from __future__ import annotations

import multiprocessing as mp
import sqlite3
import sys
import traceback
from pathlib import Path

from chestct.audit import AuditLog


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
