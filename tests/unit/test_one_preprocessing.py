"""One shape for preprocessing (issue #23): params.yaml's `resize` keys become an
`imaging.preparation.Preprocessing` value in one place, and the card's `preprocessing` block
turns back into that value in one place; every other module passes the value on.

Read from the code with ast, like test_architecture: a module that reads `resize.crop` or a
card's `"crop_margin"` on its own would be a second shape of the same settings.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

from chestct.imaging.preparation import Preprocessing
from chestct.settings import ResizeParams
from shipped import shipped

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "chestct"
# The one module that turns params and cards into the value and back.
HOME = "imaging/preparation.py"
# `resize.workers` is how many processes resize, not how an image is prepared.
FIELDS = {f.name for f in dataclasses.fields(ResizeParams)} - {"workers"}
# Card keys read by string; `mode` is too common a word elsewhere (image modes) to search for.
CARD_KEYS = FIELDS - {"mode"}


def preprocessing_reads(path: Path) -> list[str]:
    """Where `path` reads a preprocessing setting itself: `<x>.resize.<field>` (or a `resize`
    variable's field), or a card key by string (`spec["crop"]`, `spec.get("crop_margin")`)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Attribute) and node.attr in FIELDS:
            owner = node.value
            if (isinstance(owner, ast.Attribute) and owner.attr == "resize") or (
                isinstance(owner, ast.Name) and owner.id == "resize"
            ):
                found.append(f"{node.lineno}: {ast.unparse(node)}")
        key = None
        if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
            key = node.slice.value
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "get"
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            key = node.args[0].value
        if key in CARD_KEYS:
            found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


def test_only_the_preparation_module_reads_preprocessing_settings() -> None:
    elsewhere = {
        path.relative_to(PACKAGE).as_posix(): reads
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.relative_to(PACKAGE).as_posix() != HOME and (reads := preprocessing_reads(path))
    }
    assert elsewhere == {}, "build or read an imaging.preparation.Preprocessing instead"
    assert preprocessing_reads(PACKAGE / HOME), "the rule no longer sees the one reader"


def test_the_rule_catches_a_second_reader(tmp_path: Path) -> None:
    module = tmp_path / "second.py"
    module.write_text(
        "def f(params, card):\n"
        "    a = params.resize.crop\n"
        "    b = card['preprocessing']['crop_margin']\n"
        "    c = card.get('intensity')\n"
        "    d = params.resize.workers\n"  # not a preprocessing setting
        "    return a, b, c, d\n",
        encoding="utf-8",
    )
    assert preprocessing_reads(module) == [
        "2: params.resize.crop",
        "3: card['preprocessing']['crop_margin']",
        "4: card.get('intensity')",
    ]


def test_params_to_card_and_back_is_the_same_value() -> None:
    # Every preprocessing field changed from the shipped params, so none can be dropped or
    # renamed on the way without this test seeing it.
    resize = shipped(
        ResizeParams,
        interpolation="cubic",
        mode="pad",
        crop="lungs",
        crop_margin=0.05,
        intensity="clahe",
        percentiles=[2.0, 98.0],
        clahe_clip=3.0,
    )
    value = Preprocessing.from_params(resize, 160)
    assert Preprocessing.from_card(value.to_card()) == value
    # The card names `resize.mode` as `resize` (what serving reads); every other field as is.
    assert set(value.to_card()["preprocessing"]) >= CARD_KEYS | {"resize"}
