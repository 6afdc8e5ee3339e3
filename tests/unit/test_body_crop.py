"""imaging.body_box: the body's bounding box on crafted slices, or the whole frame and why."""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest

from chestct.imaging.body import BodyBox, body_box
from helpers import chest

# The crafted body: an ellipse centred at (CX, CY) with semi-axes (AX, AY) in a FRAME_W x FRAME_H
# frame, so its true box is [CX-AX, CX+AX] x [CY-AY, CY+AY].
FRAME_W, FRAME_H = 320, 240
CX, CY, AX, AY = 150, 110, 100, 70


def assert_box_near(box: BodyBox, left: int, top: int, right: int, bottom: int) -> None:
    """The box hugs [left, right) x [top, bottom) within the margin plus a few pixels."""
    assert box.found, box.reason
    slack_x = 4 + round(0.03 * (right - left))
    slack_y = 4 + round(0.03 * (bottom - top))
    assert abs(box.x - left) <= slack_x, box
    assert abs(box.y - top) <= slack_y, box
    assert abs(box.x + box.w - right) <= slack_x, box
    assert abs(box.y + box.h - bottom) <= slack_y, box


def test_plain_body_is_boxed_with_a_small_margin() -> None:
    box = body_box(chest(), margin=0.02)
    assert_box_near(box, CX - AX, CY - AY, CX + AX + 1, CY + AY + 1)
    # The margin keeps the edge of the body inside the box.
    tight = body_box(chest(), margin=0.0)
    assert box.x < tight.x and box.x + box.w > tight.x + tight.w


def test_scanner_table_under_the_body_is_cut_off() -> None:
    grey = chest()
    # A thin bright band wider than the body, just below it: the table seen edge-on.
    cv2.rectangle(grey, (20, CY + AY + 8), (FRAME_W - 20, CY + AY + 14), 200, -1)
    assert_box_near(body_box(grey), CX - AX, CY - AY, CX + AX + 1, CY + AY + 1)


def test_curved_table_running_off_the_frame_is_cut_off() -> None:
    grey = chest()
    # An arc a few pixels under the body (the pad between them), leaving the frame at both sides.
    cv2.ellipse(grey, (CX, CY + AY + 210), (260, 195), 0, 200, 340, 180, 6)
    assert_box_near(body_box(grey), CX - AX, CY - AY, CX + AX + 1, CY + AY + 1)


def test_thick_flat_table_under_the_body_is_cut_off() -> None:
    grey = chest()
    # Thicker than the round opening removes: the tall opening must take it.
    cv2.rectangle(grey, (10, CY + AY + 6), (FRAME_W - 10, CY + AY + 16), 170, -1)
    assert_box_near(body_box(grey), CX - AX, CY - AY, CX + AX + 1, CY + AY + 1)


def test_burned_in_text_and_a_ruler_are_ignored() -> None:
    grey = chest()
    cv2.putText(grey, "R 2019-03-04 W1500", (5, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.45, 255, 1)
    cv2.putText(grey, "L", (FRAME_W - 25, FRAME_H - 10), cv2.FONT_HERSHEY_SIMPLEX, 0.8, 255, 2)
    # A ruler down the right edge, with ticks.
    cv2.line(grey, (FRAME_W - 8, 20), (FRAME_W - 8, FRAME_H - 40), 255, 2)
    for y in range(20, FRAME_H - 40, 10):
        cv2.line(grey, (FRAME_W - 14, y), (FRAME_W - 8, y), 255, 1)
    assert_box_near(body_box(grey), CX - AX, CY - AY, CX + AX + 1, CY + AY + 1)


def test_a_body_split_in_two_keeps_both_halves() -> None:
    grey = np.zeros((FRAME_H, FRAME_W), np.uint8)
    cv2.ellipse(grey, (100, 120), (60, 80), 0, 0, 360, 130, -1)
    cv2.ellipse(grey, (230, 120), (55, 75), 0, 0, 360, 130, -1)
    assert_box_near(body_box(grey), 40, 40, 286, 201)


def test_a_small_extra_blob_does_not_widen_the_box() -> None:
    grey = chest()
    cv2.circle(grey, (FRAME_W - 20, 20), 9, 150, -1)  # an ECG electrode, a marker
    assert_box_near(body_box(grey), CX - AX, CY - AY, CX + AX + 1, CY + AY + 1)


def test_box_scales_with_a_large_slice() -> None:
    big = cv2.resize(chest(), (FRAME_W * 4, FRAME_H * 4), interpolation=cv2.INTER_NEAREST)
    box = body_box(big)
    assert_box_near(box, 4 * (CX - AX), 4 * (CY - AY), 4 * (CX + AX + 1), 4 * (CY + AY + 1))


@pytest.mark.parametrize(
    ("grey", "reason"),
    [
        (np.zeros((FRAME_H, FRAME_W), np.uint8), "uniformly black"),
        (np.full((FRAME_H, FRAME_W), 255, np.uint8), "uniformly bright"),
        (np.zeros((10, 300), np.uint8), "too small"),
    ],
    ids=["black", "white", "tiny-frame"],
)
def test_blank_or_tiny_slices_fall_back_to_the_whole_frame(grey: np.ndarray, reason: str) -> None:
    box = body_box(grey)
    assert not box.found
    assert reason in box.reason
    assert (box.x, box.y, box.w, box.h) == (0, 0, grey.shape[1], grey.shape[0])


def test_a_speck_is_not_a_body() -> None:
    grey = np.zeros((FRAME_H, FRAME_W), np.uint8)
    cv2.circle(grey, (100, 100), 8, 200, -1)
    box = body_box(grey)
    assert not box.found
    assert "too small to be a body" in box.reason
    assert (box.w, box.h) == (FRAME_W, FRAME_H)


def test_bright_frame_with_dark_lungs_only_falls_back() -> None:
    grey = np.full((FRAME_H, FRAME_W), 200, np.uint8)
    cv2.circle(grey, (160, 120), 4, 10, -1)
    box = body_box(grey)
    assert not box.found
    assert "no dark surround" in box.reason


def test_crop_returns_the_pixels_inside_the_box() -> None:
    grey = chest()
    box = body_box(grey)
    np.testing.assert_array_equal(
        box.crop(grey), grey[box.y : box.y + box.h, box.x : box.x + box.w]
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        box.x = 3  # type: ignore[misc]
