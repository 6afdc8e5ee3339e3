"""What `dvc repro` would rerun, without running anything: `make plan` / `python -m
chestct.cli.plan`.

`dvc status` and `dvc repro --dry` name only the stages whose own deps, params or outputs
changed: after a params change in `train` they list train alone, although evaluate and promote
read train's outputs and will run after it. This adds every stage downstream of an out-of-date
one, from the DAG in dvc.yaml, and says why each is on the list. DVC still decides what runs
(a downstream stage is skipped when its inputs come out byte-identical); nothing here caches.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from graphlib import TopologicalSorter
from pathlib import Path
from typing import Any

import yaml

from chestct.settings import find_root


class PlanError(RuntimeError):
    """dvc.yaml or `dvc status` could not be read; the message says what to do."""


@dataclass(frozen=True)
class PlannedStage:
    stage: str
    reasons: tuple[str, ...]  # its own changes, as `dvc status` reports them
    after: tuple[str, ...]  # out-of-date upstream stages that make it run

    @property
    def why(self) -> str:
        parts = list(self.reasons)
        if self.after:
            parts.append(f"reads the outputs of {', '.join(self.after)}")
        return "; ".join(parts)


def _paths(entries: list[Any] | None) -> list[str]:
    """Paths of a dvc.yaml deps/outs list (strings, or one-key mappings with options)."""
    out = []
    for entry in entries or []:
        out.extend([entry] if isinstance(entry, str) else list(entry))
    return [p.rstrip("/") for p in out]


def _covers(out: str, dep: str) -> bool:
    return dep == out or dep.startswith(out + "/") or out.startswith(dep + "/")


def upstream_graph(dvc_yaml: Path) -> dict[str, set[str]]:
    """Each stage of dvc.yaml with the stages whose outputs it depends on."""
    try:
        stages = yaml.safe_load(dvc_yaml.read_text(encoding="utf-8"))["stages"]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as exc:
        raise PlanError(f"{dvc_yaml}: cannot read its stages ({exc})") from exc
    outs = {
        name: [p for key in ("outs", "metrics", "plots") for p in _paths(spec.get(key))]
        for name, spec in stages.items()
    }
    graph: dict[str, set[str]] = {}
    for name, spec in stages.items():
        deps = _paths(spec.get("deps"))
        graph[name] = {
            other
            for other, other_outs in outs.items()
            if other != name and any(_covers(o, d) for o in other_outs for d in deps)
        }
    return graph


def _flat(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out |= _flat(item, f"{prefix}.{key}")
        return out
    if isinstance(value, str):
        # PyYAML reads `1e-05` (how dvc.lock writes 0.00001) as a string: compare numbers.
        try:
            return {prefix: float(value)}
        except ValueError:
            pass
    return {prefix: value}


def changed_params(root: Path, stage: str, group: str) -> list[str]:
    """`group.key (old -> new)` for each key of a params group that differs from dvc.lock."""
    try:
        lock = yaml.safe_load((root / "dvc.lock").read_text(encoding="utf-8"))
        recorded = lock["stages"][stage]["params"]["params.yaml"][group]
        current = yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8"))[group]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return []
    old, new = _flat(recorded, group), _flat(current, group)
    return [
        f"{key} ({old.get(key, '-')} -> {new.get(key, '-')})"
        for key in sorted(old.keys() | new.keys())
        if old.get(key) != new.get(key)
    ]


def describe_status(
    entries: list[Any], root: Path | None = None, stage: str = ""
) -> tuple[str, ...]:
    """`dvc status --json` entries of one stage, in words (changed params key by key)."""
    reasons: list[str] = []
    for entry in entries:
        if isinstance(entry, str):  # e.g. "always changed"
            reasons.append(entry)
            continue
        for kind, changes in entry.items():
            words = kind.replace("changed ", "")
            if not isinstance(changes, dict):
                reasons.append(f"{kind}: {changes}")
                continue
            for path, change in changes.items():
                if isinstance(change, dict):  # a params file: {group: new|modified|deleted}
                    keys = []
                    for group, what in change.items():
                        detail = changed_params(root, stage, group) if root else []
                        keys += detail or [f"{group} ({what})"]
                    reasons.append(f"params {', '.join(keys)}")
                else:
                    reasons.append(f"{words} {path} ({change})")
    return tuple(reasons)


def dvc_status(root: Path) -> dict[str, list[Any]]:
    """`dvc status --json` in `root`: the stages whose own deps, params or outputs changed."""
    dvc = shutil.which("dvc") or str(Path(sys.executable).with_name("dvc"))
    try:
        done = subprocess.run(
            [dvc, "status", "--json"], cwd=root, capture_output=True, text=True, timeout=600
        )
    except OSError as exc:
        raise PlanError(
            f"cannot run dvc ({exc}); activate the environment: source .venv/bin/activate"
        ) from exc
    if done.returncode != 0:
        raise PlanError(f"dvc status failed in {root}:\n{done.stderr.strip()}")
    # dvc may print warnings before the JSON; the JSON is the last line.
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    try:
        data = json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError as exc:
        raise PlanError(f"dvc status --json printed no JSON:\n{done.stdout[-2000:]}") from exc
    return {k: v for k, v in data.items() if isinstance(v, list)}


def plan(
    graph: dict[str, set[str]], status: dict[str, list[Any]], root: Path | None = None
) -> list[PlannedStage]:
    """The stages `dvc repro` would run, in order: out-of-date ones and all their descendants."""
    order = list(TopologicalSorter(graph).static_order())
    planned: dict[str, PlannedStage] = {}
    for stage in order:
        reasons = describe_status(status[stage], root, stage) if stage in status else ()
        after = tuple(s for s in order if s in graph[stage] and s in planned)
        if reasons or after:
            planned[stage] = PlannedStage(stage, reasons, after)
    return list(planned.values())


def render(planned: list[PlannedStage], status: dict[str, list[Any]]) -> str:
    if not planned:
        return "Nothing to rerun: every stage is up to date (`dvc repro` would run nothing).\n"
    width = max(len(p.stage) for p in planned)
    lines = [f"`dvc repro` would run {len(planned)} stage(s), in this order:"]
    lines += [f"  {p.stage:<{width}}  {p.why}" for p in planned]
    hidden = [p.stage for p in planned if p.stage not in status]
    if hidden:
        lines.append(
            f"`dvc status` and `dvc repro --dry` list only {', '.join(sorted(status))}: "
            f"{', '.join(hidden)} run because they read outputs that will change (DVC skips one "
            "whose inputs come out byte-identical)."
        )
    lines.append("Nothing was run. `make repro` (checks first) or `dvc repro` runs them.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Print the stages `dvc repro` would rerun, and why; run nothing."
    )
    parser.parse_args(argv)
    root = find_root()
    try:
        graph = upstream_graph(root / "dvc.yaml")
        status = dvc_status(root)
    except PlanError as exc:
        print(f"chestct plan: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    sys.stdout.write(render(plan(graph, status, root), status))


if __name__ == "__main__":
    main()
