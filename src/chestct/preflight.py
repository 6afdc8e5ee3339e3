"""Check what a stage would check, before DVC runs it: `python -m chestct.preflight`.

DVC deletes a stage's outputs before it runs the stage's command, so a stage that then stops on
a params typo or an unreachable tracking server has already lost its previous outputs.
`make run` and `make repro` run this first: every params group and config/config.yaml are
validated (a stage validates all of them too, so a typo anywhere would stop any stage) and the
tracking store is reached, and only then is `dvc repro` started. On a problem it prints the
same message the stage would, once, and exits 1 with `artifacts/` untouched.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from chestct.settings import SettingsError, load_settings
from chestct.tracking import TrackingError, check_store


def preflight(root: Path | None = None) -> str:
    """Validate settings and reach the tracking store; returns a one-line summary.

    Raises:
        SettingsError: a wrong key or value in params.yaml or config/config.yaml.
        TrackingError: the tracking store cannot be reached or used.
    """
    settings = load_settings(root)
    uri = settings.tracking_uri
    check_store(uri, settings.config.tracking.connect_timeout_s)
    return f"params.yaml and config/config.yaml are valid; tracking store {uri} answers"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Validate params, config and the tracking store before `dvc repro`."
    )
    parser.add_argument("--quiet", action="store_true", help="print nothing when all is well")
    args = parser.parse_args(argv)
    try:
        summary = preflight()
    except (SettingsError, TrackingError) as exc:
        print(f"chestct preflight: {exc}", file=sys.stderr)
        print("chestct preflight: nothing was run; artifacts/ is as it was", file=sys.stderr)
        raise SystemExit(1) from None
    if not args.quiet:
        print(f"chestct preflight: {summary}")


if __name__ == "__main__":
    main()
