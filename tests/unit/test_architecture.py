"""Dependencies point one way (STYLE habit 14), read from the code with ast.

- Stages are leaves: only dvc.yaml (and tests, bench/) runs chestct.stages.*; no module of the
  package imports a stage, and a stage never imports another stage.
- Library modules (everything outside serving/ and stages/, research/ included) import neither
  the web package (chestct.serving) nor a web framework (flask, werkzeug, gunicorn).
- Research helpers import no stage and not the stage runner.
- Rooms (docs/architecture.md): every top-level module and subpackage stands on a floor
  (FLOORS), and a room imports only rooms on lower floors; inside a room, anything goes.

Every import counts, at the top or inside a function, and under `if TYPE_CHECKING:` too: a lazy
import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "chestct"
WEB_FRAMEWORKS = ("flask", "werkzeug", "gunicorn")


def _module_name(path: Path, package: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, package: Path) -> set[str]:
    """Every module `path` imports (absolute names; relative imports resolved), with
    `from a import b` counted as both `a` and `a.b` (b may be a submodule)."""
    name = _module_name(path, package)
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = name.split(".")
                parent = parent if is_package else parent[:-1]
                parent = parent[: len(parent) - (node.level - 1)]
                base = ".".join([*parent, base] if base else parent)
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return found


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _stage_of(module: str, package: str) -> str | None:
    """The stage module `module` names (package.stages.<x>), or None."""
    parts = module.split(".")
    if parts[:2] == [package, "stages"] and len(parts) >= 3:
        return ".".join(parts[:3])
    return None


# The floors of the house (docs/architecture.md): a room imports only rooms below it.
FLOORS: dict[str, int] = {
    # ground: the vocabulary every room shares
    "labels": 0, "fsutil": 0, "cpu": 0, "settings": 0,
    # pixels, pointers and the tracking store
    "imaging": 1, "pointers": 1, "tracking": 1,
    # what the data is, and what a model is; the model card (it holds imaging's Preprocessing)
    "data": 2, "model": 2, "modelcard": 2,
    # how good a model is; the stage runner; the one writer of a model folder
    "evaluation": 3, "runner": 3, "modelfolder": 3,
    "monitoring": 4,
    "inference": 5,
    # the leaves: commands, notebooks' helpers, the web service, the pipeline stages
    "cli": 6, "research": 6, "promotion": 6, "assessment": 6,
    "serving": 7, "stages": 7,
}  # fmt: skip


def _room(module: str, top: str) -> str | None:
    """The room of a module: its top-level module or subpackage under `top`."""
    parts = module.split(".")
    return parts[1] if len(parts) >= 2 and parts[0] == top else None


def room_violations(package: Path, floors: dict[str, int]) -> list[str]:
    """Each import from a room to a room on the same or a higher floor."""
    top, found = package.name, []
    for path in sorted(package.rglob("*.py")):
        own = _room(_module_name(path, package), top)
        for target in sorted(imports_of(path, package)):
            other = _room(target, top)
            if own is None or other is None or other == own:
                continue
            if other in floors and own in floors and floors[other] >= floors[own]:
                found.append(
                    f"{_module_name(path, package)} imports {target}: {own} (floor "
                    f"{floors[own]}) may import only rooms below it, not {other} (floor "
                    f"{floors[other]})"
                )
    return found


def violations(package: Path) -> list[str]:
    """Each import that breaks the direction, as 'module imports target: rule'."""
    top = package.name
    stages, serving, research = f"{top}.stages", f"{top}.serving", f"{top}.research"
    found = []
    for path in sorted(package.rglob("*.py")):
        module = _module_name(path, package)
        for target in sorted(imports_of(path, package)):
            target_stage = _stage_of(target, top)
            if _under(module, stages):
                own = _stage_of(module, top)
                if target_stage and own and target_stage != own:
                    found.append(f"{module} imports {target}: a stage never imports a stage")
                continue
            if target_stage:
                found.append(
                    f"{module} imports {target}: only dvc.yaml runs stages; move what is "
                    "shared into a library module"
                )
            if _under(module, serving):
                continue
            if _under(target, serving) or any(_under(target, w) for w in WEB_FRAMEWORKS):
                found.append(f"{module} imports {target}: a library module never imports the web")
            if _under(module, research) and _under(target, f"{top}.runner"):
                found.append(f"{module} imports {target}: research code never needs the runner")
    return found


# Imports against the direction that a named piece of work removes. Each entry must still be
# needed (the test below fails on a stale one), so the list only ever shrinks.
KNOWN: dict[str, str] = {}


def test_the_package_has_no_import_against_the_direction() -> None:
    found = violations(PACKAGE)
    assert [v for v in found if v.split(" imports ")[0] not in KNOWN] == []
    stale = sorted(set(KNOWN) - {v.split(" imports ")[0] for v in found})
    assert not stale, f"remove {stale} from KNOWN: the import is gone"


def test_every_room_has_a_floor_and_imports_go_down() -> None:
    rooms = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    rooms |= {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert rooms == set(FLOORS), "place a new module or subpackage on a floor in FLOORS"
    assert room_violations(PACKAGE, FLOORS) == []


def fake_package(tmp_path: Path, files: dict[str, str]) -> Path:
    """A package `chestct` under tmp_path with `files` (path: source) and its __init__.py."""
    pkg = tmp_path / "chestct"
    for name, text in {"__init__.py": "", **files}.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(text)
    return pkg


def test_the_room_rule_catches_an_import_upward_or_sideways(tmp_path: Path) -> None:
    imports = {
        "labels.py": [],
        "imaging/__init__.py": [],
        "imaging/decode.py": ["from chestct import labels", "from chestct.imaging import prepare"],
        "imaging/prepare.py": ["from chestct.model import texture"],
        "model/__init__.py": [],
        "model/texture.py": ["from chestct.imaging.decode import x", "from chestct.data import s"],
        "data/__init__.py": [],
        "data/s.py": [],
    }
    pkg = fake_package(tmp_path, {name: "\n".join(lines) for name, lines in imports.items()})
    floors = {"labels": 0, "imaging": 1, "model": 2, "data": 2}
    assert room_violations(pkg, floors) == [
        "chestct.imaging.prepare imports chestct.model: imaging (floor 1) may import only rooms "
        "below it, not model (floor 2)",
        "chestct.imaging.prepare imports chestct.model.texture: imaging (floor 1) may import only "
        "rooms below it, not model (floor 2)",
        "chestct.model.texture imports chestct.data: model (floor 2) may import only rooms below "
        "it, not data (floor 2)",
        "chestct.model.texture imports chestct.data.s: model (floor 2) may import only rooms "
        "below it, not data (floor 2)",
    ]


def test_the_rules_catch_each_kind_of_wrong_import(tmp_path: Path) -> None:
    pkg = fake_package(
        tmp_path,
        {
            "library.py": "import numpy\nfrom chestct import fsutil\n",
            "fsutil.py": "",
            "runner.py": "",
            "leaky.py": "def f():\n    from chestct.stages.train import run_train\n",
            "webby.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import flask\n",
            "served.py": "from chestct.serving import inputs\n",
            "stages/__init__.py": "",
            "stages/train.py": "from chestct.runner import run_main\nfrom . import evaluate\n",
            "stages/evaluate.py": "from chestct import library\n",
            "serving/__init__.py": "import flask\nfrom chestct import library\n",
            "serving/inputs.py": "from werkzeug.datastructures import FileStorage\n",
            "research/__init__.py": "",
            "research/eda.py": (
                "from chestct.runner import StageFailed\nfrom chestct.stages import ingest\n"
            ),
        },
    )
    found = violations(pkg)
    assert found == [
        "chestct.leaky imports chestct.stages.train: only dvc.yaml runs stages; move what is "
        "shared into a library module",
        "chestct.leaky imports chestct.stages.train.run_train: only dvc.yaml runs stages; move "
        "what is shared into a library module",
        "chestct.research.eda imports chestct.runner: research code never needs the runner",
        "chestct.research.eda imports chestct.runner.StageFailed: research code never needs the "
        "runner",
        "chestct.research.eda imports chestct.stages.ingest: only dvc.yaml runs stages; move "
        "what is shared into a library module",
        "chestct.served imports chestct.serving: a library module never imports the web",
        "chestct.served imports chestct.serving.inputs: a library module never imports the web",
        "chestct.stages.train imports chestct.stages.evaluate: a stage never imports a stage",
        "chestct.webby imports flask: a library module never imports the web",
    ]


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from . import fsutil\n", {"chestct", "chestct.fsutil"}),
        ("from .fsutil import sha256_file\n", {"chestct.fsutil", "chestct.fsutil.sha256_file"}),
        ("import chestct.stages.train as t\n", {"chestct.stages.train"}),
    ],
)
def test_relative_and_aliased_imports_resolve(tmp_path: Path, source: str, expected: set) -> None:
    pkg = tmp_path / "chestct"
    pkg.mkdir()
    (pkg / "module.py").write_text(source)
    assert imports_of(pkg / "module.py", pkg) == expected
