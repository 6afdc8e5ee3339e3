"""Every file the card names carries a sha256, checked at load and at hot reload; promote keeps
model/ only when recording the swap succeeds (issue 12)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import zipfile
from pathlib import Path

import pytest

from chestct.fsutil import replace_dir, sha256_file
from chestct.inference.folder import ModelFiles, load_folder
from chestct.inference.loaded import ModelRefused
from chestct.inference.predictor import Predictor
from chestct.modelcard import ModelCard
from chestct.modelfolder import pin_digests as file_digests
from chestct.promotion import read_card
from chestct.serving import create_app
from model_folder import install_model, multipart, slice_png

PINNED = ("inference", "cam", "ood")


def pinned_copy(source: Path, target: Path) -> Path:
    """A copy of a model folder whose card gives the sha256 of every file, as promote writes."""
    shutil.copytree(source, target)
    card = json.loads((target / "model.json").read_text())
    files = {card[k]["file"]: target / card[k]["file"] for k in PINNED}
    card["model_sha256"] = sha256_file(target / "model.keras")
    (target / "model.json").write_text(json.dumps(file_digests(card, files)))
    return target


def test_card_digests_are_checked_at_load(tmp_path: Path, model_dir: Path) -> None:
    folder = pinned_copy(model_dir, tmp_path / "model")
    loaded = load_folder(folder)
    assert not any("sha256" in note for note in loaded.notes)
    assert any("no sha256" in n for n in load_folder(model_dir).notes)  # unpinned: noted

    for key in PINNED:
        broken = pinned_copy(model_dir, tmp_path / f"broken-{key}")
        card = json.loads((broken / "model.json").read_text())
        with (broken / card[key]["file"]).open("ab") as fh:
            fh.write(b"\0")  # a partial or foreign copy
        with pytest.raises(ModelRefused, match=rf"{card[key]['file']} does not match its sha256"):
            load_folder(broken)


def test_hot_reload_refuses_a_mismatched_model_and_keeps_serving(
    tmp_path: Path,
    model_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    live = pinned_copy(model_dir, tmp_path / "model")
    client = create_app({"MODEL_DIR": str(live), "RELOAD_CHECK_S": 0}).test_client()
    before = client.post("/predict", **multipart(slice_png(2))).get_json()

    staged = pinned_copy(model_dir, tmp_path / ".model.new")
    card = json.loads((staged / "model.json").read_text())
    card["version"] = "2"
    card["ood"]["sha256"] = "0" * 64  # the card and its OOD file disagree
    (staged / "model.json").write_text(json.dumps(card))
    replace_dir(staged, live)
    with caplog.at_level(logging.ERROR):
        after = client.post("/predict", **multipart(slice_png(2))).get_json()
    assert after["model"]["version"] == before["model"]["version"] == "1"
    assert after["probabilities"] == before["probabilities"]
    assert any(
        "refused the new model" in r.message and "ood.npz does not match its sha256" in r.message
        for r in caplog.records
    )


def test_promote_puts_the_previous_model_back_when_recording_fails(tmp_path: Path) -> None:
    live = tmp_path / "model"
    first, second = tmp_path / "first.keras", tmp_path / "second.keras"
    first.write_bytes(b"model one")
    second.write_bytes(b"model two")
    install_model(first, {"version": "1"}, live)
    seen: list[str] = []

    def failing_record() -> None:
        seen.append(read_card(live)["version"])  # the new model is in place meanwhile
        raise ConnectionError("tracking server went away")

    with pytest.raises(ConnectionError):
        install_model(second, {"version": "2"}, live, after_swap=failing_record)
    assert seen == ["2"]
    assert read_card(live) == {"version": "1"}
    assert (live / "model.keras").read_bytes() == b"model one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first.keras", "model", "second.keras"]

    fresh = tmp_path / "fresh"
    with pytest.raises(ConnectionError):
        install_model(first, {"version": "1"}, fresh, after_swap=failing_record)
    assert not fresh.exists()  # no model/ that its run did not record
    install_model(second, {"version": "2"}, live, after_swap=lambda: None)
    assert read_card(live) == {"version": "2"}


def test_card_digest_helper_pins_every_named_file(tmp_path: Path) -> None:
    files = {}
    for name in ("model.tflite", "cam_head.npz", "ood.npz"):
        files[name] = tmp_path / name
        files[name].write_bytes(name.encode())
    card = {
        "inference": {"file": "model.tflite"},
        "cam": {"file": "cam_head.npz"},
        "ood": {"file": "ood.npz", "threshold": 1.0},
        "temperature": 1.0,
    }
    pinned = file_digests(card, files)
    assert "sha256" not in card["cam"]  # the input is not changed
    for key, name in zip(PINNED, files, strict=True):
        assert pinned[key]["sha256"] == sha256_file(files[name])


# --------------------------------------------------------------------------- issue 21: every file


def with_dropout(keras_file: Path, rate: float) -> None:
    """Rewrite the dropout rate inside a .keras zip (no TensorFlow needed)."""
    with zipfile.ZipFile(keras_file) as zf:
        members = {info.filename: zf.read(info) for info in zf.infolist()}
    config = json.loads(members["config.json"])
    stack = [config]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if node.get("class_name") == "Dropout":
                node["config"]["rate"] = rate
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    members["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(keras_file, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)


def test_a_replaced_keras_file_is_refused_in_the_litert_path(
    tmp_path: Path, model_dir: Path
) -> None:
    """model.keras is only read for its dropout rate when LiteRT serves, and that rate drives
    every MC-dropout answer: it is checked against model_sha256 like every other file."""
    folder = pinned_copy(model_dir, tmp_path / "model")
    assert load_folder(folder).dropout_rate == pytest.approx(0.3)
    with_dropout(folder / "model.keras", 0.95)
    with pytest.raises(ModelRefused, match=r"model\.keras does not match .*model_sha256"):
        load_folder(folder)


def test_hot_reload_refuses_a_replaced_keras_file(
    tmp_path: Path, model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    live = pinned_copy(model_dir, tmp_path / "model")
    predictor = Predictor(live, reload_check_s=0)
    assert predictor.load().dropout_rate == pytest.approx(0.3)
    staged = pinned_copy(model_dir, tmp_path / ".model.new")
    card = json.loads((staged / "model.json").read_text())
    card["version"] = "2"
    (staged / "model.json").write_text(json.dumps(card))
    with_dropout(staged / "model.keras", 0.95)
    replace_dir(staged, live)
    with caplog.at_level(logging.ERROR):
        assert predictor.refresh() is False
    assert predictor.model.version == "1" and predictor.model.dropout_rate == pytest.approx(0.3)
    assert "model.keras does not match its sha256" in (predictor.last_error or "")


@pytest.mark.parametrize("form", ["entry", "files_map"])
def test_a_new_family_s_files_are_checked_by_the_same_rule(
    tmp_path: Path, model_dir: Path, form: str
) -> None:
    """A file the card lists under a key this code does not read (a new model family's entry,
    or the `files` map) is hashed at load all the same."""
    folder = pinned_copy(model_dir, tmp_path / "model")
    (folder / "texture.npz").write_bytes(b"texture statistics")
    card = json.loads((folder / "model.json").read_text())
    digest = sha256_file(folder / "texture.npz")
    if form == "entry":
        card["texture"] = {"file": "texture.npz", "sha256": digest, "method": "glcm"}
    else:
        card["files"] = {"texture.npz": digest}
    (folder / "model.json").write_text(json.dumps(card))
    loaded = load_folder(folder)
    assert "texture.npz" in loaded.card.files
    (folder / "texture.npz").write_bytes(b"another model's texture statistics")
    with pytest.raises(ModelRefused, match=r"texture\.npz does not match its sha256"):
        load_folder(folder)


def test_a_file_the_card_does_not_list_is_never_read(tmp_path: Path, model_dir: Path) -> None:
    folder = pinned_copy(model_dir, tmp_path / "model")
    card = read_card(folder)
    files = ModelFiles(folder, ModelCard.from_dict(card))
    assert files.check() == []
    (folder / "stray.npz").write_bytes(b"not listed")
    with pytest.raises(ModelRefused, match="a file the card does not list"):
        files.read("stray.npz", "texture.file")
    for bad in ("../model.json", ".hidden", "model.json", "sub/ood.npz"):
        card["cam"]["file"] = bad
        (folder / "model.json").write_text(json.dumps(card))
        with pytest.raises(ModelRefused, match="must be a plain file name"):
            load_folder(folder)


def test_card_digest_helper_pins_a_new_family_s_files(tmp_path: Path) -> None:
    (tmp_path / "texture.npz").write_bytes(b"t")
    (tmp_path / "extra.bin").write_bytes(b"e")
    files = {"texture.npz": tmp_path / "texture.npz", "extra.bin": tmp_path / "extra.bin"}
    card = {"texture": {"file": "texture.npz"}, "files": {"extra.bin": None}}
    pinned = file_digests(card, files)
    assert pinned["texture"]["sha256"] == sha256_file(files["texture.npz"])
    assert pinned["files"]["extra.bin"] == sha256_file(files["extra.bin"])


def test_promote_syncs_every_file_and_folder_before_the_swap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash right after the rename must not leave model/ naming unwritten data."""
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(str(Path(f"/proc/self/fd/{fd}").readlink()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    model = tmp_path / "new.keras"
    model.write_bytes(b"model")
    extra = tmp_path / "ood.npz"
    extra.write_bytes(b"ood")
    live = tmp_path / "model"
    swapped: list[int] = []
    install_model(model, {"version": "1"}, live, extras={"ood.npz": extra},
                  after_swap=lambda: swapped.append(len(synced)))  # fmt: skip
    before_swap = [Path(p) for p in synced[: swapped[0]]]
    names = {p.name for p in before_swap}
    assert {"model.keras", "ood.npz", "model.json"} <= names
    staging_dirs = [p for p in before_swap if p.name.startswith(".model.new-")]
    assert staging_dirs, "the new folder itself is synced before the swap"
    assert Path(synced[-1]) == tmp_path  # the parent, after the rename
