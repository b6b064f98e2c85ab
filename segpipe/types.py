"""Small value objects shared by every layer (no IO beyond classes files)."""

from __future__ import annotations

import json
import numbers
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from segpipe.errors import InputError, MissingInputError

__all__ = [
    "ClassInfo",
    "Grid",
    "class_flags",
    "classes_from_bytes",
    "classes_from_json",
    "classes_to_json",
    "default_colour",
    "read_classes_file",
    "write_classes_file",
]

_HEX = re.compile(r"^#[0-9a-fA-F]{6}$")

# A qualitative palette readable on maps; class k takes entry (k - 1) mod len.
_PALETTE = (
    "#d62728", "#e8c547", "#98df8a", "#8c564b", "#1f7a1f", "#1f77b4",
    "#c7c7c7", "#ff7f0e", "#9467bd", "#17becf", "#bcbd22", "#e377c2",
)


def default_colour(value: int) -> str:
    """Colour given to a class that has none.

    Args:
        value: The class value (1-254).

    Returns:
        A ``#rrggbb`` string.
    """
    return _PALETTE[(value - 1) % len(_PALETTE)]


@dataclass(frozen=True)
class ClassInfo:
    """One land-cover class.

    Attributes:
        value: Pixel value in label and class rasters, 1-254 (0 = unlabelled,
            255 = nodata).
        name: Human-readable name.
        colour: ``#rrggbb`` display colour.
    """

    value: int
    name: str
    colour: str

    def __post_init__(self) -> None:
        if not 1 <= self.value <= 254:
            raise InputError(
                f"class value {self.value} is out of range: use 1-254 "
                "(0 means unlabelled and 255 is nodata)"
            )
        if not _HEX.match(self.colour):
            raise InputError(f"class {self.value} colour {self.colour!r} is not '#rrggbb'")

    @property
    def rgb(self) -> tuple[int, int, int]:
        """The colour as an (r, g, b) tuple of 0-255 ints."""
        return tuple(int(self.colour[i : i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]


def classes_to_json(classes: Sequence[ClassInfo]) -> list[dict[str, Any]]:
    """Serialise classes to plain dicts (for JSON files and Zarr attributes)."""
    return [{"value": c.value, "name": c.name, "colour": c.colour} for c in classes]


def class_flags(classes: Sequence[ClassInfo]) -> dict[str, Any]:
    """CF flag attributes of a class layer: values, meanings (one word each, as CF wants) and colours.

    xarray, Panoply and other CF readers label the values with ``flag_meanings``.
    """
    words = (re.sub(r"[^0-9A-Za-z_]+", "_", c.name.strip()).strip("_") for c in classes)
    meanings = [w or f"class_{c.value}" for w, c in zip(words, classes, strict=True)]
    return {
        "flag_values": [c.value for c in classes],
        "flag_meanings": " ".join(meanings),
        "flag_colors": " ".join(c.colour for c in classes),
    }


_VALUE_RULE = "class values are integers 1-254 (0 means unlabelled and 255 is nodata)"
_ENTRY_EXAMPLE = '{"value": 1, "name": "water", "colour": "#1f77b4"}'


def _shown(item: object) -> str:
    """An entry as the user wrote it (JSON), cut short so the message stays one readable line."""
    try:
        text = json.dumps(item, ensure_ascii=False)
    except (TypeError, ValueError):  # not JSON-able (from an API caller): Python's repr will do
        text = repr(item)
    return text if len(text) <= 80 else text[:79] + "…"


def _class_value(raw: object) -> int | None:
    """``raw`` as a class value 1-254, or None when it is not one.

    Integral numbers (``2``, ``2.0``) and decimal strings (``"2"``) are accepted, as
    ``int()`` accepted them before; booleans and fractions are not, since ``int()``
    would silently turn ``true`` or ``1.5`` into class 1.
    """
    if isinstance(raw, bool):
        return None
    if isinstance(raw, float) and raw.is_integer():
        raw = int(raw)
    if isinstance(raw, str) and raw.strip().isdecimal():
        raw = int(raw)
    if not isinstance(raw, numbers.Integral):  # numpy integers too, from API callers
        return None
    value = int(raw)
    return value if 1 <= value <= 254 else None


def _class_entry(item: object, where: str) -> ClassInfo:
    """One ``{value, name, colour}`` entry; ``where`` names it (file and position) in every message."""
    if not isinstance(item, dict):
        raise InputError(f"{where} ({_shown(item)}) is not an object: write each class as {_ENTRY_EXAMPLE}")
    if "value" not in item:
        raise InputError(f'{where} ({_shown(item)}) has no "value": give each class a value; {_VALUE_RULE}')
    value = _class_value(item["value"])
    if value is None:
        raise InputError(f"{where} ({_shown(item)}) has value {_shown(item['value'])}: {_VALUE_RULE}")
    colour = item.get("colour", item.get("color")) or default_colour(value)
    if not isinstance(colour, str) or not _HEX.match(colour):
        raise InputError(
            f"{where} ({_shown(item)}) has colour {_shown(colour)}: write it as '#rrggbb' "
            "(e.g. '#1f77b4') or leave it out for a default colour"
        )
    name = item.get("name")
    return ClassInfo(value, f"class {value}" if name is None else str(name), colour)


def classes_from_json(items: Iterable[Any], source: str | None = None) -> list[ClassInfo]:
    """Parse classes from dicts; ``color`` is accepted as well as ``colour``.

    Args:
        items: ``{value, name, colour}`` dicts; ``name`` and ``colour`` are optional.
        source: What the entries come from (``classes file x.json``), named at the head
            of every message; None for callers that name it themselves.

    Returns:
        The classes, sorted by value.

    Raises:
        InputError: An entry is not a dict, or its value is missing, not an integer
            1-254 or repeated, or its colour is not ``#rrggbb``; the message names the
            entry (and ``source``) and says what to write instead.
    """
    head = f"{source}: " if source else ""
    out = [_class_entry(item, f"{head}class entry {n}") for n, item in enumerate(items, 1)]
    _check_unique(out, head)
    return sorted(out, key=lambda c: c.value)


def _check_unique(classes: Sequence[ClassInfo], head: str) -> None:
    """Refuse two entries of one value, naming the first such pair (entries count from 1)."""
    first: dict[int, int] = {}
    for n, c in enumerate(classes, 1):
        if c.value in first:
            raise InputError(
                f"{head}class entries {first[c.value]} and {n} both have value {c.value}: "
                "give each class a value of its own"
            )
        first[c.value] = n


def read_classes_file(path: str | Path) -> list[ClassInfo]:
    """Read a classes JSON file: a list of ``{value, name, colour}`` or ``{"classes": [...]}``.

    Raises:
        MissingInputError: The file does not exist.
        InputError: The file is not valid JSON of that shape, or an entry is unusable
            (see :func:`classes_from_json`); the message names the file.
    """
    p = Path(path)
    if not p.is_file():
        raise MissingInputError(f"classes file {p} does not exist")
    return classes_from_bytes(p.read_bytes(), str(p))


def classes_from_bytes(text: bytes, name: str) -> list[ClassInfo]:
    """Parse the bytes of a classes file (read from a disk or object storage) named ``name`` in messages.

    Raises:
        InputError: Not valid JSON of the classes file's shape, or an entry is unusable
            (see :func:`classes_from_json`); the message names ``name``.
    """
    try:
        data = json.loads(text)
    except ValueError as exc:  # JSONDecodeError, or UnicodeDecodeError for a binary file
        raise InputError(f"classes file {name} is not valid JSON: {exc}") from exc
    if isinstance(data, dict):
        data = data.get("classes", [])
    if not isinstance(data, list) or not data:
        raise InputError(
            f'classes file {name} holds no list of classes: write {{"classes": [{_ENTRY_EXAMPLE}, ...]}}'
        )
    return classes_from_json(data, f"classes file {name}")


def write_classes_file(path: str | Path, classes: Sequence[ClassInfo]) -> None:
    """Write classes as ``{"classes": [...]}`` JSON."""
    Path(path).write_text(json.dumps({"classes": classes_to_json(classes)}, indent=2) + "\n")


@dataclass(frozen=True)
class Grid:
    """A georeferenced pixel grid: what labels and references are warped onto.

    Attributes:
        crs_wkt: CRS as WKT ("" if unknown).
        transform: Affine transform as (a, b, c, d, e, f).
        height: Rows.
        width: Columns.
    """

    crs_wkt: str
    transform: tuple[float, float, float, float, float, float]
    height: int
    width: int
