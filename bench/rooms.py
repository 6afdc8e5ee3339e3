"""The rooms of src/chestct side by side: size, imports between rooms, and change coupling.

    python bench/rooms.py [--record docs/results/rooms.json]

For each room (a subpackage, or a top-level module of the core): modules, lines, the largest
module and longest function, the imports it makes into other rooms and receives from them (read
with ast, lazy imports included), and how many commits of the git history touched it. Change
coupling follows files through renames (`git log -M`): for each pair of rooms, the commits that
touched both, as a share of the commits that touched the smaller of the two. A good cut keeps
most work inside one room; what crosses should be a stage (a shell over the rooms) or the core.
"""

from __future__ import annotations

import argparse
import ast
import collections
import itertools
import subprocess
import sys
from pathlib import Path

from results import REPO, write_result

PACKAGE = REPO / "src" / "chestct"
sys.path.insert(0, str(REPO / "tests" / "unit"))
from test_architecture import FLOORS, imports_of  # noqa: E402


def room_of(path: str) -> str | None:
    """The room of a repository path under src/chestct, or None."""
    prefix = "src/chestct/"
    if not path.startswith(prefix) or not path.endswith(".py"):
        return None
    first = path[len(prefix) :].split("/")[0]
    return first.removesuffix(".py") if first != "__init__.py" else None


def current_names() -> dict[str, str]:
    """Every path the history holds -> the path it has now (renames followed back)."""
    log = subprocess.run(
        ["git", "log", "-M", "--name-status", "--format=@@%H"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    now: dict[str, str] = {}
    for line in log.splitlines():
        fields = line.split("\t")
        if fields[0].startswith("R") and len(fields) == 3:
            old, new = fields[1], fields[2]
            now[old] = now.get(new, new)
    return now


def commits_by_room() -> list[set[str]]:
    """The rooms each commit touched, with its files named as they are now."""
    now = current_names()
    log = subprocess.run(
        ["git", "log", "--no-merges", "--no-renames", "--name-only", "--format=@@%H"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    commits: list[set[str]] = []
    for line in log.splitlines():
        if line.startswith("@@"):
            commits.append(set())
        elif line.strip() and commits:
            room = room_of(now.get(line.strip(), line.strip()))
            if room in FLOORS:
                commits[-1].add(room)
    return [c for c in commits if c]


def longest_function(path: Path) -> int:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    spans = [
        n.end_lineno - n.lineno + 1
        for n in ast.walk(tree)
        if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
    ]
    return max(spans, default=0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", type=Path, help="write the table to this results file")
    args = parser.parse_args()
    files: dict[str, list[Path]] = collections.defaultdict(list)
    for path in sorted(PACKAGE.rglob("*.py")):
        room = room_of(path.relative_to(REPO).as_posix())
        if room:
            files[room].append(path)
    out_edges: dict[str, set[str]] = collections.defaultdict(set)
    into: collections.Counter[str] = collections.Counter()
    for room, paths in files.items():
        for path in paths:
            for target in imports_of(path, PACKAGE):
                other = target.split(".")[1] if target.startswith("chestct.") else None
                if other in FLOORS and other != room and other not in out_edges[room]:
                    out_edges[room].add(other)
                    into[other] += 1
    commits = commits_by_room()
    touched = collections.Counter(r for c in commits for r in c)
    rows = []
    for room in sorted(files, key=lambda r: (FLOORS[r], r)):
        paths = files[room]
        lines = {p: len(p.read_text(encoding="utf-8").splitlines()) for p in paths}
        largest = max(lines, key=lambda p: lines[p])
        rows.append([
            room, str(FLOORS[room]), str(len(paths)), str(sum(lines.values())),
            f"{largest.relative_to(PACKAGE)} ({lines[largest]})",
            str(max(longest_function(p) for p in paths)),
            ", ".join(sorted(out_edges[room])) or "-", str(into[room]), str(touched[room]),
        ])  # fmt: skip
    pairs = collections.Counter(
        pair for c in commits for pair in itertools.combinations(sorted(c), 2)
    )
    library = [r for r in files if FLOORS[r] < FLOORS["cli"] and r in touched]
    coupled = [
        f"{a}+{b} {n} ({n / min(touched[a], touched[b]):.0%})"
        for (a, b), n in pairs.most_common()
        if a in library and b in library and (len(files[a]) > 1 or len(files[b]) > 1)
    ][:8]
    columns = [
        "room", "floor", "modules", "lines", "largest module (lines)", "longest function",
        "imports rooms", "imported by rooms", "commits touching it",
    ]  # fmt: skip
    note = (
        f"{len(commits)} commits touched src/chestct. Library room pairs changed together most "
        f"often (commits, share of the smaller room's): {'; '.join(coupled)}."
    )
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    for row in [columns, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
    print(note)
    if args.record:
        write_result(args.record, "The rooms of src/chestct: size, imports, change", columns,
                     rows, note)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
