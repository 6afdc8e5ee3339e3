"""Measured figures as files the docs site renders: docs/results/<name>.json.

Not a bench itself: the benches run as `python bench/<name>.py`, so this folder is on their
import path. A bench given `--record docs/results/<name>.json` writes its table there with the
date, the machine and the command; `python bench/docsgen.py` renders every such file into
docs/generated/<name>.md, which the docs pages include. Figures that no script here can measure
again (a run on the real dataset, a run before a change) are kept in the same format with
`"source": "run log"` and the date and machine of that run.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results"
GENERATED = REPO / "docs" / "generated"
REQUIRED = ("title", "measured", "machine", "command", "source", "columns", "rows")


def machine() -> str:
    """Cores, CPU model, memory and the load average now, as one line."""
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [
            line.split(":", 1)[1].strip()
            for line in cpuinfo.read_text(encoding="utf-8").splitlines()
            if line.startswith("model name")
        ]
        model = names[0] if names else model
    memory = ""
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        kib = int(meminfo.read_text(encoding="utf-8").split()[1])
        memory = f", {kib / 2**20:.0f} GiB"
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{os.cpu_count()} cores ({model}){memory}; load average {load} (1, 5, 15 min)"


THREAD_VARIABLES = ("OMP_NUM_THREADS", "TF_NUM_INTEROP_THREADS", "TF_NUM_INTRAOP_THREADS")


def threads_prefix() -> str:
    """The thread-pool settings of this process's environment, as a command prefix: they move
    timings, so a recorded command names them."""
    return "".join(f"{k}={os.environ[k]} " for k in THREAD_VARIABLES if k in os.environ)


def write_result(
    path: Path,
    title: str,
    columns: list[str],
    rows: list[list[str]],
    note: str = "",
    command: str | None = None,
) -> Path:
    """Write one measured table to `path` (atomically), dated, with this machine and command."""
    if len({len(columns), *map(len, rows)}) != 1:
        raise ValueError(f"{path.name}: every row needs {len(columns)} cells")
    record = {
        "title": title,
        "measured": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "command": command or threads_prefix() + "python " + shlex.join(sys.argv),
        "source": "script",
        "columns": columns,
        "rows": [[str(cell) for cell in row] for row in rows],
        "note": note,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def read_result(path: Path) -> dict:
    """One results file, checked for the fields the rendered table needs."""
    record = json.loads(path.read_text(encoding="utf-8"))
    missing = [key for key in REQUIRED if not record.get(key)]
    if missing:
        raise ValueError(
            f"{path}: missing {', '.join(missing)} (every figure needs its date, "
            "machine and command)"
        )
    if record["source"] not in ("script", "run log"):
        raise ValueError(f"{path}: source must be 'script' or 'run log', not {record['source']!r}")
    width = len(record["columns"])
    for row in record["rows"]:
        if len(row) != width:
            raise ValueError(f"{path}: a row has {len(row)} cells, the header {width}: {row}")
    return record


def render(record: dict, name: str) -> str:
    """The Markdown a docs page includes: the table, then when, where and how it was measured."""

    def cells(row: list[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |"

    lines = [cells(record["columns"]), "|" + "---|" * len(record["columns"])]
    lines += [cells(row) for row in record["rows"]]
    how = "measured" if record["source"] == "script" else "from the run log"
    lines += [
        "",
        f"*{record['title']}: {how} {record['measured']} on {record['machine']}, with "
        f"`{record['command']}` (docs/results/{name}.json).*",
    ]
    if record.get("note"):
        lines += ["", record["note"]]
    return "\n".join(lines) + "\n"
