"""Folder names found in the wild map to the four canonical labels."""

from __future__ import annotations

import pytest

from chestct.labels import CLASSES, DISPLAY_NAMES, label_for_folder
from helpers import LONG_FOLDERS, SHORT_FOLDERS


@pytest.mark.parametrize(
    ("folder", "label"),
    [
        ("adenocarcinoma_left.lower.lobe_T2_N0_M0_Ib", "adenocarcinoma"),
        ("large.cell.carcinoma_left.hilum_T2_N2_M0_IIIa", "large_cell_carcinoma"),
        ("squamous.cell.carcinoma_left.hilum_T1_N2_M0_IIIa", "squamous_cell_carcinoma"),
        ("normal", "normal"),
    ],
)
def test_long_kaggle_names(folder: str, label: str) -> None:
    assert label_for_folder(folder) == label


@pytest.mark.parametrize(
    ("folder", "label"),
    [
        ("adenocarcinoma", "adenocarcinoma"),
        ("large.cell.carcinoma", "large_cell_carcinoma"),
        ("squamous.cell.carcinoma", "squamous_cell_carcinoma"),
        ("large_cell_carcinoma", "large_cell_carcinoma"),
        ("Large Cell Carcinoma", "large_cell_carcinoma"),
        ("SQUAMOUS-cell-carcinoma", "squamous_cell_carcinoma"),
        ("  Normal ", "normal"),
    ],
)
def test_short_and_differently_spelled_names(folder: str, label: str) -> None:
    assert label_for_folder(folder) == label


def test_helper_folder_tables_cover_every_class() -> None:
    for table in (LONG_FOLDERS, SHORT_FOLDERS):
        assert sorted(label_for_folder(f) for f in table.values()) == sorted(CLASSES)


@pytest.mark.parametrize("folder", ["benign", "abnormal", "cells", "", "__MACOSX", "large"])
def test_unknown_folder_names_give_none(folder: str) -> None:
    assert label_for_folder(folder) is None


def test_class_map_adds_aliases() -> None:
    class_map = {"adeno": "adenocarcinoma", "SCC": "squamous_cell_carcinoma"}
    assert label_for_folder("adeno", class_map) == "adenocarcinoma"
    assert label_for_folder("Adeno", class_map) == "adenocarcinoma"
    assert label_for_folder("scc", class_map) == "squamous_cell_carcinoma"
    # Names the map does not know still fall back to the built-in prefixes.
    assert label_for_folder("normal", class_map) == "normal"
    assert label_for_folder("benign", class_map) is None


def test_class_map_wins_over_the_built_in_prefixes() -> None:
    assert label_for_folder("normal_controls", {"normal_controls": "adenocarcinoma"}) == (
        "adenocarcinoma"
    )


def test_class_map_value_is_returned_as_given() -> None:
    # Checking that it is a real class is ingest's job, which names the param in its error.
    assert label_for_folder("x", {"x": "tumour"}) == "tumour"


def test_every_class_has_a_display_name() -> None:
    assert set(DISPLAY_NAMES) == set(CLASSES)
    assert len(CLASSES) == 4
