"""`python -m chestct.samples` writes slices that decode back to the same image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from chestct.imaging import decode, decode_dicom
from chestct.samples import main, write_samples


def test_png_and_dicom_hold_the_same_slice(tmp_path: Path) -> None:
    png, dcm = write_samples(tmp_path, "normal", seed=3)
    grey = decode(png.read_bytes()).grey
    from_dicom = decode_dicom(dcm.read_bytes(), level=-600, width=1500).grey
    assert grey.shape == (256, 256)
    assert np.array_equal(grey, from_dicom)
    assert grey.std() > 20  # a slice with anatomy, not a blank


def test_seed_and_label_change_the_slice(tmp_path: Path) -> None:
    a = decode(write_samples(tmp_path / "a", "normal", seed=1)[0].read_bytes()).grey
    b = decode(write_samples(tmp_path / "b", "normal", seed=2)[0].read_bytes()).grey
    c = decode(write_samples(tmp_path / "c", "normal", seed=1)[0].read_bytes()).grey
    assert not np.array_equal(a, b)
    assert np.array_equal(a, c)


def test_unknown_label_names_the_choices(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="adenocarcinoma"):
        write_samples(tmp_path, "flu", seed=0)


def test_cli_writes_into_the_folder_asked(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    main(["--out", str(tmp_path / "out"), "--label", "adenocarcinoma"])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["slice.dcm", "slice.png"]
    out = capsys.readouterr().out.splitlines()
    assert out == [
        f"{tmp_path / 'out' / 'slice.png'}: a synthetic adenocarcinoma slice (seed 0)",
        f"{tmp_path / 'out' / 'slice.dcm'}: a synthetic adenocarcinoma slice (seed 0)",
    ]
