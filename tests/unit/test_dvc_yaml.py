"""dvc.yaml stays the honest table of contents of the pipeline."""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

from chestct.runner import STAGE_PARAMS
from chestct.settings import STAGES

REPO = Path(__file__).resolve().parents[2]
SRC = REPO / "src"


def _module_file(module: str) -> Path | None:
    base = SRC / module.replace(".", "/")
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {m for m in found if m.split(".")[0] == "chestct"}


def chestct_closure(module: str) -> set[str]:
    """Every chestct source file that `module` imports, directly or not (itself included)."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        path = _module_file(todo.pop())
        if path is None or path in seen:
            continue
        seen.add(path)
        todo.extend(_imports(path))
    # Package __init__ files that hold no code are not worth a rerun.
    return {p.relative_to(REPO).as_posix() for p in seen if p.stat().st_size > 0}


def _dvc() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))


def test_stage_names_and_commands() -> None:
    stages = _dvc()["stages"]
    assert tuple(stages) == STAGES
    for name, stage in stages.items():
        module = name.replace("-", "_")
        assert stage["cmd"] == f"python -m chestct.stages.{module}"
        assert (SRC / "chestct" / "stages" / f"{module}.py").is_file()


def test_deps_list_every_imported_chestct_module() -> None:
    for name, stage in _dvc()["stages"].items():
        module = f"chestct.stages.{name.replace('-', '_')}"
        code_deps = {d for d in stage["deps"] if d.startswith("src/")}
        expected = chestct_closure(module)
        assert code_deps == expected, f"{name}: dvc.yaml deps differ from imports"


def test_params_groups_match_what_stages_read() -> None:
    for name, stage in _dvc()["stages"].items():
        assert tuple(stage["params"]) == STAGE_PARAMS[name]


def test_each_stage_writes_only_its_folder() -> None:
    for name, stage in _dvc()["stages"].items():
        outs = [o if isinstance(o, str) else next(iter(o)) for o in stage["outs"]]
        assert outs[0] == f"artifacts/{name}"
        assert set(outs[1:]) <= ({"model"} if name == "promote" else set())


def test_only_evaluate_writes_metrics_and_plots() -> None:
    dvc = _dvc()
    assert dvc["metrics"] == [
        "artifacts/evaluate/metrics.json",
        "artifacts/evaluate/external.json",
    ]
    for plot in dvc["plots"]:
        path = plot if isinstance(plot, str) else next(iter(plot))
        assert path.startswith("artifacts/evaluate/")
