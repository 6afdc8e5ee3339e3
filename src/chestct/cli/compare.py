"""Compare two models side by side: `python -m chestct.cli.compare A B`.

A and B are MLflow run ids, registered versions of the model (`3`) or aliases (`champion`,
`challenger`). A version or alias leads to the promote run that registered it; every run leads
to the runs of the stages behind it through its `chestct.run.<stage>` tags, so the table shows
the params of every stage (train, base_model, ...) and the metrics of every stage, prefixed by
the stage, with B − A for numbers. The first rows after the models' identities hold each model
against the nearest-neighbour memorizer on its test split (chestct.evaluation.novelty): the
memorizer's
figure, how far the model is above it, overall and on the novel part.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

ALIASES = ("champion", "challenger")


class CompareError(RuntimeError):
    """A reference cannot be resolved; the message says which and what to pass instead."""


@dataclass
class Side:
    """One model as the table shows it."""

    ref: str
    run_id: str
    info: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


def _looks_like_run_id(ref: str) -> bool:
    return len(ref) == 32 and all(c in "0123456789abcdef" for c in ref.lower())


def resolve(client: Any, ref: str, model_name: str) -> Side:
    """Find the run behind `ref` and gather params and metrics of its stage runs."""
    from mlflow.exceptions import MlflowException

    info: dict[str, str] = {}
    tags: dict[str, str] = {}
    try:
        if ref in ALIASES or ref.isdigit():
            version = (
                client.get_model_version_by_alias(model_name, ref)
                if ref in ALIASES
                else client.get_model_version(model_name, ref)
            )
            info["version"] = str(version.version)
            run_id = version.run_id
            tags.update(version.tags or {})
        elif _looks_like_run_id(ref):
            run_id = ref
        else:
            raise CompareError(
                f"{ref!r} is neither a run id (32 hex digits), a version number nor one of "
                f"{', '.join(ALIASES)}"
            )
        run = client.get_run(run_id)
    except MlflowException as exc:
        what = (
            f"alias {ref!r} of model {model_name!r}"
            if ref in ALIASES
            else f"version {ref} of model {model_name!r}"
            if ref.isdigit()
            else f"run {ref}"
        )
        raise CompareError(
            f"{what} not found in the tracking store ({exc.message.splitlines()[0]}); list "
            "them in `mlflow ui` or pass --model for another registered model"
        ) from None
    tags = {**run.data.tags, **tags}
    side = Side(ref=ref, run_id=run_id, info=info)
    side.info.update(
        {
            "run": run_id,
            "stage": tags.get("chestct.stage", ""),
            "dvc exp": tags.get("dvc.exp_name", ""),
            "git sha": tags.get("git.sha", "")[:12],
            "decision": tags.get("chestct.decision", ""),
        }
    )
    stage_runs = {run.data.tags.get("chestct.stage", "run"): run}
    for key, value in sorted(tags.items()):
        if key.startswith("chestct.run.") and value != run_id:
            stage = key.removeprefix("chestct.run.")
            try:
                stage_runs[stage] = client.get_run(value)
            except MlflowException:
                side.info[f"missing {stage} run"] = value
    for stage, stage_run in sorted(stage_runs.items()):
        side.params.update(stage_run.data.params)
        side.metrics.update({f"{stage}.{k}": v for k, v in stage_run.data.metrics.items()})
    return side


def _number(text: str | float | None) -> float | None:
    try:
        value = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


# evaluate's metrics that hold a model against the memorizer, in the order the table shows them.
MEMORIZER_ROWS = (
    *(
        f"evaluate.{key}"
        for metric in ("macro_f1", "balanced_accuracy", "accuracy")
        for key in (
            f"baseline.nearest_neighbour.{metric}",
            f"baseline.model_above.{metric}",
            f"novel.{metric}",
            f"novel.baseline.nearest_neighbour.{metric}",
        )
    ),
    "evaluate.near_copy_share",
)


def rows(a: Side, b: Side, changed_only: bool = False) -> list[tuple[str, str, str, str, str]]:
    """Table rows (section, key, A, B, delta); delta is B − A where both are numbers."""
    out: list[tuple[str, str, str, str, str]] = []
    for key in dict.fromkeys([*a.info, *b.info]):
        out.append(("model", key, _fmt(a.info.get(key)), _fmt(b.info.get(key)), ""))
    for key in MEMORIZER_ROWS:
        na, nb = _number(a.metrics.get(key)), _number(b.metrics.get(key))
        if na is None and nb is None:
            continue
        delta = f"{nb - na:+.6g}" if na is not None and nb is not None else ""
        name = key.removeprefix("evaluate.")
        out.append(("memorizer", name, _fmt(na), _fmt(nb), delta))
    for section, left, right in (("param", a.params, b.params), ("metric", a.metrics, b.metrics)):
        for key in sorted(set(left) | set(right)):
            va, vb = left.get(key), right.get(key)
            if changed_only and va == vb:
                continue
            na, nb = _number(va), _number(vb)
            delta = ""
            if na is not None and nb is not None and (section == "metric" or na != nb):
                delta = f"{nb - na:+.6g}"
            elif va != vb:
                delta = "≠"
            out.append((section, key, _fmt(va), _fmt(vb), delta))
    return out


def render(table: Sequence[tuple[str, ...]], a: str, b: str) -> str:
    """A plain text table with a header line; long values are cut to keep columns readable."""
    header = ("", "key", f"A: {a}", f"B: {b}", "B − A")
    cut = [tuple(v if len(v) <= 40 else v[:39] + "…" for v in row) for row in table]
    widths = [max(len(r[i]) for r in [header, *cut]) for i in range(len(header))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(header, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in cut]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m chestct.cli.compare`."""
    parser = argparse.ArgumentParser(
        prog="python -m chestct.cli.compare",
        description="Params and metrics of two models side by side, with B − A.",
    )
    parser.add_argument("a", help="run id, registered version (e.g. 3), champion or challenger")
    parser.add_argument("b", help="the same kinds as A")
    parser.add_argument(
        "--model", help="registered model name (default: promote.registered_model)"
    )
    parser.add_argument("--changed", action="store_true", help="show only rows that differ")
    args = parser.parse_args(argv)

    from chestct.settings import SettingsError, load_settings
    from chestct.tracking import TrackingError, check_store, quiet_environment

    quiet_environment()
    try:
        settings = load_settings()
        uri = settings.tracking_uri
        check_store(uri, settings.config.tracking.connect_timeout_s)
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        name = args.model or settings.params.promote.registered_model
        a, b = resolve(client, args.a, name), resolve(client, args.b, name)
    except (SettingsError, TrackingError, CompareError) as exc:
        print(f"chestct compare: {exc}", file=sys.stderr)
        return 1
    print(render(rows(a, b, args.changed), args.a, args.b))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
