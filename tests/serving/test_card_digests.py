"""Every file the card names carries a sha256, checked at load and at hot reload; promote keeps
model/ only when recording the swap succeeds (issue 12)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from chestct.fsutil import replace_dir, sha256_file
from chestct.inference import ModelRefused, load_folder
from chestct.serving import create_app
from chestct.stages.promote import file_digests, install_model, read_card
from model_folder import multipart, slice_png

PINNED = ("inference", "cam", "ood")


def pinned_copy(source: Path, target: Path) -> Path:
    """A copy of a model folder whose card gives the sha256 of every file, as promote writes."""
    shutil.copytree(source, target)
    card = json.loads((target / "model.json").read_text())
    files = {card[k]["file"]: target / card[k]["file"] for k in PINNED}
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
