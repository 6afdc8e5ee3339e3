"""The request path's cheaper arithmetic gives the same bits as the plain NumPy it replaced:
MC-dropout's mean and std (chestct.inference.analysis) and the image signals read on a
contiguous copy of the sampling grid (chestct.monitoring.signals)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from chestct.imaging.body import BodyBox, body_box, body_features
from chestct.inference.analysis import analyse_outputs
from chestct.inference.loaded import Outputs
from chestct.model.calibration import softmax
from chestct.model.gradcam import CamHead
from chestct.monitoring.signals import ACQUISITION_SIGNALS, FOREGROUND_GREY, image_signals
from model_folder import ct_slice


def test_mc_dropout_mean_and_std_are_numpys_mean_and_std() -> None:
    rng = np.random.default_rng(7)
    channels, classes, samples, rate = 32, 4, 30, 0.3
    head = CamHead(
        rng.normal(0, 0.5, (channels, classes)).astype(np.float32),
        rng.normal(0, 0.1, classes).astype(np.float32),
    )
    model = SimpleNamespace(
        head=head,
        family="cnn",
        temperature=1.3,
        abstain_threshold=0.9,
        dropout_rate=rate,
        ood=None,
    )
    for seed in range(20):
        features = rng.gamma(2.0, 1.0, (1, 4, 4, channels)).astype(np.float32)
        outputs = Outputs(features, None, np.zeros((1, classes)))
        got = analyse_outputs(model, outputs, samples, seed)
        # The sampled softmaxes as analyse_outputs draws them, then NumPy's own mean and std.
        gap = features[0].reshape(-1, channels).astype(np.float64).mean(axis=0)
        masks = np.random.default_rng(seed).random((samples, channels)) < 1.0 - rate
        logits = masks @ (gap[:, None] * head.kernel) / (1.0 - rate) + head.bias
        sampled = softmax(logits, model.temperature)
        np.testing.assert_allclose(got.mc_mean, sampled.mean(axis=0), rtol=1e-12, atol=0)
        np.testing.assert_allclose(got.mc_std, sampled.std(axis=0), rtol=1e-12, atol=1e-15)


def test_mean_and_std_steps_match_numpy_bit_for_bit() -> None:
    rng = np.random.default_rng(0)
    for _ in range(2000):
        n, k = int(rng.integers(1, 64)), int(rng.integers(2, 6))
        sampled = softmax(rng.normal(0, rng.uniform(0.1, 10), (n, k)))
        mean = sampled.sum(axis=0) / n
        deviation = sampled - mean
        std = np.sqrt((deviation * deviation).sum(axis=0) / n)
        assert np.array_equal(mean, sampled.mean(axis=0))
        assert np.array_equal(std, sampled.std(axis=0))


def test_image_signals_read_the_same_pixels_as_the_strided_grid() -> None:
    for seed, side in ((0, 512), (1, 300), (2, 700)):
        grey = ct_slice(seed, size=side)
        step = max(1, max(grey.shape) // 128)
        strided = grey[::step, ::step]  # a view, as image_signals read it before
        for box in (None, body_box(grey, 0.0)):
            got = image_signals(grey, box)
            on_grid = body_box(strided, 0.0) if box is None else _grid_box(box, step, strided)
            features = body_features(strided, on_grid)
            assert got["mean_grey"] == float(strided.mean())
            assert got["foreground"] == np.count_nonzero(strided > FOREGROUND_GREY) / strided.size
            assert {k: got[k] for k in ACQUISITION_SIGNALS} == {
                k: features[k] for k in ACQUISITION_SIGNALS
            }


def _grid_box(box: BodyBox, step: int, grid: np.ndarray) -> BodyBox:
    from chestct.monitoring.signals import _on_grid

    return _on_grid(box, step, grid.shape)
