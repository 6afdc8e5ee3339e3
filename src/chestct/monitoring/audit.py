"""The audit log of predictions: SQLite, off by default, and never any pixels.

A row holds the prediction's id, the input's sha256, the label, the probabilities, the
monitoring signals (chestct.monitoring.signals: numbers only), the model's name and version, and
the
UTC time; a second table holds the true labels sent to POST /feedback; a third the slices the
input checks refused (422 "not a chest CT slice": reason, sha256, the image signals when the
slice decoded), so that the monitor counts refused traffic as well as answered. Several gunicorn
workers write to one file: WAL mode lets them, and each write opens its own short connection
so that no connection crosses a thread or a fork. `python -m chestct.monitoring.monitor` reads it.

Retention (serving.audit_max_rows, serving.audit_retention_days) is enforced when the log is
opened and then every PRUNE_EVERY records of a worker: the oldest predictions (and refused
slices) beyond the row limit, those older than the retention, and the feedback of deleted
predictions go.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS predictions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    label TEXT NOT NULL,
    probabilities TEXT NOT NULL,
    abstain INTEGER,
    out_of_distribution INTEGER,
    model_name TEXT NOT NULL,
    model_version TEXT NOT NULL
)
"""
# Columns added after the first release: an older file gets them on open().
_ADDED = (("prediction_id", "TEXT"), ("signals", "TEXT"))
_FEEDBACK = """
CREATE TABLE IF NOT EXISTS feedback (
    prediction_id TEXT PRIMARY KEY,
    label TEXT NOT NULL,
    time TEXT NOT NULL
)
"""


_REFUSALS = """
CREATE TABLE IF NOT EXISTS refusals (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    reason TEXT NOT NULL,
    signals TEXT,
    model_name TEXT NOT NULL,
    model_version TEXT NOT NULL
)
"""


# How long a worker waits for another's lock on the file before giving up.
_LOCK_TIMEOUT_S = 5.0
# Records between two retention passes of one worker: a pass is two indexed deletes, and the
# log overshoots its row limit by at most this many rows per worker in between.
PRUNE_EVERY = 100


def _selection(
    prefix: str, last: int | None, since: str | None, model_version: str | None
) -> tuple[str, str, list[Any]]:
    """The WHERE and LIMIT clauses (and their arguments) that pick a monitoring window: rows at
    or after the ISO time `since`, of `model_version`, the latest `last` of those. `prefix` is
    the table alias ("p." or "")."""
    clauses: list[str] = []
    args: list[Any] = []
    if since is not None:
        clauses.append(f"{prefix}time >= ?")
        args.append(since)
    if model_version is not None:
        clauses.append(f"{prefix}model_version = ?")
        args.append(model_version)
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    if last is None:
        return where, "", args
    return where, "LIMIT ?", [*args, last]


class AuditLog:
    """Append predictions to, and read the latest from, one SQLite file.

    `max_rows` (0: no limit) and `retention_days` (0: kept for ever) bound what it keeps.
    """

    def __init__(self, path: Path, max_rows: int = 0, retention_days: float = 0.0) -> None:
        self.path = path
        self.max_rows = max_rows
        self.retention_days = retention_days
        self._since_prune = 0

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=_LOCK_TIMEOUT_S)
        deadline = time.monotonic() + _LOCK_TIMEOUT_S
        while True:
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                return conn
            except sqlite3.OperationalError as exc:
                # Turning a new file to WAL needs it to itself, and SQLite answers "locked" at
                # once (no busy wait) while another worker is creating the tables: wait here
                # as for any other lock.
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    conn.close()
                    raise
                time.sleep(0.02)

    def open(self) -> None:
        """Create the folder, the file and the table (idempotent)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = self._connect()
        try:
            with conn:
                # One migration at a time: gunicorn's workers open a new file together, and a
                # column check and its ALTER outside one write transaction let two of them add
                # the same column (the second fails, and so does its worker's boot).
                conn.execute("BEGIN IMMEDIATE")
                conn.execute(_SCHEMA)
                have = {row[1] for row in conn.execute("PRAGMA table_info(predictions)")}
                for name, kind in _ADDED:
                    if name not in have:
                        conn.execute(f"ALTER TABLE predictions ADD COLUMN {name} {kind}")
                conn.execute(
                    "CREATE UNIQUE INDEX IF NOT EXISTS predictions_id "
                    "ON predictions(prediction_id)"
                )
                conn.execute(_FEEDBACK)
                conn.execute(_REFUSALS)
                conn.execute("CREATE INDEX IF NOT EXISTS predictions_time ON predictions(time)")
        finally:
            conn.close()
        self.prune()

    def prune(self) -> int:
        """Delete what the retention settings no longer keep; returns the predictions deleted."""
        if not self.max_rows and not self.retention_days:
            return 0
        conn = self._connect()
        deleted = 0
        try:
            with conn:
                # Refused slices age out by the same rules as answered ones.
                for table in ("predictions", "refusals"):
                    if self.retention_days:
                        cutoff = datetime.now(UTC) - timedelta(days=self.retention_days)
                        gone = conn.execute(
                            f"DELETE FROM {table} WHERE time < ?",
                            (cutoff.isoformat(timespec="milliseconds"),),
                        ).rowcount
                        deleted += gone if table == "predictions" else 0
                    if self.max_rows:
                        gone = conn.execute(
                            f"DELETE FROM {table} WHERE id <= "
                            f"(SELECT id FROM {table} ORDER BY id DESC LIMIT 1 OFFSET ?)",
                            (self.max_rows,),
                        ).rowcount
                        deleted += gone if table == "predictions" else 0
                if deleted:
                    conn.execute(
                        "DELETE FROM feedback WHERE prediction_id NOT IN "
                        "(SELECT prediction_id FROM predictions WHERE prediction_id IS NOT NULL)"
                    )
        finally:
            conn.close()
        return deleted

    def record(
        self, endpoint: str, result: dict[str, Any], signals: dict[str, Any] | None = None
    ) -> None:
        """Store one prediction result as the service answered it, with its signals."""

        def flag(value: Any) -> int | None:
            return None if value is None else int(bool(value))

        row = (
            datetime.now(UTC).isoformat(timespec="milliseconds"),
            endpoint,
            result["input"]["sha256"],
            result["label"],
            json.dumps(result["probabilities"], sort_keys=True),
            flag(result["uncertainty"]["abstain"]),
            flag(result["ood"]["out_of_distribution"]),
            result["model"]["name"],
            str(result["model"]["version"]),
            result.get("id"),
            None if signals is None else json.dumps(signals, sort_keys=True),
        )
        conn = self._connect()
        try:
            with conn:
                conn.execute(
                    "INSERT INTO predictions (time, endpoint, sha256, label, probabilities, "
                    "abstain, out_of_distribution, model_name, model_version, prediction_id, "
                    "signals) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    row,
                )
        finally:
            conn.close()
        self._since_prune += 1
        if self._since_prune >= PRUNE_EVERY:
            self._since_prune = 0
            self.prune()

    def record_refusal(
        self,
        endpoint: str,
        sha256: str,
        reason: str,
        model: tuple[str, str],
        signals: dict[str, Any] | None = None,
    ) -> None:
        """Store one refused slice: the check's `reason`, the served model (name, version)."""
        row = (
            datetime.now(UTC).isoformat(timespec="milliseconds"),
            endpoint,
            sha256,
            reason,
            None if signals is None else json.dumps(signals, sort_keys=True),
            model[0],
            str(model[1]),
        )
        conn = self._connect()
        try:
            with conn:
                conn.execute(
                    "INSERT INTO refusals (time, endpoint, sha256, reason, signals, model_name, "
                    "model_version) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    row,
                )
        finally:
            conn.close()

    def refusals(
        self, last: int | None = None, since: str | None = None, model_version: str | None = None
    ) -> list[dict[str, Any]]:
        """Refused slices, oldest first, selected as `window` selects predictions."""
        where, limit, args = _selection("", last, since, model_version)
        have = self._query(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'refusals'"
        )
        if not have:  # a log written before refusals were recorded
            return []
        rows = self._query(f"SELECT * FROM refusals {where} ORDER BY id DESC {limit}", args)
        return [_decoded(row, {}) for row in reversed(rows)]

    def record_feedback(self, prediction_id: str, label: str) -> bool:
        """Store the true label of a served prediction (a later one replaces it); False when
        no prediction has that id."""
        conn = self._connect()
        try:
            with conn:
                known = conn.execute(
                    "SELECT 1 FROM predictions WHERE prediction_id = ?", (prediction_id,)
                ).fetchone()
                if known is None:
                    return False
                conn.execute(
                    "INSERT INTO feedback (prediction_id, label, time) VALUES (?, ?, ?) "
                    "ON CONFLICT(prediction_id) DO UPDATE SET label = excluded.label, "
                    "time = excluded.time",
                    (prediction_id, label, datetime.now(UTC).isoformat(timespec="milliseconds")),
                )
                return True
        finally:
            conn.close()

    def window(
        self, last: int | None = None, since: str | None = None, model_version: str | None = None
    ) -> list[dict[str, Any]]:
        """Predictions for the monitor, oldest first: the latest `last`, or those at or after
        the ISO time `since` (both: the latest `last` of those), with their true labels."""
        where, limit, args = _selection("p.", last, since, model_version)
        rows = self._query(
            "SELECT p.*, f.label AS true_label FROM predictions p "
            f"LEFT JOIN feedback f ON f.prediction_id = p.prediction_id {where} "
            f"ORDER BY p.id DESC {limit}",
            args,
        )
        return [_decoded(row, {}) for row in reversed(rows)]

    def latest(self, limit: int) -> list[dict[str, Any]]:
        """The newest `limit` rows, newest first."""
        rows = self._query("SELECT * FROM predictions ORDER BY id DESC LIMIT ?", (limit,))
        entries = []
        for row in rows:
            entry = _decoded(row, None)
            for key in ("abstain", "out_of_distribution"):
                if entry[key] is not None:
                    entry[key] = bool(entry[key])
            entries.append(entry)
        return entries

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        """The rows of one SELECT, on a connection of its own."""
        conn = self._connect()
        try:
            conn.row_factory = sqlite3.Row
            return conn.execute(sql, args).fetchall()
        finally:
            conn.close()


def _decoded(row: sqlite3.Row, no_signals: Any) -> dict[str, Any]:
    """A row as a dict with its JSON columns read (`no_signals` where none were stored)."""
    entry = dict(row)
    if "probabilities" in entry:
        entry["probabilities"] = json.loads(entry["probabilities"])
    entry["signals"] = json.loads(entry["signals"]) if entry.get("signals") else no_signals
    return entry
