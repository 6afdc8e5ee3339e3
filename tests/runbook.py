"""The README's runbook blocks, as the tests run them.

A block is the fenced ```bash block right after a `<!-- runbook: NAME -->` line in README.md.
Tests run it verbatim with bash (errexit, pipefail), the variable parts coming from the
environment, so that the commands a user copies are the commands the tests ran.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_BLOCK = re.compile(r"<!-- runbook: ([\w-]+) -->\s*\n```bash\n(.*?)\n```", re.DOTALL)


def blocks(readme: Path = REPO / "README.md") -> dict[str, str]:
    """{name: commands} of every runbook block in the README."""
    found: dict[str, str] = {}
    for name, body in _BLOCK.findall(readme.read_text(encoding="utf-8")):
        assert name not in found, f"README has two runbook blocks named {name!r}"
        found[name] = body
    return found


def run_block(
    name: str, cwd: Path, env: dict[str, str], timeout_s: float = 900
) -> subprocess.CompletedProcess:
    """Run README runbook block `name` in `cwd`; fail the test with its output on error."""
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
        f"README runbook {name!r} failed ({proc.returncode}):\n{script}\n"
        f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"
    )
    return proc


README = REPO / "README.md"


_HEADING_OR_BLOCK = re.compile(r"^(?P<h>#{2,3} [^\n]*)$|^```bash\n(?P<b>.*?)^```", re.S | re.M)


def normalise(line: str) -> str:
    """A command as the registry spells it: no trailing comment, single spaces."""
    line = re.sub(r"\s+#\s.*$", "", line).strip()
    return re.sub(r"\s+", " ", line)


def readme_commands(section: str | None = None) -> list[tuple[str, str]]:
    """(heading, command) for every command line of the README's bash blocks, in order.

    Args:
        section: only blocks under a heading that starts with this text (e.g. "## Quick start",
            "### Dry runs"); sub-headings of a `##` section count as part of it.
    """
    text = README.read_text(encoding="utf-8")
    found: list[tuple[str, str]] = []
    heading, top = "", ""
    for match in _HEADING_OR_BLOCK.finditer(text):
        if match.group("h"):
            heading = match.group("h")
            if heading.startswith("## "):
                top = heading
            continue
        if section is not None and not (
            heading.startswith(section) or (section.startswith("## ") and top.startswith(section))
        ):
            continue
        for line in match.group("b").replace("\\\n", " ").splitlines():
            command = normalise(line)
            if command and not command.startswith("#"):
                found.append((heading, command))
    return found
