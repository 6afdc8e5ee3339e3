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
    # Python runs every parent package's __init__ first (chestct.stages pins the CPU kernels).
    parts = module.split(".")
    todo = [".".join(parts[:n]) for n in range(1, len(parts) + 1)]
    while todo:
        path = _module_file(todo.pop())
        if path is None or path in seen:
            continue
        seen.add(path)
        todo.extend(_imports(path))
    # Package __init__ files that hold no code (empty, or a docstring alone) are not worth a rerun.
    return {p.relative_to(REPO).as_posix() for p in seen if _holds_code(p)}


def _holds_code(path: Path) -> bool:
    body = ast.parse(path.read_text(encoding="utf-8")).body
    docstring = (
        body[:1] and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
    )
    return len(body) > (1 if docstring else 0)


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


def _paths(items: list) -> list[str]:
    return [o if isinstance(o, str) else next(iter(o)) for o in items]


def test_each_stage_writes_only_its_folders() -> None:
    """artifacts/<stage>/ (cached), reports/<stage>/ (git-tracked, cache: false), model/."""
    for name, stage in _dvc()["stages"].items():
        outs = _paths(stage["outs"])
        outs += _paths(stage.get("metrics", [])) + _paths(stage.get("plots", []))
        assert outs[0] == f"artifacts/{name}"
        for out in outs[1:]:
            assert (out == "model" and name == "promote") or out.startswith(f"reports/{name}/")


def test_metrics_and_plot_tables_are_git_tracked_at_stable_paths() -> None:
    """`dvc metrics diff HEAD~1` and `dvc exp show` read them from git: cache: false, never
    inside a cached folder or a git-ignored one."""
    dvc = _dvc()
    assert "metrics" not in dvc  # declared by the stage that writes them
    stages = dvc["stages"]
    assert _paths(stages["evaluate"]["metrics"]) == [
        "reports/evaluate/metrics.json",
        "reports/evaluate/external.json",
    ]
    for stage in stages.values():
        # A plain uncached out would keep DVC's run cache from holding the stage.
        for out in stage["outs"]:
            assert not (isinstance(out, dict) and next(iter(out.values())).get("cache") is False)
        for out in stage.get("metrics", []) + stage.get("plots", []):
            path, spec = next(iter(out.items()))
            assert path.startswith("reports/") and spec["cache"] is False, out
    stage_plots = _paths(stages["train"]["plots"]) + _paths(stages["evaluate"]["plots"])
    assert "reports/train/history.csv" in stage_plots
    drawn = []
    for plot in dvc["plots"]:
        name, spec = (plot, None) if isinstance(plot, str) else next(iter(plot.items()))
        drawn += list(spec["y"]) if isinstance((spec or {}).get("y"), dict) else [name]
    for path in drawn:
        assert path.startswith(("reports/", "artifacts/evaluate/")), path
        assert path in stage_plots or path.startswith("artifacts/evaluate/"), path
    ignored = (REPO / ".gitignore").read_text(encoding="utf-8").split()
    assert "/reports/" not in ignored and "reports/" not in ignored
