"""Per-band statistics and histograms of a finished GeoTIFF, for its STAC Item.

STAC 1.1 band objects carry ``statistics`` (minimum, maximum, mean, stddev, valid_percent)
and the raster extension's ``raster:histogram`` (buckets between a minimum and a maximum,
GDAL's convention: for bytes, 256 buckets from -0.5 to 255.5). They are read from the file
as published, block by block, so memory stays flat with the raster's size; nodata (and NaN)
pixels are left out. Bytes (every class, confidence and probability layer) take one pass;
other types take a second pass for the histogram, once the range is known.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.io import DatasetReader

__all__ = ["BUCKETS", "band_statistics"]

BUCKETS = 256


@dataclass
class _Running:
    """Running sums of one band's valid pixels."""

    total: int = 0
    count: int = 0
    sum: float = 0.0
    sumsq: float = 0.0
    minimum: float = np.inf
    maximum: float = -np.inf
    byte_counts: np.ndarray = field(default_factory=lambda: np.zeros(BUCKETS, np.int64))

    def add(self, values: np.ndarray, total: int, is_byte: bool) -> None:
        self.total += total
        if values.size == 0:
            return
        v = values.astype(np.float64)
        self.count += int(v.size)
        self.sum += float(v.sum())
        self.sumsq += float(np.square(v).sum())
        self.minimum = min(self.minimum, float(v.min()))
        self.maximum = max(self.maximum, float(v.max()))
        if is_byte:
            self.byte_counts += np.bincount(values.ravel(), minlength=BUCKETS)

    def statistics(self) -> dict[str, float]:
        if self.count == 0:
            return {"valid_percent": 0.0}
        mean = self.sum / self.count
        # Sums of squares in float64: exact enough for bytes and 16-bit images at any area here.
        var = max(self.sumsq / self.count - mean * mean, 0.0)
        return {
            "minimum": self.minimum,
            "maximum": self.maximum,
            "mean": round(mean, 6),
            "stddev": round(float(np.sqrt(var)), 6),
            "valid_percent": round(100.0 * self.count / self.total, 4) if self.total else 0.0,
        }


def _valid(block: np.ndarray, nodata: float | None) -> np.ndarray:
    """The valid values of a block: not nodata, not NaN."""
    keep = np.ones(block.shape, bool)
    if nodata is not None and not np.isnan(nodata):
        keep &= block != nodata
    if block.dtype.kind == "f":
        keep &= ~np.isnan(block)
    return block[keep]


def _first_pass(ds: DatasetReader, band: int, is_byte: bool) -> _Running:
    running = _Running()
    for _, window in ds.block_windows(band):
        block = ds.read(band, window=window)
        running.add(_valid(block, ds.nodata), block.size, is_byte)
    return running


def _histogram(ds: DatasetReader, band: int, low: float, high: float) -> list[int]:
    """Counts of the band's valid values in BUCKETS equal buckets from ``low`` to ``high``."""
    counts = np.zeros(BUCKETS, np.int64)
    for _, window in ds.block_windows(band):
        values = _valid(ds.read(band, window=window), ds.nodata)
        counts += np.histogram(values, bins=BUCKETS, range=(low, high))[0]
    return [int(c) for c in counts]


def _band(ds: DatasetReader, band: int) -> dict[str, Any]:
    is_byte = ds.dtypes[band - 1] == "uint8"
    running = _first_pass(ds, band, is_byte)
    out: dict[str, Any] = {"statistics": running.statistics()}
    if running.count == 0:
        return out
    if is_byte:
        histogram = {"min": -0.5, "max": 255.5, "buckets": [int(c) for c in running.byte_counts]}
    else:
        # GDAL's "approximate=no" convention: half a step beyond the extremes of integers.
        pad = 0.5 if np.issubdtype(np.dtype(ds.dtypes[band - 1]), np.integer) else 0.0
        low, high = running.minimum - pad, running.maximum + pad
        high = high if high > low else low + 1.0
        histogram = {"min": low, "max": high, "buckets": _histogram(ds, band, low, high)}
    out["raster:histogram"] = {"count": BUCKETS, **histogram}
    return out


def band_statistics(path: str | Path) -> list[dict[str, Any]]:
    """Statistics and histogram of every band of a raster, as STAC 1.1 band fields.

    Args:
        path: A GeoTIFF (or anything GDAL reads).

    Returns:
        Per band, ``{"statistics": {...}, "raster:histogram": {...}}`` (no histogram for a
        band without a valid pixel).
    """
    with rasterio.open(path) as ds:
        return [_band(ds, b) for b in range(1, ds.count + 1)]
