"""The commands of README.md and the docs site (docs/*.md), as the tests run them.

A runbook block is the fenced ```bash block right after a `<!-- runbook: NAME -->` line in
README.md or a docs page. Tests run it verbatim with bash (errexit, pipefail), the variable parts
coming from the environment, so that the commands a user copies are the commands the tests ran.

Headings: a docs page is what a `##` section of README.md was before the docs site, so a page's
headings are read one level deeper (its `# Serving` title is `## Serving`, its `## Training` is
`### Training`). `readme_commands("## Serving")` therefore finds the Serving page's commands,
wherever the page lives.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"
_RUNBOOK = re.compile(r"<!-- runbook: ([\w-]+) -->\s*$")
_HEADING = re.compile(r"^(#{1,6}) (.+?)\s*$")


def doc_files() -> list[Path]:
    """README.md first, then every Markdown page of the docs site (generated tables aside)."""
    pages = sorted(p for p in DOCS.rglob("*.md") if "generated" not in p.relative_to(DOCS).parts)
    return [README, *pages]


def _parse(path: Path) -> tuple[list[tuple[str, str, str]], dict[str, str]]:
    """([(heading, top heading, bash block)], {runbook name: block}) of one Markdown file."""
    deeper = 0 if path == README else 1
    found: list[tuple[str, str, str]] = []
    runbooks: dict[str, str] = {}
    heading = top = ""
    pending: str | None = None
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
            assert end is not None, f"{path}: unclosed code fence at line {i + 1}"
            if line.strip() == "```bash":
                body = "\n".join(lines[i + 1 : end])
                found.append((heading, top, body))
                if pending is not None:
                    assert pending not in runbooks, f"{path} has two runbook blocks {pending!r}"
                    runbooks[pending] = body
            pending = None
            i = end + 1
            continue
        marker = _RUNBOOK.match(line.strip())
        if marker:
            pending = marker.group(1)
        elif line.strip():
            pending = None
        match = _HEADING.match(line)
        if match:
            heading = "#" * (len(match.group(1)) + deeper) + " " + match.group(2)
            if heading.startswith("## "):
                top = heading
        i += 1
    return found, runbooks


def blocks(readme: Path | None = None) -> dict[str, str]:
    """{name: commands} of every runbook block in README.md and the docs pages (or one file)."""
    found: dict[str, str] = {}
    for path in [readme] if readme is not None else doc_files():
        for name, body in _parse(path)[1].items():
            assert name not in found, f"two runbook blocks are named {name!r}"
            found[name] = body
    return found


def run_block(
    name: str, cwd: Path, env: dict[str, str], timeout_s: float = 900
) -> subprocess.CompletedProcess:
    """Run runbook block `name` in `cwd`; fail the test with its output on error."""
    script = blocks()[name]
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    assert proc.returncode == 0, (
        f"runbook {name!r} failed ({proc.returncode}):\n{script}\n"
        f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"
    )
    return proc


def normalise(line: str) -> str:
    """A command as the registry spells it: no trailing comment, single spaces."""
    line = re.sub(r"\s+#\s.*$", "", line).strip()
    return re.sub(r"\s+", " ", line)


def doc_commands(section: str | None = None) -> list[tuple[Path, str, str]]:
    """(file, heading, command) for every command line of the bash blocks, in order.

    Args:
        section: only blocks under a heading that starts with this text (e.g. "## Quick start",
            "### Dry runs"), headings of docs pages read one level deeper; sub-headings of a `##`
            section (or of a docs page's title) count as part of it.
    """
    found: list[tuple[Path, str, str]] = []
    for path in doc_files():
        for heading, top, body in _parse(path)[0]:
            if section is not None and not (
                heading.startswith(section)
                or (section.startswith("## ") and top.startswith(section))
            ):
                continue
            for line in body.replace("\\\n", " ").splitlines():
                command = normalise(line)
                if command and not command.startswith("#"):
                    found.append((path, heading, command))
    return found


def readme_commands(section: str | None = None) -> list[tuple[str, str]]:
    """(heading, command) of `doc_commands(section)`: README.md and the docs pages."""
    return [(heading, command) for _, heading, command in doc_commands(section)]
