"""README.md and the docs site document what users touch."""

from __future__ import annotations

from pathlib import Path

import yaml

from chestct.settings import Config, Params
from chestct.settings.schema import entries
from shipped import shipped

REPO = Path(__file__).resolve().parents[2]


def _leaf_keys(cls: type, prefix: str = "") -> list[str]:
    return [entry.key for entry in entries(cls, prefix)]


def test_every_params_key_is_documented_in_the_params_reference() -> None:
    """docs/params.md includes the reference generated from the settings; every key has a row
    there with its shipped value, allowed values and a description."""
    page = (REPO / "docs" / "params.md").read_text(encoding="utf-8")
    assert '--8<-- "docs/generated/params.md"' in page
    assert '--8<-- "docs/generated/config.md"' in page
    for name, cls in (("params.md", Params), ("config.md", Config)):
        reference = (REPO / "docs" / "generated" / name).read_text(encoding="utf-8")
        missing = [k for k in _leaf_keys(cls) if f"| `{k}` |" not in reference]
        assert not missing, f"keys missing from docs/generated/{name}: {missing}"
        assert all(entry.doc.strip() for entry in entries(cls)), f"a key of {name} has no text"


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
    assert re.fullmatch(keep, shipped(PromoteParams).metric), (keep, shipped(PromoteParams).metric)
    # `dvc exp run` leaves params.yaml and dvc.lock modified but not staged.
    assert "has the changed files staged" not in section


def test_the_reference_shows_each_keys_value_choices_and_range() -> None:
    """docs/generated/params.md is rendered from the settings declarations and params.yaml:
    the value column is the shipped value, the allowed column the Literal or the range."""
    reference = (REPO / "docs" / "generated" / "params.md").read_text(encoding="utf-8")
    assert "| `split.mode` | `keep` | one of `keep`, `pool` |" in reference
    assert "| `base.image_size` | `128` | int, at least 16 |" in reference
    assert "| `split.series_similarity` | `0.9` | float, (0, 1], or -1 (off) |" in reference
    assert "| `base_model.dropout` | `0.3` | float, [0, 1) |" in reference
    assert '| `ingest.synthetic_shortcut` | `""` | one of `""`, `zoom`, `dark` |' in reference
    shipped_values = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    assert f"| `train.epochs` | `{shipped_values['train']['epochs']}` |" in reference
