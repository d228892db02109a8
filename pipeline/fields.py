"""One typed setting (type, default, limits) and the check that a sweep value meets it.

The same ``Field`` describes the built-in training keys (``pipeline/sweep_schema.py``) and every
method parameter declared in a ``METHOD`` literal (``pipeline/catalogue.py``), so that a sweep
value is checked by one rule whichever of the two it belongs to.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from pipeline.initial_weights import InitValueError, check_init

TYPES = ("int", "float", "str", "bool", "list", "init")
_TYPE_NAMES = {"int": "an int", "float": "a number", "str": "a string", "bool": "true or false", "list": "a list",
               "init": "a weights source"}


class FieldError(ValueError):
    """A value that does not meet its field; the caller adds the file and key path."""

    def __init__(self, problem: str, allowed: Iterable[Any] = ()):
        super().__init__(problem)
        self.problem = problem
        self.allowed = tuple(str(value) for value in allowed)


@dataclass(frozen=True)
class Field:
    """A typed setting. ``required`` fields have no default: the sweep must set them.

    ``tap`` ("teacher" or "student") says the value names a feature tap of that model, by name or
    by generalised-layer index (an int >= 0); which names and how many layers exist depend on the
    pair being planned, so that part is checked separately (``check_tap``).
    For a list, ``length`` fixes its length, ``item_type`` (if set) types its items, and
    ``min``/``max``/``choices``/``tap`` apply per item.
    """

    type: str
    default: Any = None
    required: bool = False
    min: float | None = None
    max: float | None = None
    choices: tuple[Any, ...] | None = None
    tap: str | None = None
    length: int | None = None
    item_type: str | None = None
    help: str = ""

    def check(self, value: Any) -> Any:
        """``value`` in canonical form (ints given for a float field become floats), or FieldError."""
        if value is None and self.default is None and not self.required:
            return None
        if self.type == "list":
            if not isinstance(value, list):
                raise FieldError(f"must be a list, got {_describe(value)}")
            if self.length is not None and len(value) != self.length:
                raise FieldError(f"must be a list of {self.length} items, got {len(value)}")
            return [self._check_item(item) for item in value]
        return self._check_item(value if self.tap is not None else _check_type(value, self.type))

    def _check_item(self, value: Any) -> Any:
        if self.tap is not None:
            if _is_int(value):
                return _layer_index(value)
            if not isinstance(value, str):
                raise FieldError(f"must be a tap name or a generalised layer index, got {_describe(value)}")
        elif self.type == "list" and self.item_type is not None:
            value = _check_type(value, self.item_type)
        if self.choices is not None and value not in self.choices:
            raise FieldError(f"{value!r} is not allowed", self.choices)
        if self.min is not None or self.max is not None:
            if not _is_number(value):
                raise FieldError(f"must be a number, got {_describe(value)}")
            if self.min is not None and value < self.min:
                raise FieldError(f"{value!r} is below the minimum {self.min!r}")
            if self.max is not None and value > self.max:
                raise FieldError(f"{value!r} is above the maximum {self.max!r}")
        return value


def _check_type(value: Any, type_name: str) -> Any:
    if type_name == "bool" and isinstance(value, bool):
        return value
    if type_name == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if type_name == "float" and _is_number(value):
        if not math.isfinite(value):
            raise FieldError(f"must be a finite number, got {value!r}")
        return float(value)
    if type_name == "str" and isinstance(value, str):
        return value
    if type_name == "init":
        try:
            return check_init(value)
        except InitValueError as error:
            raise FieldError(error.problem, error.allowed) from None
    raise FieldError(f"must be {_TYPE_NAMES[type_name]}, got {_describe(value)}")


def check_tap(field: Field, value: Any, taps: Sequence[str], layers: Sequence[str], arch: str) -> None:
    """Raise FieldError unless ``value`` (or each item of a list) is one of ``arch``'s declared
    ``taps``, one of its generalised ``layers`` by name, or an index into ``layers``."""
    allowed = (f"0..{len(layers) - 1}", *taps)
    where = f"{field.tap} {arch}'s {len(layers)} generalised layers (runner.py layers {arch} lists them)"
    for item in value if isinstance(value, list) else [value]:
        if _is_int(item) and not 0 <= item < len(layers):
            raise FieldError(f"{item} is out of range for {where}", allowed)
        if not _is_int(item) and item not in taps and item not in layers:
            raise FieldError(f"{item!r} is not a tap of {field.tap} {arch}, nor one of its {len(layers)} generalised layers", allowed)


def unknown_key(key: str, allowed: Sequence[str], what: str = "key") -> FieldError:
    """The error for a key outside ``allowed``, suggesting the closest allowed one."""
    close = difflib.get_close_matches(str(key), list(allowed), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return FieldError(f"unknown {what} {key!r}{hint}", allowed)


def _layer_index(value: int) -> int:
    if value < 0:
        raise FieldError(f"{value} is negative; generalised layers count from 0", ["an index >= 0", "a tap name"])
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    return f"{type(value).__name__} {value!r}"
