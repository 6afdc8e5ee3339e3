"""The JSON artifact pointer each stage leaves in artifacts/<stage>/pointer.json, and the run
record beside it in artifacts/runs/<stage>.json.

A pointer says what a stage made (relative paths with content digests), from what (the upstream
pointers it consumed, with their digests) and with which params. Downstream stages find their
inputs only through it. It is validated on write and on read, and written atomically. It holds
nothing run-specific, so that it is a function of the stage's deps and params: DVC hashes it,
and the same inputs on any machine give the same bytes.

What is run-specific (UTC time, git SHA, host, MLflow run) goes to the run record, which DVC does
not track: it names the digest of the pointer it belongs to, so a record left by another run of
the stage (or missing after `dvc pull`) is recognised as such.
"""

from __future__ import annotations

import json
import socket
import subprocess
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from chestct.fsutil import atomic_write_json, digest_of, sha256_file
from chestct.settings import STAGES, Paths

SCHEMA_VERSION = 2
RUN_SCHEMA_VERSION = 1


class PointerError(RuntimeError):
    """A pointer is missing, malformed, or does not match the files it describes."""


@dataclass(frozen=True)
class GitState:
    sha: str | None
    dirty: bool | None


@dataclass(frozen=True)
class Output:
    path: str  # relative to the project root, POSIX separators
    digest: str


@dataclass(frozen=True)
class Input:
    stage: str
    pointer: str
    digest: str


@dataclass(frozen=True)
class TrackingRef:
    tracking_uri: str
    experiment: str
    run_id: str | None


@dataclass(frozen=True)
class Pointer:
    stage: str
    params: dict[str, Any]
    inputs: list[Input]
    outputs: dict[str, Output]
    metrics: dict[str, Any]
    details: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def output_path(self, name: str, root: Path) -> Path:
        """Absolute path of output `name`, or a PointerError naming the outputs there are."""
        if name not in self.outputs:
            raise PointerError(
                f"pointer of stage {self.stage!r} has no output {name!r} "
                f"(it has: {', '.join(sorted(self.outputs))})"
            )
        return root / self.outputs[name].path

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def git_state(root: Path) -> GitState:
    """HEAD commit and whether the work tree differs from it; None outside a git repository."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return GitState(sha=None, dirty=None)
    return GitState(sha=sha, dirty=bool(status.strip()))


def now_utc() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def make_output(path: Path, root: Path) -> Output:
    relative = path.resolve().relative_to(root.resolve()).as_posix()
    return Output(path=relative, digest=digest_of(path))


def make_input(paths: Paths, stage: str) -> Input:
    pointer = paths.pointer(stage)
    return Input(
        stage=stage,
        pointer=pointer.relative_to(paths.root).as_posix(),
        digest=sha256_file(pointer),
    )


# --------------------------------------------------------------------------- validation

_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "schema_version": int,
    "stage": str,
    "params": dict,
    "inputs": list,
    "outputs": dict,
    "metrics": dict,
}


def _require(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in obj:
        raise PointerError(f"{where}: missing key {key!r}")
    value = obj[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise PointerError(f"{where}: key {key!r} has the wrong type ({type(value).__name__})")
    return value


def from_dict(data: Any, where: str = "pointer") -> Pointer:
    """Validate a decoded pointer and build it; raises PointerError naming the first problem."""
    if not isinstance(data, dict):
        raise PointerError(f"{where}: expected a JSON object")
    _require(data, "schema_version", int, where)
    if data["schema_version"] != SCHEMA_VERSION:
        raise PointerError(
            f"{where}: schema_version {data['schema_version']} is not {SCHEMA_VERSION}; "
            "rerun the stage with this version of chestct"
        )
    for key, kind in _REQUIRED.items():
        _require(data, key, kind, where)
    unknown = set(data) - set(_REQUIRED) - {"details"}
    if unknown:
        raise PointerError(f"{where}: unknown key {sorted(unknown)[0]!r}")
    if data["stage"] not in STAGES:
        raise PointerError(f"{where}: unknown stage {data['stage']!r}")
    outputs = {}
    for name, out in data["outputs"].items():
        if not isinstance(out, dict):
            raise PointerError(f"{where}.outputs.{name}: expected an object")
        path = _require(out, "path", str, f"{where}.outputs.{name}")
        digest = _require(out, "digest", str, f"{where}.outputs.{name}")
        if Path(path).is_absolute() or ".." in Path(path).parts:
            raise PointerError(f"{where}.outputs.{name}: path {path!r} must be relative")
        if len(digest) != 64:
            raise PointerError(f"{where}.outputs.{name}: digest is not a sha256")
        outputs[name] = Output(path=path, digest=digest)
    inputs = []
    for i, item in enumerate(data["inputs"]):
        if not isinstance(item, dict):
            raise PointerError(f"{where}.inputs[{i}]: expected an object")
        inputs.append(
            Input(
                stage=_require(item, "stage", str, f"{where}.inputs[{i}]"),
                pointer=_require(item, "pointer", str, f"{where}.inputs[{i}]"),
                digest=_require(item, "digest", str, f"{where}.inputs[{i}]"),
            )
        )
    return Pointer(
        stage=data["stage"],
        params=data["params"],
        inputs=inputs,
        outputs=outputs,
        metrics=data["metrics"],
        details=data.get("details", {}),
        schema_version=data["schema_version"],
    )


def write_pointer(path: Path, pointer: Pointer) -> None:
    """Validate, then write atomically."""
    data = pointer.to_dict()
    from_dict(json.loads(json.dumps(data, default=str)), where=str(path))
    atomic_write_json(path, data)


def _read_json(path: Path, fix: str) -> Any:
    """The JSON in `path`; a PointerError naming the file and `fix` when it is not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PointerError(f"{path}: not valid JSON ({exc}); {fix}") from exc


def read_pointer(paths: Paths, stage: str, verify: bool = True) -> Pointer:
    """Read and validate the pointer of `stage`; with `verify`, check every output's digest."""
    path = paths.pointer(stage)
    if not path.is_file():
        raise PointerError(
            f"{path}: no pointer; stage {stage!r} has not run here (run `dvc repro {stage}`)"
        )
    data = _read_json(path, f"rerun `dvc repro -f {stage}`")
    pointer = from_dict(data, where=str(path))
    if pointer.stage != stage:
        raise PointerError(f"{path}: pointer is for stage {pointer.stage!r}, not {stage!r}")
    if verify:
        for name, out in pointer.outputs.items():
            target = paths.root / out.path
            if not target.exists():
                raise PointerError(f"{path}: output {name!r} ({out.path}) is missing")
            if digest_of(target) != out.digest:
                raise PointerError(
                    f"{path}: output {name!r} ({out.path}) changed since the stage wrote it; "
                    f"rerun `dvc repro {stage}`"
                )
    return pointer


# --------------------------------------------------------------------------- run records


@dataclass(frozen=True)
class RunRecord:
    """What one execution of a stage was: when, from which commit, where, which MLflow run."""

    stage: str
    created_at: str
    git: GitState
    host: str
    mlflow: TrackingRef
    pointer_digest: str  # sha256 of the pointer.json this run wrote
    schema_version: int = RUN_SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_run_record(
    stage: str, pointer_file: Path, tracking: TrackingRef, root: Path
) -> RunRecord:
    """The record of the run that has just written `pointer_file`."""
    return RunRecord(
        stage=stage,
        created_at=now_utc(),
        git=git_state(root),
        host=socket.gethostname(),
        mlflow=tracking,
        pointer_digest=sha256_file(pointer_file),
    )


def write_run_record(paths: Paths, record: RunRecord) -> Path:
    """Write artifacts/runs/<stage>.json atomically; returns its path."""
    path = paths.run_record(record.stage)
    atomic_write_json(path, record.to_dict())
    return path


def _run_record_from_dict(data: Any, where: str) -> RunRecord:
    if not isinstance(data, dict):
        raise PointerError(f"{where}: expected a JSON object")
    if data.get("schema_version") != RUN_SCHEMA_VERSION:
        raise PointerError(f"{where}: schema_version is not {RUN_SCHEMA_VERSION}")
    try:
        datetime.strptime(_require(data, "created_at", str, where), "%Y-%m-%dT%H:%M:%S.%fZ")
    except ValueError:
        raise PointerError(f"{where}: created_at {data['created_at']!r} is not UTC ISO") from None
    git = _require(data, "git", dict, where)
    ml = _require(data, "mlflow", dict, where)
    return RunRecord(
        stage=_require(data, "stage", str, where),
        created_at=data["created_at"],
        git=GitState(
            sha=_require(git, "sha", (str, type(None)), f"{where}.git"),
            dirty=_require(git, "dirty", (bool, type(None)), f"{where}.git"),
        ),
        host=_require(data, "host", str, where),
        mlflow=TrackingRef(
            tracking_uri=_require(ml, "tracking_uri", str, f"{where}.mlflow"),
            experiment=_require(ml, "experiment", str, f"{where}.mlflow"),
            run_id=_require(ml, "run_id", (str, type(None)), f"{where}.mlflow"),
        ),
        pointer_digest=_require(data, "pointer_digest", str, where),
    )


def read_run_record(paths: Paths, stage: str) -> RunRecord | None:
    """The record of the run that wrote the current pointer of `stage`, or None.

    None when there is no record (outputs restored by `dvc pull` or `dvc checkout`), or when
    the record belongs to another pointer (the outputs were restored after a later run): the
    run behind these outputs is then unknown here, and saying so beats naming the wrong one.
    A record that is not valid JSON or lacks a key is an error naming the file.
    """
    path = paths.run_record(stage)
    pointer = paths.pointer(stage)
    if not path.is_file() or not pointer.is_file():
        return None
    data = _read_json(path, "delete it or rerun the stage")
    record = _run_record_from_dict(data, str(path))
    if record.stage != stage or record.pointer_digest != sha256_file(pointer):
        return None
    return record


def run_id_of(paths: Paths, stage: str) -> str | None:
    """MLflow run id of the run behind `stage`'s current outputs, when it is known here."""
    record = read_run_record(paths, stage)
    return None if record is None else record.mlflow.run_id


def lineage_tags(paths: Paths, upto: str) -> dict[str, str]:
    """MLflow tags naming the run of every upstream stage, so that one run leads to all.

    Run ids come from the run records; a stage whose outputs were pulled rather than run here
    has none and gets no tag.
    """
    tags = {}
    for stage in STAGES[: STAGES.index(upto)]:
        try:
            run_id = run_id_of(paths, stage)
        except PointerError:
            continue
        if run_id:
            tags[f"chestct.run.{stage}"] = run_id
    return tags
