"""validate: check the split dataset before any model sees it, and hand on clean manifests.

The checks, their default severities and the report live in chestct.data.checks and
chestct.data.check_report; chestct.data.validation builds the frame they run on (the split
manifests with the resize index and ingest's acquisition cues) and applies quarantine; this stage
reads the inputs, writes the report and its pictures, and fails by `validate.fail_on`.

`validate.quarantine: true` leaves the files that a warning or error names out of the
downstream manifests (the source is never touched; `quarantine.csv` lists them and why); a
finding whose files are all quarantined no longer counts towards `validate.fail_on`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from chestct.data.check_report import QUARANTINE_COLUMNS, Report, fails
from chestct.data.checks import ChecksError
from chestct.data.content_checks import novelty_frame
from chestct.data.manifest import (
    ACQUISITION_COLUMNS,
    INDEX_COLUMNS,
    INGEST_COLUMNS,
    SPLITS,
    read_manifest,
    write_manifest,
)
from chestct.data.shortcuts import PIXEL_FEATURES
from chestct.data.validation import validate_splits
from chestct.evaluation.plots import (
    plot_cues_by_class,
    plot_examples,
    plot_novelty,
    plot_size_by_class,
)
from chestct.fsutil import atomic_write_json, atomic_write_text
from chestct.pointers import read_pointer
from chestct.runner import StageFailed, StageSession, run_main, stage_session, stops_stage

log = logging.getLogger(__name__)


# The stage's work: chestct.data.validation.validate_splits (per-split datasets, decodable and
# not quarantined, and the report); misconfigured checks (ChecksError) stop the stage.
run_validate = stops_stage(ChecksError)(validate_splits)


def write_pictures(report: Report, out_dir: Path, root: Path) -> dict[str, str]:
    """Montages of example files per finding, the size-by-class plot when the shortcut check
    fires and the acquisition cues by class when acquisition_shortcut does; returns name ->
    picture path relative to `out_dir` (also set on the report)."""
    pictures: dict[str, str] = {}
    folder = out_dir / "examples"
    for number, finding in enumerate(report.findings, start=1):
        groups = [g for g in finding.examples if g][:6]
        if not groups:
            continue
        target = folder / f"{number:02d}_{finding.check}.png"
        plot_examples(groups, root, f"{finding.check}: examples (one row per group)", target)
        finding.picture = target.relative_to(out_dir).as_posix()
        pictures[target.stem] = finding.picture
    meta = report.metadata
    if any(f.check == "shortcut" for f in report.findings) and meta is not None and len(meta):
        target = folder / "shortcut.png"
        plot_size_by_class(meta, target)
        pictures["shortcut"] = target.relative_to(out_dir).as_posix()
    fired = any(f.check == "acquisition_shortcut" for f in report.findings)
    if fired and meta is not None and all(c in meta.columns for c in PIXEL_FEATURES):
        target = folder / "acquisition.png"
        plot_cues_by_class(meta, PIXEL_FEATURES, target)
        pictures["acquisition"] = target.relative_to(out_dir).as_posix()
    report.pictures = pictures
    return pictures


def main() -> None:
    with stage_session("validate") as session:
        s = session.settings
        ingest = read_pointer(s.paths, "ingest", verify=False)
        split = read_pointer(s.paths, "split")
        resize = read_pointer(s.paths, "resize")
        manifests = {
            n: read_manifest(split.output_path(n, s.paths.root), INGEST_COLUMNS) for n in SPLITS
        }
        index = read_manifest(resize.output_path("index", s.paths.root), INDEX_COLUMNS)
        skipped = list(ingest.details.get("skipped", []))
        acquisition = None
        if "acquisition" in ingest.outputs:
            acquisition = read_manifest(
                ingest.output_path("acquisition", s.paths.root), ACQUISITION_COLUMNS
            )
        datasets, report = run_validate(
            manifests,
            index,
            s.params.validate,
            seed=s.params.base.seed,
            skipped=skipped,
            acquisition=acquisition,
            root=s.paths.root,
            near_copy_similarity=s.params.base.near_copy_similarity,
        )
        out = session.out_dir
        quarantine_path = _write_report(session, report, s.params.base.near_copy_similarity)
        if fails(report, s.params.validate.fail_on):
            raise StageFailed(_failure(report, out))
        outputs: dict[str, Path] = {"report": out / "report.json", "quarantine": quarantine_path}
        for name, frame in datasets.items():
            outputs[name] = out / f"{name}.csv"
            write_manifest(outputs[name], frame)
        session.finish(
            inputs=["ingest", "split", "resize"],
            outputs=outputs,
            metrics={
                "status": report.worst,
                "findings": len(report.findings),
                "quarantined": len(report.quarantined),
                **{f"{n}_images": len(d) for n, d in datasets.items()},
                **{k: v for k, v in report.summary.items() if isinstance(v, int)},
                **({"shortcut_score": report.shortcut["score"]} if report.shortcut else {}),
                **(
                    {"acquisition_shortcut_score": report.shortcut["pixels"]}
                    if report.shortcut and report.shortcut["pixels"] is not None
                    else {}
                ),
            },
            details={"checks": sorted({f.check for f in report.findings})},
        )


def _write_report(session: StageSession, report: Report, near_copy_similarity: float) -> Path:
    """report.json, report.md, its pictures and quarantine.csv, logged; the findings go to the
    stage log at their severity. Returns quarantine.csv's path."""
    out, root = session.out_dir, session.settings.paths.root
    write_pictures(report, out, root)
    if report.novelty_values:
        # After write_pictures, which sets the report's pictures afresh.
        write_manifest(out / "novelty.csv", novelty_frame(report.novelty_values))
        plot_novelty(report.novelty_values, near_copy_similarity, out / "novelty.png")
        report.pictures["novelty"] = "novelty.png"
    atomic_write_json(out / "report.json", report.to_dict())
    atomic_write_text(out / "report.md", report.to_markdown())
    quarantine_path = out / "quarantine.csv"
    write_manifest(
        quarantine_path, pd.DataFrame(report.quarantined, columns=list(QUARANTINE_COLUMNS))
    )
    session.log_artifact(out / "report.md")
    for picture in report.pictures.values():
        session.log_artifact(out / picture, "examples")
    for f in report.findings:
        level = {"error": logging.ERROR, "warning": logging.WARNING}.get(f.severity, logging.INFO)
        log.log(level, "%s %s: %s", f.severity, f.check, f.message)
    return quarantine_path


def _failure(report: Report, out: Path) -> str:
    """Why validation stops the stage: the worst unresolved findings, and what to do."""
    worst = [f for f in report.findings if f.severity == report.worst and not f.resolved]
    named = "; ".join(
        f"{f.check}: {f.message}" + (f" (e.g. {', '.join(f.files[:3])})" if f.files else "")
        for f in worst
    )
    return (
        f"data validation found {report.worst}s: {named}. See {out / 'report.md'}; "
        "fix the data, set validate.quarantine: true to leave such files out, or set "
        "validate.fail_on in params.yaml"
    )


if __name__ == "__main__":
    run_main("validate", main)
