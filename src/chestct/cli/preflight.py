"""Check what a stage would check, before DVC runs it: `python -m chestct.cli.preflight`.

DVC deletes a stage's outputs before it runs the stage's command, so a stage that then stops on
a params typo or an unreachable tracking server has already lost its previous outputs.
`make run` and `make repro` run this first: every params group and config/config.yaml are
validated (a stage validates all of them too, so a typo anywhere would stop any stage) and the
tracking store is reached, and only then is `dvc repro` started. Given `dvc repro`'s own
arguments, a single-stage run (`-s train`) also needs the pointers of the stages before it,
which DVC will not rerun: they must exist and match their outputs. On a problem it prints the
same message the stage would, once, and exits 1 with `artifacts/` untouched.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from chestct.cli.plan import PlanError, upstream_graph
from chestct.cpu import CpuError, mode, portability_note
from chestct.pointers import PointerError, read_pointer
from chestct.settings import SettingsError, load_settings
from chestct.tracking import TrackingError, check_store


def preflight(root: Path | None = None, single: tuple[str, ...] = ()) -> str:
    """Validate settings, reach the tracking store and, for `single` stages, their inputs.

    Args:
        root: the project root (default: found from the working directory).
        single: stages to be run alone (`dvc repro -s`): their upstream pointers must verify.

    Returns:
        A one-line summary.

    Raises:
        SettingsError: a wrong key or value in params.yaml or config/config.yaml.
        TrackingError: the tracking store cannot be reached or used.
        PointerError: an upstream pointer of a `single` stage is missing or stale.
    """
    settings = load_settings(root)
    mode()  # CHESTCT_CPU must name a mode: every stage would stop on it
    uri = settings.tracking_uri
    check_store(uri, settings.config.tracking.connect_timeout_s)
    summary = f"params.yaml and config/config.yaml are valid; tracking store {uri} answers"
    if single:
        try:
            graph = upstream_graph(settings.paths.root / "dvc.yaml")
        except PlanError as exc:
            raise SettingsError(str(exc)) from None
        for stage in single:
            if stage not in graph:
                raise SettingsError(f"no stage {stage!r} in dvc.yaml; stages: {', '.join(graph)}")
            for upstream in sorted(graph[stage]):
                read_pointer(settings.paths, upstream)
        summary += f"; the inputs of {', '.join(single)} are in place"
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Validate params, config and the tracking store before `dvc repro`."
    )
    parser.add_argument("--quiet", action="store_true", help="print nothing when all is well")
    # `make repro ARGS=…` passes dvc repro's arguments here too; only -s and targets matter.
    parser.add_argument("-s", "--single-item", action="store_true")
    parser.add_argument("targets", nargs="*")
    args, _ = parser.parse_known_args(argv)
    single = tuple(args.targets) if args.single_item else ()
    try:
        summary = preflight(single=single)
    except (SettingsError, TrackingError, PointerError, CpuError) as exc:
        print(f"chestct preflight: {exc}", file=sys.stderr)
        print("chestct preflight: nothing was run; artifacts/ is as it was", file=sys.stderr)
        raise SystemExit(1) from None
    if not args.quiet:
        print(f"chestct preflight: {summary}")
        # Whether this machine's outputs can match a dvc.lock made elsewhere.
        print(f"chestct preflight: {portability_note()}")


if __name__ == "__main__":
    main()
