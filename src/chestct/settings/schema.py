"""How a settings file becomes a frozen dataclass: types, choices and ranges, checked once.

A settings field is declared with `key(description, ge=..., lt=..., off=...)`: a field without
a default (the value comes from the YAML file alone), whose description and range live in its
metadata. `build` checks a mapping against a dataclass: unknown keys, types, `Literal` choices,
ranges, then missing keys; `entries` lists every leaf key with its type, allowed values and
description for the generated reference (docs/generated/params.md).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal


class SettingsError(ValueError):
    """A settings file is missing, malformed, or has a wrong key or value."""


@dataclass(frozen=True)
class Rule:
    """What a key means and which numbers it takes (None: no bound on that side)."""

    doc: str
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    off: float | None = None  # a value outside the range that turns the feature off (-1)


def key(
    doc: str,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    off: float | None = None,
) -> Any:
    """A settings field: required (its value comes from the file), described, bounded. The
    bounds hold for a number, for each item of a list and for each value of a mapping."""
    return field(metadata={"rule": Rule(doc, ge, gt, le, lt, off)})


def rule_of(item: dataclasses.Field[Any]) -> Rule | None:
    return item.metadata.get("rule")


def _number(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def bounds_text(rule: Rule, tp: Any = float) -> str:
    """The range of `rule` as people read it: `>= 0`, `at least 1`, `0..1`, `(0, 1]`."""
    low = rule.ge if rule.ge is not None else rule.gt
    high = rule.le if rule.le is not None else rule.lt
    if low is not None and high is not None:
        if rule.ge is not None and rule.le is not None:
            text = f"{_number(low)}..{_number(high)}"
        else:
            opening = "[" if rule.ge is not None else "("
            closing = "]" if rule.le is not None else ")"
            text = f"{opening}{_number(low)}, {_number(high)}{closing}"
    elif rule.ge is not None and tp is int and rule.ge >= 1:
        text = f"at least {_number(rule.ge)}"
    elif low is not None:
        text = f"{'>=' if rule.ge is not None else '>'} {_number(low)}"
    elif high is not None:
        text = f"{'<=' if rule.le is not None else '<'} {_number(high)}"
    else:
        return ""
    return text + (f", or {_number(rule.off)} (off)" if rule.off is not None else "")


def _within(value: float, rule: Rule) -> bool:
    if rule.off is not None and value == rule.off:
        return True
    return not (
        (rule.ge is not None and value < rule.ge)
        or (rule.gt is not None and value <= rule.gt)
        or (rule.le is not None and value > rule.le)
        or (rule.lt is not None and value >= rule.lt)
    )


def check_bounds(value: Any, rule: Rule, tp: Any, where: str) -> None:
    """Raise when a number (or an item of a list or mapping) lies outside `rule`'s range."""
    if isinstance(value, list):
        items = value
    elif isinstance(value, dict):
        items = list(value.values())
    else:
        items = [value]
    for item in items:
        number = isinstance(item, int | float) and not isinstance(item, bool)
        if number and not _within(item, rule):
            phrase = bounds_text(rule, _item_type(tp))
            wording = "in " + phrase if phrase[0] in "[(-0123456789" else phrase
            raise SettingsError(f"{where}: must be {wording}, got {_number(item)}")


def _item_type(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin is list:
        return typing.get_args(tp)[0]
    if origin is dict:
        return typing.get_args(tp)[1]
    return tp


def describe(tp: Any) -> str:
    """A type as the reference and the error messages name it."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if origin is list:
        return f"list of {describe(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"mapping to {describe(typing.get_args(tp)[1])}"
    return getattr(tp, "__name__", str(tp))


def _coerce_container(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise SettingsError(f"{where}: expected a list, got {value!r}")
        return [coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    key_tp, val_tp = typing.get_args(tp)
    if not isinstance(value, dict):
        raise SettingsError(f"{where}: expected a mapping, got {value!r}")
    return {
        coerce(k, key_tp, f"{where} key"): coerce(v, val_tp, f"{where}.{k}")
        for k, v in value.items()
    }


_SCALARS: dict[Any, tuple[tuple[type, ...], str]] = {
    float: ((int, float), "a number"),
    int: ((int,), "an integer"),
    bool: ((bool,), "true or false"),
    str: ((str,), "a string"),
}


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against type `tp`; return it converted (ints accepted as floats)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise SettingsError(f"{where}: expected a mapping, got {value!r}")
        return build(tp, value, where)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise SettingsError(
                f"{where}: {value!r} is not allowed; use one of {', '.join(map(repr, allowed))}"
            )
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return coerce(value, arg, where)
            except SettingsError:
                continue
        raise SettingsError(f"{where}: {value!r} is not {describe(tp)}")
    if origin in (list, dict):
        return _coerce_container(value, tp, where)
    if tp not in _SCALARS:
        raise TypeError(f"unsupported settings type {tp!r} at {where}")
    kinds, wording = _SCALARS[tp]
    if not isinstance(value, kinds) or (tp is not bool and isinstance(value, bool)):
        raise SettingsError(f"{where}: expected {wording}, got {value!r}")
    return float(value) if tp is float else value


def build(cls: type, data: dict[str, Any] | None, where: str) -> Any:
    """Build dataclass `cls` from a mapping: an unknown key is named with the known ones, each
    value is checked for its type, choices and range, and a missing key is named with where to
    find its value."""
    data = data or {}
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    known = [f.name for f in fields]
    unknown = [k for k in data if k not in known]
    if unknown:
        raise SettingsError(
            f"{where or 'top level'}: unknown key {unknown[0]!r}; "
            f"allowed keys are {', '.join(known)}"
        )
    values = {}
    for item in fields:
        if item.name not in data:
            continue
        path = f"{where}.{item.name}" if where else item.name
        values[item.name] = coerce(data[item.name], hints[item.name], path)
        rule = rule_of(item)
        if rule is not None:
            check_bounds(values[item.name], rule, hints[item.name], path)
    missing = [f.name for f in fields if f.name not in data and f.init]
    if missing:
        raise SettingsError(
            f"{where or 'top level'}: missing key {missing[0]!r}; every key is set in the "
            f"file, none has a built-in default: add `{missing[0]}: <value>`"
            + (f" under `{where}`" if where else "")
            + " (its shipped value and range are in docs/params.md)"
        )
    return cls(**values)


@dataclass(frozen=True)
class Entry:
    """One leaf key of a settings tree, for the generated reference."""

    key: str
    type: str  # int, float, str, bool, list of float, mapping to int, ...
    choices: tuple[Any, ...]  # the allowed values of a Literal (of its items), else ()
    bounds: str  # the range as people read it ("", ">= 0", "0..1", "(0, 1]", ...)
    doc: str


def entries(cls: type, prefix: str = "") -> Iterator[Entry]:
    """Every leaf key of dataclass `cls` (nested groups walked), in declaration order."""
    hints = typing.get_type_hints(cls)
    for item in dataclasses.fields(cls):
        tp = hints[item.name]
        name = f"{prefix}{item.name}"
        if dataclasses.is_dataclass(tp):
            yield from entries(tp, f"{name}.")
            continue
        rule = rule_of(item)
        if rule is None:
            raise TypeError(f"{name}: declare it with chestct.settings.schema.key(description)")
        item_tp = _item_type(tp)
        choices = typing.get_args(item_tp) if typing.get_origin(item_tp) is Literal else ()
        yield Entry(name, describe(tp), choices, bounds_text(rule, item_tp), rule.doc)
