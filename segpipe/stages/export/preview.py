"""A quick look at an exported layer without a GIS: ``segpipe preview COG --out preview.png``.

The COG is read at a size that fits ``max_size`` pixels a side; GDAL then reads the
overview nearest that size (mode overviews for classes), so a whole region costs one
small read however large it is. A class raster is drawn in its colours with a legend of
class names and each class's share of the valid pixels, nodata shown apart; any other
single band (confidence, one probability, a grey image) gets a colour bar; three or more
image bands are shown as a stretched colour composite. Pixels without data show a grey
checkerboard. The PNG is written whole or not at all.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import Resampling

from segpipe.errors import InputError, MissingInputError
from segpipe.stages.export.layers import band_colormap, classes_from_tags
from segpipe.types import ClassInfo

__all__ = ["DEFAULT_MAX_SIZE", "Quicklook", "read_quicklook", "write_preview"]

DEFAULT_MAX_SIZE = 1024


@dataclass(frozen=True)
class Quicklook:
    """A layer read for display.

    Attributes:
        data: (bands, rows, columns) values at the display size.
        valid: (rows, columns) True where the pixel holds data.
        layer: The layer's name (segpipe's ``SEGPIPE_LAYER`` tag, else the file's stem).
        classes: The classes of a class raster (empty for any other layer).
        band_names: One description per band.
        size: The COG's full (rows, columns).
        crs: The CRS as a short string (an EPSG code when there is one).
        units: The first band's unit (e.g. ``percent``), empty when none is given.
    """

    data: np.ndarray
    valid: np.ndarray
    layer: str
    classes: tuple[ClassInfo, ...]
    band_names: tuple[str, ...]
    size: tuple[int, int]
    crs: str
    units: str

    @property
    def factor(self) -> int:
        """How many full-resolution pixels one shown pixel spans (per side, rounded up)."""
        return max(1, math.ceil(self.size[0] / int(self.data.shape[1])))


def read_quicklook(cog: str | Path, max_size: int = DEFAULT_MAX_SIZE) -> Quicklook:
    """Read a raster at a size whose longer side is at most ``max_size`` pixels.

    Raises:
        MissingInputError: ``cog`` does not exist.
        InputError: ``cog`` is no raster GDAL can read, or ``max_size`` is under 16.
    """
    if max_size < 16:
        raise InputError(f"--max-size {max_size}: give at least 16 pixels")
    if not Path(cog).exists() and "://" not in str(cog):
        raise MissingInputError(f"{cog} does not exist: give the COG that 'segpipe export' wrote")
    if Path(cog).is_dir():  # GDAL opens a region store (Zarr) as a raster of no band
        raise InputError(
            f"{cog} is a folder (a region store?), not a raster: export its layer first "
            f"('segpipe export {cog} --layer classes --out classes.tif') and preview that COG"
        )
    try:
        with rasterio.open(cog) as src:
            if src.count == 0:
                raise InputError(f"{cog} holds no raster band: give a GeoTIFF of the layer to draw")
            return _read(src, max_size)
    except rasterio.errors.RasterioIOError as exc:
        raise InputError(f"{cog} is not a raster GDAL can read: give a GeoTIFF ({exc})") from exc


def _read(src: rasterio.io.DatasetReader, max_size: int) -> Quicklook:
    scale = max(src.height, src.width) / max_size
    shape = (max(1, round(src.height / max(scale, 1))), max(1, round(src.width / max(scale, 1))))
    classes = _classes(src)
    # Classes are categories: never averaged. Other layers are averaged into the shown pixel.
    resampling = Resampling.nearest if classes else Resampling.average
    data = src.read(out_shape=(src.count, *shape), resampling=resampling, masked=True)
    valid = np.asarray(~np.ma.getmaskarray(data).all(axis=0))
    layer = src.tags().get("SEGPIPE_LAYER") or Path(src.name).stem
    names = tuple(d or f"band {i + 1}" for i, d in enumerate(src.descriptions))
    units = (src.units[0] or "") if src.units else ""
    size = (src.height, src.width)
    return Quicklook(np.ma.getdata(data), valid, layer, classes, names, size, _crs(src), units)


def _crs(src: rasterio.io.DatasetReader) -> str:
    """The CRS as a title shows it: its EPSG code, else the start of its WKT."""
    if src.crs is None:
        return "no CRS"
    return str(src.crs.to_string()) if src.crs.to_epsg() else str(src.crs.to_wkt())[:40]


def _classes(src: rasterio.io.DatasetReader) -> tuple[ClassInfo, ...]:
    """The classes of a one-band class raster: from segpipe's tags, else from its colour table."""
    if src.count != 1 or src.dtypes[0] != "uint8":
        return ()
    named = classes_from_tags(src.tags(1))
    if named:
        return tuple(named)
    table = band_colormap(src)
    if not table:
        return ()
    # Another tool's paletted raster: opaque entries are its classes, named by value.
    opaque = [(v, rgba) for v, rgba in sorted(table.items()) if rgba[3] > 0 and 1 <= v <= 254]
    return tuple(ClassInfo(v, f"class {v}", "#{:02x}{:02x}{:02x}".format(*rgba[:3])) for v, rgba in opaque)


def write_preview(cog: str | Path, out: str | Path, max_size: int = DEFAULT_MAX_SIZE) -> Path:
    """Draw ``cog`` into the PNG ``out`` with its legend (see the module docstring).

    Args:
        cog: A raster (segpipe's COG, or any GeoTIFF).
        out: The PNG to write (replaced whole; never left half-written).
        max_size: Longest side, in pixels, of the map in the PNG.

    Returns:
        The written PNG.

    Raises:
        MissingInputError: ``cog`` does not exist.
        InputError: ``cog`` is no readable raster, ``out`` is not a ``.png``, or
            ``max_size`` is under 16.
    """
    target = Path(out)
    if target.suffix.lower() != ".png":
        raise InputError(f"--out {out}: the preview is a PNG: give a file name ending in .png")
    look = read_quicklook(cog, max_size)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.stem}.{os.getpid()}.tmp.png")  # matplotlib reads the format off it
    try:
        _draw(look, Path(cog).name, tmp)
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _draw(look: Quicklook, name: str, path: Path) -> None:
    from segpipe.plots import plot_quicklook

    rows, cols = look.size
    title = f"{look.layer}: {name}\n{cols:,} x {rows:,} px, {look.crs}, shown at 1:{look.factor}"
    nodata = ~look.valid
    if look.classes:
        plot_quicklook(path, title, classes=_class_rgba(look), legend=_legend(look), nodata=nodata)
    elif look.data.shape[0] >= 3:
        plot_quicklook(path, title, rgb=_composite(look), nodata=nodata)
    else:
        label = look.band_names[0] + (f" ({look.units})" if look.units else "")
        plot_quicklook(path, title, values=look.data[0], label=label, nodata=nodata)


def _class_rgba(look: Quicklook) -> np.ndarray:
    """RGBA of the class raster: class colours; values without a class transparent."""
    lut = np.zeros((256, 4))
    for c in look.classes:
        lut[c.value] = (*(np.asarray(c.rgb) / 255.0), 1.0)
    rgba: np.ndarray = lut[look.data[0].astype(np.intp)]
    return rgba


def _legend(look: Quicklook) -> list[tuple[tuple[float, float, float, float], str]]:
    """Legend entries: each class with its share of the shown valid pixels."""
    values = look.data[0][look.valid]
    total = max(values.size, 1)
    entries = []
    for c in look.classes:
        share = float(np.count_nonzero(values == c.value)) / total
        entries.append(((*(np.asarray(c.rgb) / 255.0), 1.0), f"{c.value} {c.name} ({share:.1%})"))
    return entries


def _composite(look: Quicklook) -> np.ndarray:
    """A colour composite of red, green and blue (by band name), else the first three bands."""
    from segpipe.plots import display_bands, stretch

    picked = display_bands(look.band_names)
    rgb = np.moveaxis(look.data[picked].astype(np.float64), 0, -1)
    rgb[~look.valid] = np.nan  # left out of the stretch's percentiles
    shown: np.ndarray = stretch(rgb)
    return shown
