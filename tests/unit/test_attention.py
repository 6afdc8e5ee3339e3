"""chestct.attention: the share of Grad-CAM mass inside the lung field."""

from __future__ import annotations

import numpy as np
import pytest

from chestct.attention import lung_attention, outline
from chestct.lungs import lung_field
from chestct.synthetic import render_slice


def test_lung_share_of_maps_inside_and_outside_the_lungs() -> None:
    grey = render_slice("normal", np.random.default_rng(2), size=128)
    mask = lung_field(grey).mask
    inside = mask.astype(np.float32)
    outside = (~mask).astype(np.float32)
    flat = np.zeros((128, 128), np.uint8)  # no lungs: counted apart
    found = lung_attention(np.stack([grey, grey, flat])[..., None], [inside, outside, inside])
    assert found.shares[0] == pytest.approx(1.0)
    assert found.shares[1] == pytest.approx(0.0)
    assert np.isnan(found.shares[2])
    summary = found.summary(["normal", "adenocarcinoma", "normal"])
    assert summary["lung_share"] == pytest.approx(0.5)
    assert summary["lung_share_per_class"]["normal"] == pytest.approx(1.0)
    assert summary["lung_share_per_class"]["adenocarcinoma"] == pytest.approx(0.0)
    assert summary["lung_share_per_class"]["squamous_cell_carcinoma"] is None
    assert (summary["images"], summary["without_lungs"]) == (2, 1)
    assert found.worst(5) == [1, 0]
    # A coarse CAM (feature-map resolution) is stretched over the input.
    coarse = lung_attention(grey[None], [np.ones((4, 4), np.float32)])
    assert 0.0 < coarse.shares[0] < 1.0
    drawn = outline(np.zeros((128, 128, 3), np.uint8), mask)
    assert drawn.any() and drawn.shape == (128, 128, 3)
    with pytest.raises(ValueError, match="activation maps"):
        lung_attention(grey[None], [])
