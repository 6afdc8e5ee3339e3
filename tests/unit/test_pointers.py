"""Pointers: written only when valid, read back only when valid and matching their files;
byte-identical for identical inputs, with the run-specific record beside them."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from chestct.fsutil import sha256_file
from chestct.pointers import (
    Output,
    Pointer,
    PointerError,
    TrackingRef,
    make_input,
    make_output,
    make_run_record,
    read_pointer,
    read_run_record,
    run_id_of,
    write_pointer,
    write_run_record,
)
from chestct.settings import Paths


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    return Paths(
        root=tmp_path,
        artifacts=tmp_path / "artifacts",
        model=tmp_path / "model",
        params_file=tmp_path / "params.yaml",
    )


def make_pointer(paths: Paths, stage: str, /, **changes: Any) -> Pointer:
    """A pointer for `stage` describing a manifest file and an images folder it made."""
    out = paths.stage_dir(stage)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "manifest.csv").write_text("path,label\na.png,normal\n", encoding="utf-8")
    (out / "images" / "a.png").write_bytes(b"not really a png")
    fields: dict[str, Any] = {
        "stage": stage,
        "params": {"base": {"seed": 1, "image_size": 32}},
        "inputs": [],
        "outputs": {
            "manifest": make_output(out / "manifest.csv", paths.root),
            "images": make_output(out / "images", paths.root),
        },
        "metrics": {"files": 1, "counts": {"train": {"normal": 1}}},
        "details": {"source": "synthetic"},
    }
    fields.update(changes)
    return Pointer(**fields)


@pytest.fixture
def written(paths: Paths) -> Pointer:
    """A valid ingest pointer on disk."""
    pointer = make_pointer(paths, "ingest")
    write_pointer(paths.pointer("ingest"), pointer)
    return pointer


def test_round_trip(paths: Paths, written: Pointer) -> None:
    assert read_pointer(paths, "ingest") == written


def test_round_trip_with_an_input(paths: Paths, written: Pointer) -> None:
    pointer = make_pointer(paths, "split", inputs=[make_input(paths, "ingest")])
    write_pointer(paths.pointer("split"), pointer)
    back = read_pointer(paths, "split")
    assert back == pointer
    (item,) = back.inputs
    assert item.stage == "ingest"
    assert item.pointer == "artifacts/ingest/pointer.json"
    assert item.digest == sha256_file(paths.pointer("ingest"))


def test_outputs_are_relative_posix_paths_with_digests(paths: Paths, written: Pointer) -> None:
    assert written.outputs["manifest"] == Output(
        "artifacts/ingest/manifest.csv", sha256_file(paths.stage_dir("ingest") / "manifest.csv")
    )
    assert written.outputs["images"].path == "artifacts/ingest/images"
    assert written.output_path("manifest", paths.root) == (
        paths.root / "artifacts" / "ingest" / "manifest.csv"
    )


def test_output_path_names_the_outputs_there_are(written: Pointer, paths: Paths) -> None:
    with pytest.raises(PointerError, match=r"no output 'model' \(it has: images, manifest\)"):
        written.output_path("model", paths.root)


def test_missing_pointer_says_which_stage_to_run(paths: Paths) -> None:
    with pytest.raises(PointerError, match=r"stage 'train' has not run here.*dvc repro train"):
        read_pointer(paths, "train")


def _drop(key: str) -> Callable[[dict[str, Any]], None]:
    return lambda d: d.pop(key)


def _set(*keys: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(d: dict[str, Any]) -> None:
        for key in keys[:-1]:
            d = d[key]
        d[keys[-1]] = value

    return change


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (_drop("outputs"), "missing key 'outputs'"),
        (_drop("params"), "missing key 'params'"),
        (_set("inputs", value={}), "key 'inputs' has the wrong type (dict)"),
        (_set("metrics", value=[1]), "key 'metrics' has the wrong type (list)"),
        (_set("schema_version", value=True), "key 'schema_version' has the wrong type (bool)"),
        (_set("schema_version", value=1), "schema_version 1 is not 2; rerun the stage"),
        (_set("stage", value="deploy"), "unknown stage 'deploy'"),
        (_set("extra", value=1), "unknown key 'extra'"),
        (_set("created_at", value="2024-01-01T00:00:00.0Z"), "unknown key 'created_at'"),
        (_set("outputs", "manifest", "path", value="/etc/passwd"), "must be relative"),
        (_set("outputs", "manifest", "path", value="../../x.csv"), "must be relative"),
        (_set("outputs", "manifest", "path", value="artifacts/../../x"), "must be relative"),
        (_set("outputs", "manifest", "digest", value="abc"), "digest is not a sha256"),
        (_set("outputs", "manifest", value="x.csv"), "outputs.manifest: expected an object"),
        (_set("inputs", value=["ingest"]), "inputs[0]: expected an object"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_malformed_pointer_is_refused_naming_the_problem(
    paths: Paths, written: Pointer, change: Callable[[dict[str, Any]], None], expected: str
) -> None:
    path = paths.pointer("ingest")
    data = json.loads(path.read_text(encoding="utf-8"))
    change(data)
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(PointerError) as info:
        read_pointer(paths, "ingest")
    assert str(path) in str(info.value)
    assert expected in str(info.value)


@pytest.mark.parametrize("content", [b'{"stage": "ingest",', b"\xff\xfe\x00binary", b""])
def test_non_json_pointer_is_refused(paths: Paths, written: Pointer, content: bytes) -> None:
    paths.pointer("ingest").write_bytes(content)
    with pytest.raises(PointerError, match=r"not valid JSON.*dvc repro -f ingest"):
        read_pointer(paths, "ingest")


def test_json_that_is_not_an_object_is_refused(paths: Paths, written: Pointer) -> None:
    paths.pointer("ingest").write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(PointerError, match="expected a JSON object"):
        read_pointer(paths, "ingest")


def test_pointer_of_another_stage_is_refused(paths: Paths, written: Pointer) -> None:
    split = paths.pointer("split")
    split.parent.mkdir(parents=True)
    split.write_bytes(paths.pointer("ingest").read_bytes())
    with pytest.raises(PointerError, match="pointer is for stage 'ingest', not 'split'"):
        read_pointer(paths, "split")


def test_modified_output_file_is_detected(paths: Paths, written: Pointer) -> None:
    (paths.stage_dir("ingest") / "manifest.csv").write_text("path,label\n", encoding="utf-8")
    with pytest.raises(PointerError, match=r"output 'manifest' .* changed since the stage"):
        read_pointer(paths, "ingest")


def test_modified_output_folder_is_detected(paths: Paths, written: Pointer) -> None:
    (paths.stage_dir("ingest") / "images" / "b.png").write_bytes(b"another")
    with pytest.raises(PointerError, match=r"output 'images' .* changed since the stage"):
        read_pointer(paths, "ingest")


def test_missing_output_is_detected(paths: Paths, written: Pointer) -> None:
    (paths.stage_dir("ingest") / "manifest.csv").unlink()
    with pytest.raises(
        PointerError,
        match=r"output 'manifest' \(artifacts/ingest/manifest.csv\)"
        r" is missing",
    ):
        read_pointer(paths, "ingest")


def test_verify_false_skips_the_digest_check(paths: Paths, written: Pointer) -> None:
    (paths.stage_dir("ingest") / "manifest.csv").write_text("changed\n", encoding="utf-8")
    assert read_pointer(paths, "ingest", verify=False) == written


def _bad_stage(paths: Paths) -> Pointer:
    return make_pointer(paths, "ingest", stage="deploy")


def _absolute_output(paths: Paths) -> Pointer:
    return make_pointer(paths, "ingest", outputs={"x": Output("/tmp/x.csv", "0" * 64)})


def _bad_digest(paths: Paths) -> Pointer:
    return make_pointer(paths, "ingest", outputs={"x": Output("x.csv", "0" * 10)})


@pytest.mark.parametrize("build", [_bad_stage, _absolute_output, _bad_digest])
def test_write_pointer_refuses_an_invalid_pointer_and_writes_nothing(
    paths: Paths, build: Callable[[Paths], Pointer]
) -> None:
    pointer = build(paths)
    folder = paths.stage_dir("ingest")
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(PointerError):
        write_pointer(paths.pointer("ingest"), pointer)
    assert not paths.pointer("ingest").exists()
    assert sorted(p.name for p in folder.iterdir()) == before


def test_refused_pointer_leaves_the_previous_one_intact(paths: Paths, written: Pointer) -> None:
    path = paths.pointer("ingest")
    old = path.read_bytes()
    with pytest.raises(PointerError, match="unknown stage"):
        write_pointer(path, _bad_stage(paths))
    assert path.read_bytes() == old
    assert sorted(p.name for p in path.parent.iterdir()) == [
        "images",
        "manifest.csv",
        "pointer.json",
    ]


def test_written_pointer_is_plain_json(paths: Paths, written: Pointer) -> None:
    data = json.loads(paths.pointer("ingest").read_text(encoding="utf-8"))
    assert data == written.to_dict()
    assert data["schema_version"] == 2


def test_same_outputs_give_the_same_pointer_bytes(paths: Paths, written: Pointer) -> None:
    """Nothing in a pointer depends on when, where or by which run it was written."""
    first = paths.pointer("ingest").read_bytes()
    write_pointer(paths.pointer("ingest"), make_pointer(paths, "ingest"))
    assert paths.pointer("ingest").read_bytes() == first
    assert not {"created_at", "git", "mlflow", "host"} & set(json.loads(first))


def _record(paths: Paths, stage: str = "ingest", run_id: str = "a" * 32) -> Path:
    tracking = TrackingRef("sqlite:///mlflow.db", "chestct", run_id)
    return write_run_record(
        paths, make_run_record(stage, paths.pointer(stage), tracking, paths.root)
    )


def test_run_record_lies_outside_the_stage_output_and_names_its_run(
    paths: Paths, written: Pointer
) -> None:
    path = _record(paths)
    assert path == paths.artifacts / "runs" / "ingest.json"
    assert paths.stage_dir("ingest") not in path.parents
    record = read_run_record(paths, "ingest")
    assert record is not None and record.mlflow.run_id == "a" * 32
    assert record.pointer_digest == sha256_file(paths.pointer("ingest"))
    assert record.created_at.endswith("Z") and record.host
    assert run_id_of(paths, "ingest") == "a" * 32


def test_run_record_of_another_pointer_is_not_believed(paths: Paths, written: Pointer) -> None:
    """After `dvc pull` or `dvc checkout` the outputs are not the ones this record's run made."""
    _record(paths)
    changed = make_pointer(paths, "ingest", metrics={"files": 2})
    write_pointer(paths.pointer("ingest"), changed)
    assert read_run_record(paths, "ingest") is None
    assert run_id_of(paths, "ingest") is None


def test_missing_run_record_means_unknown_run(paths: Paths, written: Pointer) -> None:
    assert read_run_record(paths, "ingest") is None


def test_malformed_run_record_is_refused_naming_the_file(paths: Paths, written: Pointer) -> None:
    path = _record(paths)
    path.write_text("{", encoding="utf-8")
    with pytest.raises(PointerError, match=r"ingest.json: not valid JSON"):
        read_run_record(paths, "ingest")
    data = json.loads(_record(paths).read_text(encoding="utf-8"))
    data["created_at"] = "yesterday"
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(PointerError, match="created_at 'yesterday' is not UTC ISO"):
        read_run_record(paths, "ingest")
