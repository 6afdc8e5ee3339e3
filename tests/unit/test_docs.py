"""README.md and the docs site document what users touch."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from chestct.settings import Params

REPO = Path(__file__).resolve().parents[2]


def _leaf_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default):
            keys += _leaf_keys(type(default), f"{name}.")
        else:
            keys.append(name)
    return keys


def test_every_params_key_is_documented_in_the_params_reference() -> None:
    reference = (REPO / "docs" / "params.md").read_text(encoding="utf-8")
    missing = [k for k in _leaf_keys(Params) if f"| `{k}` |" not in reference]
    assert not missing, f"params keys missing from docs/params.md: {missing}"


def test_params_yaml_sets_every_key_the_code_knows() -> None:
    data = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))

    def flat(d: dict, prefix: str = "") -> set[str]:
        out = set()
        for k, v in d.items():
            if isinstance(v, dict) and v and k not in ("synthetic_per_class", "class_map"):
                out |= flat(v, f"{prefix}{k}.")
            else:
                out.add(f"{prefix}{k}")
        return out

    assert flat(data) == set(_leaf_keys(Params))


def test_readme_front_door_commands_come_first() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    quick = readme.index("## Quick start")
    assert readme.index("make run", quick) < readme.index("##", quick + 5)
    assert readme.index("make test", quick) < readme.index("##", quick + 5)
    assert "not a medical device" in readme.lower()


def test_readme_experiment_table_keeps_the_metric_promotion_uses() -> None:
    """The experiments page's `dvc exp show --keep` columns include promote.metric
    (robust_macro_f1): the number that decides promotion must be on the table that compares
    experiments."""
    import re

    from chestct.settings import PromoteParams

    section = (REPO / "docs" / "experiments.md").read_text(encoding="utf-8")
    (keep,) = re.findall(r"dvc exp show --drop '\.\*' --keep '([^']+)'", section)
    assert re.fullmatch(keep, PromoteParams().metric), (keep, PromoteParams().metric)
    # `dvc exp run` leaves params.yaml and dvc.lock modified but not staged.
    assert "has the changed files staged" not in section
