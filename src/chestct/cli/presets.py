"""Merge a preset (a partial params.yaml) into params.yaml, keeping its comments.

    python -m chestct.cli.presets config/presets/real-data.yaml \\
        --set ingest.source=/data/chest-ct/train --set evaluate.external=/data/chest-ct/valid

Every key of the preset and of each `--set` must already exist in params.yaml: a misspelt key
is refused with the keys that exist, before anything is written. The result is validated like
any params.yaml (chestct.settings) and written to a temporary name, then renamed, so a refused
preset leaves params.yaml as it was. Then `dvc repro` runs what the change needs.
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedSeq

from chestct.fsutil import atomic_write_text
from chestct.settings import SettingsError, find_root, validate_params


def _round_trip() -> YAML:
    rt = YAML()  # round-trip mode: comments, key order and quoting survive
    rt.preserve_quotes = True
    rt.width = 4096
    return rt


def _like(current: Any, value: Any) -> Any:
    """`value`, written in the style of the value it replaces (a [a, b] list stays inline)."""
    if isinstance(current, CommentedSeq) and isinstance(value, list):
        seq = CommentedSeq(value)
        if current.fa.flow_style():
            seq.fa.set_flow_style()
        return seq
    return value


def merge_into(target: Any, preset: Mapping[str, Any], where: str = "") -> None:
    """Overwrite `target`'s values with `preset`'s, group by group, in place.

    Raises:
        SettingsError: a preset key that `target` does not have.
    """
    for key, value in preset.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in target:
            known = ", ".join(str(k) for k in target)
            raise SettingsError(f"preset key {path!r} is not in params.yaml; known here: {known}")
        current = target[key]
        if isinstance(value, Mapping) and isinstance(current, Mapping) and value:
            merge_into(current, value, path)
        elif value != current:
            target[key] = _like(current, value)


def parse_set(assignment: str) -> dict[str, Any]:
    """`a.b.c=value` (value read as YAML) -> {"a": {"b": {"c": value}}}."""
    dotted, sep, raw = assignment.partition("=")
    if not sep or not dotted.strip():
        raise SettingsError(f"--set {assignment!r}: expected KEY.PATH=VALUE")
    value = yaml.safe_load(raw) if raw.strip() else ""
    nested: dict[str, Any] = {}
    node = nested
    keys = dotted.strip().split(".")
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value
    return nested


def apply_preset(params_file: Path, presets: Sequence[Mapping[str, Any]]) -> str:
    """params.yaml's text with each preset merged in turn, validated; nothing is written."""
    rt = _round_trip()
    data = rt.load(params_file.read_text(encoding="utf-8"))
    for preset in presets:
        merge_into(data, preset)
    out = io.StringIO()
    rt.dump(data, out)
    text = out.getvalue()
    validate_params(yaml.safe_load(text))
    return text


def _read_preset(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise SettingsError(f"{path}: preset file not found")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise SettingsError(f"{path}: a preset is a mapping of params groups")
    return data


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chestct.cli.presets", description=__doc__)
    parser.add_argument("preset", type=Path, help="a YAML file of params groups to merge")
    parser.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE")
    parser.add_argument("--params", type=Path, default=None, help="default: ./params.yaml")
    args = parser.parse_args(argv)
    params_file = args.params or find_root() / "params.yaml"
    try:
        layers = [_read_preset(args.preset), *(parse_set(s) for s in args.set)]
        text = apply_preset(params_file, layers)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    atomic_write_text(params_file, text)
    print(f"{params_file}: merged {args.preset}" + "".join(f", {s}" for s in args.set))
    print("next: dvc repro")
    return 0


if __name__ == "__main__":
    sys.exit(main())
