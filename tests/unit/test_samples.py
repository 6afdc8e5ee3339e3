"""`python -m chestct.cli.samples` writes slices that decode back to the same image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from chestct.cli.samples import main, write_samples
from chestct.imaging.decoding import decode
from chestct.imaging.dicom import decode_dicom
from chestct.settings import MonitorConfig
from shipped import shipped


def test_png_and_dicom_hold_the_same_slice(tmp_path: Path) -> None:
    png, dcm = write_samples(tmp_path, "normal", seed=3)
    grey = decode(png.read_bytes()).grey
    from_dicom = decode_dicom(dcm.read_bytes(), level=-600, width=1500).grey
    # Sized as the embedded dataset's exports: 180-520 px wide, 0.6-1.0 as high.
    height, width = grey.shape
    assert 180 <= width <= 520 and 0.6 * width - 1 <= height <= width
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


def test_samples_monitor_clean_against_the_embedded_reference(tmp_path: Path) -> None:
    """80 slices of `python -m chestct.cli.samples` look like the valid and test splits of the
    embedded dataset to the monitor: no acquisition signal drifts (before, square 256 px
    renders drifted in input_side, body_aspect and body_p50)."""
    from chestct.data.synthetic import generate_synthetic
    from chestct.imaging.body import body_box
    from chestct.labels import CLASSES
    from chestct.monitoring.drift import Thresholds, Window, compare
    from chestct.monitoring.signals import ACQUISITION_SIGNALS, fit_reference, image_signals
    from chestct.settings import load_settings

    params = load_settings().params
    files = generate_synthetic(
        tmp_path / "data",
        params.base.seed,
        {
            "valid": params.ingest.synthetic_per_class["valid"],
            "test": params.ingest.synthetic_per_class["test"],
        },
        series=params.ingest.synthetic_series,
    )
    greys = [decode(f.read_bytes()).grey for f in files]
    labels = [CLASSES[i % len(CLASSES)] for i in range(len(greys))]
    onehot = np.eye(len(CLASSES))[[CLASSES.index(c) for c in labels]] * 0.9 + 0.025
    profile = fit_reference(
        classes=CLASSES,
        probabilities=onehot,
        ood_distance=None,
        ood_threshold=None,
        abstain_threshold=None,
        greys=greys,
        body_crop=True,  # the default params (resize.crop: body), as evaluate fits it
    )
    names, signals = [], {name: [] for name in ("input_side", "mean_grey", "foreground")}
    signals.update({name: [] for name in ACQUISITION_SIGNALS})
    for i in range(80):
        label = CLASSES[i % len(CLASSES)]
        png = write_samples(tmp_path / "samples" / str(i), label, seed=i)[0]
        grey = decode(png.read_bytes()).grey
        measured = image_signals(grey, body_box(grey, 0.0))  # as serving reads it
        for name in signals:
            signals[name].append(measured[name])
        names.append(label)
    window = Window(labels=names, signals=signals, abstain=[None] * 80, ood=[None] * 80)
    report = compare(profile, window, Thresholds.from_config(shipped(MonitorConfig)), CLASSES)
    judged = {n: s for n, s in report["signals"].items() if s.get("judged")}
    assert set(signals) <= set(judged)
    assert report["verdict"] == "no drift", {
        n: (s["psi"], s["p_value"]) for n, s in judged.items()
    }
