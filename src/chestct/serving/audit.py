"""The audit log of predictions: SQLite, off by default, and never any pixels.

A row holds the input's sha256, the label, the probabilities, the model's name and version,
and the UTC time. Several gunicorn workers write to one file: WAL mode lets them, and each
write opens its own short connection so that no connection crosses a thread or a fork.
"""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime
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


class AuditLog:
    """Append predictions to, and read the latest from, one SQLite file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=5.0)
        conn.execute("PRAGMA journal_mode=WAL")
        return conn

    def open(self) -> None:
        """Create the folder, the file and the table (idempotent)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as conn:
            conn.execute(_SCHEMA)
        conn.close()

    def record(self, endpoint: str, result: dict[str, Any]) -> None:
        """Store one prediction result as the service answered it."""

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
        )
        conn = self._connect()
        try:
            with conn:
                conn.execute(
                    "INSERT INTO predictions (time, endpoint, sha256, label, probabilities, "
                    "abstain, out_of_distribution, model_name, model_version) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    row,
                )
        finally:
            conn.close()

    def latest(self, limit: int) -> list[dict[str, Any]]:
        """The newest `limit` rows, newest first."""
        conn = self._connect()
        try:
            conn.row_factory = sqlite3.Row
            rows = conn.execute(
                "SELECT * FROM predictions ORDER BY id DESC LIMIT ?", (limit,)
            ).fetchall()
        finally:
            conn.close()
        entries = []
        for row in rows:
            entry = dict(row)
            entry["probabilities"] = json.loads(entry["probabilities"])
            for key in ("abstain", "out_of_distribution"):
                if entry[key] is not None:
                    entry[key] = bool(entry[key])
            entries.append(entry)
        return entries
