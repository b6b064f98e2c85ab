"""Small value objects shared by every layer (no IO beyond classes files)."""

from __future__ import annotations

import json
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


def classes_from_json(items: Iterable[dict[str, Any]]) -> list[ClassInfo]:
    """Parse classes from dicts; ``color`` is accepted as well as ``colour``.

    Raises:
        InputError: A value is missing, duplicated or out of range.
    """
    out: list[ClassInfo] = []
    for item in items:
        if "value" not in item:
            raise InputError(f"class entry {item!r} has no 'value'")
        value = int(item["value"])
        colour = item.get("colour", item.get("color")) or default_colour(value)
        out.append(ClassInfo(value, str(item.get("name", f"class {value}")), str(colour)))
    values = [c.value for c in out]
    if len(set(values)) != len(values):
        raise InputError(f"class values repeat: {sorted(values)}")
    return sorted(out, key=lambda c: c.value)


def read_classes_file(path: str | Path) -> list[ClassInfo]:
    """Read a classes JSON file: a list of ``{value, name, colour}`` or ``{"classes": [...]}``.

    Raises:
        MissingInputError: The file does not exist.
        InputError: The file is not valid JSON of that shape.
    """
    p = Path(path)
    if not p.is_file():
        raise MissingInputError(f"classes file {p} does not exist")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"classes file {p} is not valid JSON: {exc}") from exc
    if isinstance(data, dict):
        data = data.get("classes", [])
    if not isinstance(data, list) or not data:
        raise InputError(f"classes file {p} holds no list of classes")
    return classes_from_json(data)


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
