"""chestct.evaluation.attention: the share of Grad-CAM mass inside the lung field."""

from __future__ import annotations

import numpy as np
import pytest

from chestct.data.synthetic import PATIENT_FIELD, render_slice
from chestct.evaluation.attention import lung_attention, outline
from chestct.imaging.lungs import lung_field
from chestct.imaging.preparation import Preprocessing, prepare_slice


def test_lung_share_of_maps_inside_and_outside_the_lungs() -> None:
    grey = render_slice("normal", np.random.default_rng(2), size=128)
    mask = lung_field(grey).mask
    whole = prepare_slice(grey, Preprocessing(128)).box  # no crop: the model input is the frame
    inside, outside = mask.astype(np.float32), (~mask).astype(np.float32)
    flat = np.zeros((128, 128), np.uint8)  # no lungs: counted apart
    found = lung_attention([grey, grey, flat], [whole] * 3, [inside, outside, inside])
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
    drawn = outline(np.zeros((128, 128, 3), np.uint8), mask)
    assert drawn.any() and drawn.shape == (128, 128, 3)
    with pytest.raises(ValueError, match="activation maps"):
        lung_attention([grey], [whole], [])


def test_lung_share_puts_the_map_back_through_the_crop() -> None:
    """A map over a body-cropped input lands on the original slice's lungs: a uniform map over
    the crop has the share of the lungs in the body box, not in the whole frame."""
    grey = render_slice("normal", np.random.default_rng(3), 192, patient_field=PATIENT_FIELD)
    framed = np.zeros((256, 320), np.uint8)
    framed[40:232, 100:292] = grey  # the body off-centre in a wider frame
    box = prepare_slice(framed, Preprocessing(64, crop="body")).box
    uniform = np.ones((4, 4), np.float32)
    share = lung_attention([framed], [box], [uniform]).shares[0]
    mask = lung_field(framed).mask
    in_box = mask[max(box.y, 0) : box.y + box.h, max(box.x, 0) : box.x + box.w]
    assert share == pytest.approx(in_box.mean(), abs=0.02)
    assert share > mask.mean() + 0.05  # the frame's empty margin holds no CAM mass
