"""Per-band normalisation statistics over the whole mosaic, computed with dask."""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np

__all__ = ["band_statistics"]


def band_statistics(image: da.Array, nodata: float | None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and standard deviation of each band over valid pixels.

    A pixel is valid when no band equals ``nodata``: the scene border must not drag
    the statistics towards the fill value. Sums run in float64 block by block, so
    any region size fits.

    Args:
        image: (band, y, x) dask array.
        nodata: Image nodata value, or None.

    Returns:
        (mean, std) tuples, one value per band.
    """
    data = image.astype(np.float64)
    if nodata is None:
        valid = da.ones(image.shape[1:], chunks=image.chunks[1:], dtype=bool)
    else:
        valid = (image != nodata).all(axis=0)
    w = valid.astype(np.float64)
    count, total, squares = dask.compute(
        w.sum(), (data * w).sum(axis=(1, 2)), (data * data * w).sum(axis=(1, 2))
    )
    n = max(float(count), 1.0)
    mean = np.asarray(total) / n
    var = np.maximum(np.asarray(squares) / n - mean * mean, 0.0)
    std = np.sqrt(var)
    return tuple(float(v) for v in mean), tuple(float(max(v, 1e-6)) for v in std)
