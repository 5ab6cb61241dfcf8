"""Ground-truth labels: what a value sent as a label means for a model, or why it means nothing.

One rule for every way a label arrives (HTTP `/feedback`, `everloop feedback FILE`) and for every
reader of stored labels (the monitor, the loop), so that "1", 1 and 1.0 are one class everywhere and a
label that made it into the store can always be used. The classes are a model manifest's "classes"
(JSON types, as `fit` learned them through `as_labels`: ints, strings or bools).
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Iterable, Sequence

import numpy as np

_TRUE_FALSE = {"true": True, "false": False}
_SHOWN = 60  # characters of a refused value quoted in a message


def _shown(value: Any) -> str:
    try:
        text = repr(value)
    except ValueError:  # an int of more than 4300 digits (Python's limit on int -> str), maybe inside a list
        if isinstance(value, int):
            return f"(an int of about {value.bit_length() * 0.30103:.0f} digits)"
        return f"(a {type(value).__name__} holding an int too long to show)"
    return text if len(text) <= _SHOWN else text[:_SHOWN - 3] + "..."


def _number(text: str) -> int | float | None:
    """A numeric string as an int (exactly, however large) or a float; None when it is not one.
    Underscores ("1_000", which Python's int() accepts) are not numbers in a label file."""
    if "_" in text:
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return None


def label_parser(task: str, classes: list[Any] | None) -> Callable[[Any], Any]:
    """A function value -> canonical label for one model, with the class lookup built once (about half a
    microsecond a label after that: fast enough for the monitor to check 100k stored labels).

    `task` is a manifest's "task" ("classification" or "regression"); `classes` its "classes" (None for
    regression). Classification: the label is the element of `classes` the value means. Numeric classes
    take ints, integral floats and numeric strings (1, 1.0, "1", " 1.0 " all mean 1); bool classes take
    True/False and the strings "true"/"false" (any case); string classes take the string itself, compared
    exactly after stripping surrounding whitespace. Regression: a finite float (ints and numeric strings
    accepted). Everything else (None, NaN, "", lists, dicts, bools for numbers, unknown classes) makes the
    returned function raise `ValueError` naming the value and what was expected.

    String classes that all spell whole numbers (`"0.0"`, `"1.0"`: an int label column with nulls, as
    pandas writes it, read as text) are integer classes too: 0, 0.0, "0" and "0.0" all mean the class
    "0.0" (unless two classes spell one number, e.g. "1" and "1.0": then only the exact spelling does).

    Raises `ValueError` here when `task` is unknown or a classification model lists no classes.
    Reference: the class matching follows `everloop.train.as_labels` (integer-like strings are ints)."""
    if task == "regression":
        return _parse_number
    if task != "classification":
        raise ValueError(f"unknown task {task!r}; expected 'classification' or 'regression'")
    if not classes:
        raise ValueError("a classification model without classes; its manifest lists none")
    # Keys are tagged, because True == 1 and hash(True) == hash(1) in Python: a bool must never find
    # the class 1, nor 1 the class True. Numeric keys compare by value (1 == 1.0, one key).
    lookup: dict[tuple[str, Any], Any] = {}
    for c in classes:
        if isinstance(c, (bool, np.bool_)):
            lookup[("b", bool(c))] = c
        elif isinstance(c, (int, float, np.integer, np.floating)):
            lookup[("n", c.item() if isinstance(c, np.generic) else c)] = c
        elif isinstance(c, str):
            lookup[("s", c)] = c
            lookup.setdefault(("s", c.strip()), c)
    for number, c in _whole_number_classes(classes).items():
        lookup.setdefault(("n", number), c)  # a numeric class of the same value keeps its own key
    has_bools = any(k[0] == "b" for k in lookup)
    has_numbers = any(k[0] == "n" for k in lookup)
    has_strings = any(k[0] == "s" for k in lookup)
    expected = f"expected one of the classes {list(classes)}"

    def refuse(value: Any, why: str = "") -> ValueError:
        return ValueError(f"label {_shown(value)}: {why + '; ' if why else ''}{expected}")

    def parse(value: Any) -> Any:
        kind = type(value)
        if isinstance(value, str):
            text = value.strip()
            if ("s", text) in lookup:
                return lookup[("s", text)]
            if not text:
                raise refuse(value, "empty")
            if has_bools and text.lower() in _TRUE_FALSE:
                key: tuple[str, Any] = ("b", _TRUE_FALSE[text.lower()])
            elif has_numbers and (number := _number(text)) is not None:
                key = ("n", number)
            else:
                raise refuse(value)
        elif kind is bool or isinstance(value, np.bool_):
            if not has_bools:
                raise refuse(value, "a bool means a class only when the classes are bools")
            key = ("b", bool(value))
        elif kind is int or kind is float or isinstance(value, (np.integer, np.floating)):
            number = value.item() if isinstance(value, np.generic) else value
            if number != number:  # NaN
                raise refuse(value, "not a number")
            key = ("n", number)
            if key not in lookup and has_strings and (isinstance(number, int) or number.is_integer()):
                try:
                    key = ("s", str(int(number)))  # 1 for a string class "1"
                except ValueError:  # more than 4300 digits: no class spells that
                    pass
        elif value is None:
            raise refuse(value, "missing")
        else:
            raise refuse(value, f"a {type(value).__name__} is not a label")
        try:
            return lookup[key]
        except KeyError:
            raise refuse(value, "unknown class") from None

    return parse


_WHOLE = re.compile(r"[+-]?(?:0|[1-9]\d*)(?:\.0*)?")  # `007` is a code (its zeros are part of it), not 7


def whole_numbers(texts: Iterable[str]) -> dict[str, int]:
    """{text: its number} when every text spells a whole number ("0", " 1", "1.0": an int label column
    with nulls, as pandas writes it) and no two texts spell the same number; else {} ("1" among "a",
    "b" is a name; "1" and "1.0" together: which would 1 mean?). The one rule for labels that are
    numbers written as text, used by `as_labels` and `label_parser`."""
    out: dict[str, int] = {}
    for text in set(texts):
        spelled = text.strip()
        if not _WHOLE.fullmatch(spelled):
            return {}
        try:
            out[text] = int(spelled.split(".")[0])
        except ValueError:  # more than 4300 digits: no label spells that
            return {}
    return out if len(set(out.values())) == len(out) else {}


def _whole_number_classes(classes: list[Any]) -> dict[int, str]:
    """{number: class} for string classes that all spell whole numbers (see `whole_numbers`), so that a
    label 0 finds the class "0.0"."""
    return {number: text for text, number in whole_numbers(c for c in classes if isinstance(c, str)).items()}


def _parse_number(value: Any) -> float:
    kind = type(value)
    if isinstance(value, str):
        parsed = _number(value.strip())
        if parsed is None:
            raise ValueError(f"label {_shown(value)}: expected a finite number")
    elif kind is bool or isinstance(value, np.bool_):
        raise ValueError(f"label {value!r}: a bool is not a number; expected a finite number")
    elif kind is int or kind is float or isinstance(value, (np.integer, np.floating)):
        parsed = value
    else:
        raise ValueError(f"label {_shown(value)}: expected a finite number")
    try:
        number = float(parsed)
    except OverflowError:  # an int past the float range
        number = math.inf
    if not math.isfinite(number):
        raise ValueError(f"label {_shown(value)}: expected a finite number")
    return number


def parse_label(task: str, classes: list[Any] | None, value: Any) -> Any:
    """The canonical label `value` means for a model of `task` with `classes` (a manifest's fields): the
    element of `classes` for classification, a finite float for regression. Raises `ValueError` naming the
    value and what is expected when it means none. For many labels of one model, build the lookup once
    with `label_parser(task, classes)`; this function is that, for one value."""
    return label_parser(task, classes)(value)


def valid_labels(task: str, classes: list[Any] | None, values: Sequence[Any]) -> tuple[list[int], list[Any]]:
    """The stored labels that are valid for a model: (their positions in `values`, the parsed labels),
    both of the same length. A label that does not parse (stored by an older build or another tool) is
    left out: never scored, never trained on, never a crash."""
    parse = label_parser(task, classes)
    keep, parsed = [], []
    for n, value in enumerate(values):
        try:
            parsed.append(parse(value))
        except ValueError:
            continue
        keep.append(n)
    return keep, parsed
