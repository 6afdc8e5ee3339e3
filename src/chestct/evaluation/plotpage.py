"""The page template of `dvc plots show`, with the Vega scripts inside it: no network at view
time. `python -m chestct.evaluation.plotpage NODE_MODULES OUT` (run by `make venv`).

dvc-render's own page loads vega, vega-lite and vega-embed from a CDN, so its charts stay blank
offline. `npm ci` installs the versions config/plots/package-lock.json pins into
config/plots/node_modules/ (git-ignored); this writes them, inlined, into a template that
.dvc/config names (`plots.html_template`). The template has no `{scripts}` placeholder, where
dvc-render would put its CDN tags, so the page never asks the network for anything.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from chestct.fsutil import atomic_write_text

# Under node_modules/, in the order a page must load them.
SCRIPTS = (
    "vega/build/vega.min.js",
    "vega-lite/build/vega-lite.min.js",
    "vega-embed/build/vega-embed.min.js",
)

PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>chestct plots</title>
{inline_scripts}
    <style>
        table { border-spacing: 15px; }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


class PlotPageError(RuntimeError):
    """A Vega script is missing: the npm packages were not installed."""


def build_template(node_modules: Path) -> str:
    """The template text: dvc-render's placeholders {plot_divs} and {refresh_tag}, scripts
    inlined (a `</script>` inside a script is escaped so that it cannot end the tag)."""
    parts = []
    for relative in SCRIPTS:
        path = node_modules / relative
        if not path.is_file():
            raise PlotPageError(
                f"{path} not found; install the scripts with `npm ci --prefix config/plots` "
                "(make venv does)"
            )
        code = path.read_text(encoding="utf-8").replace("</script", "<\\/script")
        parts.append(f"    <script>/* {relative} */\n{code}\n    </script>")
    return PAGE.replace("{inline_scripts}", "\n".join(parts))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write dvc plots' offline page template.")
    parser.add_argument("node_modules", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    try:
        text = build_template(args.node_modules)
    except PlotPageError as exc:
        print(f"chestct plotpage: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, text)
    print(f"chestct plotpage: wrote {args.out} ({len(text) // 1024} KiB, scripts inlined)")


if __name__ == "__main__":
    main()
