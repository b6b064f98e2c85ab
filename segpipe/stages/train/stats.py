"""Per-band normalisation statistics over the whole mosaic, computed with dask.

Statistics cover valid pixels only (no band equal to nodata): the scene border must
not drag them towards the fill value. Every pass runs block by block, so any region
size fits in memory.

Imagery that cannot train is refused before training, naming the band: a band with no
valid value or a single value where labels are (it teaches nothing, and its standard
deviation would divide by ~0), or statistics that are not finite (NaN or infinite
pixels would make NaN weights).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dask
import dask.array as da
import numpy as np

from segpipe.errors import InputError
from segpipe.stages.train.config import DEFAULT_CHIP_SIZE, NetworkConfig

if TYPE_CHECKING:
    from segpipe.io.store import RegionInfo
    from segpipe.models import ModelSpec
    from segpipe.stages.train.config import ForestConfig
    from segpipe.types import ClassInfo

__all__ = [
    "band_percentiles",
    "band_statistics",
    "check_labelled_bands",
    "check_statistics",
    "normalisation_statistics",
    "package_spec",
]

log = logging.getLogger(__name__)

# Histogram resolution of the percentile pass: integer data up to 16 bits gets one bin
# per value (exact percentiles); wider or float data gets this many equal bins between
# the band's valid minimum and maximum (percentiles within one bin width).
_BINS = 65536


def _valid_mask(image: da.Array, nodata: float | None) -> da.Array:
    """Pixels whose every band is usable; NaN counts as invalid too (a NaN nodata never compares equal)."""
    if nodata is None and not np.issubdtype(image.dtype, np.floating):
        ones: da.Array = da.ones(image.shape[1:], chunks=image.chunks[1:], dtype=bool)
        return ones
    every_band: da.Array = _band_valid(image, nodata).all(axis=0)
    return every_band


def band_statistics(
    image: da.Array,
    nodata: float | None,
    clip: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and standard deviation of each band over valid pixels.

    Sums run in float64 block by block.

    Args:
        image: (band, y, x) dask array.
        nodata: Image nodata value, or None.
        clip: Per-band (low, high) bounds applied before the moments, so that the
            statistics describe the values the network will see after clipping.

    Returns:
        (mean, std) tuples, one value per band.
    """
    data = image.astype(np.float64)
    if clip is not None:
        low = np.asarray(clip[0], dtype=np.float64)[:, None, None]
        high = np.asarray(clip[1], dtype=np.float64)[:, None, None]
        data = da.clip(data, low, high)
    valid = _valid_mask(image, nodata)
    # where, not a product with the mask: NaN * 0 is NaN.
    data = da.where(valid[None], data, 0.0)
    count, total, squares = dask.compute(valid.sum(), data.sum(axis=(1, 2)), (data * data).sum(axis=(1, 2)))
    n = max(float(count), 1.0)
    mean = np.asarray(total) / n
    var = np.maximum(np.asarray(squares) / n - mean * mean, 0.0)
    std = np.sqrt(var)
    return tuple(float(v) for v in mean), tuple(float(max(v, 1e-6)) for v in std)


def _order_statistic(counts: np.ndarray, centres: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """Value of the (0-based) ``rank``-th smallest sample described by a histogram."""
    cumulative = np.cumsum(counts)
    index = np.searchsorted(cumulative, rank, side="right")
    return centres[np.minimum(index, centres.size - 1)]


def _percentiles_from_histogram(counts: np.ndarray, centres: np.ndarray, q: np.ndarray) -> np.ndarray:
    """The linear (numpy default) percentile, read off a histogram of the samples."""
    n = int(counts.sum())
    rank = q / 100.0 * (n - 1)
    below = np.floor(rank)
    lo = _order_statistic(counts, centres, below)
    hi = _order_statistic(counts, centres, np.minimum(below + 1, n - 1))
    return lo + (rank - below) * (hi - lo)  # type: ignore[no-any-return]


def band_percentiles(
    image: da.Array, nodata: float | None, percentiles: tuple[float, ...]
) -> tuple[tuple[float, ...], ...]:
    """Percentiles of each band over valid pixels, from per-band histograms.

    Exact (numpy's linear definition) for integer data spanning at most 65536 values
    (uint8, uint16, int16); approximate to 1/65536 of the band's range otherwise.

    Args:
        image: (band, y, x) dask array.
        nodata: Image nodata value, or None.
        percentiles: Percentiles in 0-100.

    Returns:
        One tuple per percentile, holding one value per band (all NaN without valid pixels).
    """
    q = np.asarray(percentiles, dtype=np.float64)
    valid = _valid_mask(image, nodata)
    bands = image.shape[0]
    masked = da.where(valid[None], image.astype(np.float64), np.nan)
    lows, highs = dask.compute(da.nanmin(masked, axis=(1, 2)), da.nanmax(masked, axis=(1, 2)))
    lows, highs = np.asarray(lows), np.asarray(highs)
    if not np.isfinite(lows).all():
        return tuple(tuple(float("nan") for _ in range(bands)) for _ in q)
    exact = np.issubdtype(image.dtype, np.integer) and bool(((highs - lows) < _BINS).all())
    weights = valid.astype(np.int64)
    hists, centres = [], []
    for b in range(bands):
        if exact:
            nbins = int(highs[b] - lows[b]) + 1
            edges = (lows[b] - 0.5, highs[b] + 0.5)
        else:
            nbins = _BINS
            edges = (lows[b], highs[b] if highs[b] > lows[b] else lows[b] + 1.0)
        counts, bin_edges = da.histogram(image[b], bins=nbins, range=edges, weights=weights)
        hists.append(counts)
        centres.append((bin_edges[:-1] + bin_edges[1:]) / 2.0)
    (computed,) = dask.compute(hists)
    per_band = [
        _percentiles_from_histogram(np.asarray(c), np.asarray(m), q)
        for c, m in zip(computed, centres, strict=True)
    ]
    return tuple(tuple(float(v[i]) for v in per_band) for i in range(q.size))


def _band_valid(image: da.Array, nodata: float | None) -> da.Array:
    """Per band and pixel: the value is usable (finite, not nodata)."""
    valid: da.Array = (
        da.isfinite(image) if np.issubdtype(image.dtype, np.floating) else da.ones_like(image, dtype=bool)
    )
    if nodata is not None and not np.isnan(nodata):
        valid = valid & (image != nodata)
    return valid


def check_labelled_bands(
    image: da.Array, labels: da.Array, nodata: float | None, band_names: Sequence[str], store: str | Path
) -> None:
    """Refuse a band that holds no valid value, or only one value, where labels are.

    Args:
        image: (band, y, x) dask array.
        labels: (y, x) dask array of label values, 0 = unlabelled.
        nodata: Image nodata value, or None.
        band_names: One name per band (named in the message).
        store: The region store (named in the message).

    Raises:
        InputError: A band is all nodata/NaN, or constant, inside the labelled area.
    """
    usable = _band_valid(image, nodata) & (labels != 0)[None]
    data = image.astype(np.float64)
    count, low, high = dask.compute(
        usable.sum(axis=(1, 2)),
        da.where(usable, data, np.inf).min(axis=(1, 2)),
        da.where(usable, data, -np.inf).max(axis=(1, 2)),
    )
    for b, name in enumerate(band_names):
        if int(count[b]) == 0:
            raise InputError(
                f"band {name!r} of {store} has no valid value inside the labelled area (all nodata or NaN): "
                "fix the imagery or its nodata value, or leave the band out"
            )
        if float(low[b]) == float(high[b]):
            raise InputError(
                f"band {name!r} of {store} is constant ({float(low[b]):g}) inside the labelled area: "
                "it cannot inform a model; fix the imagery or leave the band out"
            )


def check_statistics(
    mean: Sequence[float], std: Sequence[float], band_names: Sequence[str], store: str | Path
) -> None:
    """Refuse normalisation statistics that are not finite (they would make NaN weights).

    Raises:
        InputError: A band's mean or standard deviation is NaN or infinite.
    """
    for name, m, sd in zip(band_names, mean, std, strict=True):
        if not (np.isfinite(m) and np.isfinite(sd)):
            raise InputError(
                f"band {name!r} of {store} has non-finite statistics (mean {m}, std {sd}): its valid pixels "
                "hold NaN or infinite values or none are valid; fix the imagery or its nodata value"
            )


def normalisation_statistics(
    image: da.Array, nodata: float | None, clip_percentiles: tuple[float, float] | None
) -> tuple[tuple[float, ...], tuple[float, ...], tuple[tuple[float, ...], tuple[float, ...]] | None]:
    """What a model package normalises with: per-band mean, std and optional clip bounds.

    Args:
        image: (band, y, x) dask array of the whole mosaic.
        nodata: Image nodata value, or None.
        clip_percentiles: (low, high) percentiles to clip each band to first, or None.

    Returns:
        ``(mean, std, clip)`` where ``clip`` is ``(low bounds, high bounds)`` or None.
    """
    clip = None
    if clip_percentiles is not None:
        low, high = band_percentiles(image, nodata, clip_percentiles)
        clip = (low, high)
    mean, std = band_statistics(image, nodata, clip)
    return mean, std, clip


def package_spec(
    store: str | Path,
    info: RegionInfo,
    cfg: NetworkConfig | ForestConfig,
    arch: str,
    encoder: str,
    classes: tuple[ClassInfo, ...],
    options: Mapping[str, Any] | None = None,
) -> ModelSpec:
    """Description of a model trained on ``store``: its bands, classes and normalisation.

    The statistics cover the whole mosaic (valid pixels, clipped at
    ``cfg.clip_percentiles`` when set), the same for every architecture. A network's
    chip size is clamped to the region (:meth:`NetworkConfig.fit_region`, logged as a
    warning); a forest, which reads no chips, records the default chip edge, which
    prediction takes as its window hint.

    Raises:
        InputError: A band is all nodata or constant inside the labelled area, the
            statistics are not finite, or the region is too small for a chip.
    """
    from segpipe.io.store import open_region
    from segpipe.models import ModelSpec, output_stride
    from segpipe.models.spec import grid_resolution

    fitted, note = cfg.fit_region(info.height, info.width)
    if note is not None:
        log.warning("%s", note)
    region = open_region(store)
    image = region["image"].data
    if "labels" in region:
        check_labelled_bands(image, region["labels"].data, info.nodata, info.band_names, store)
    mean, std, clip = normalisation_statistics(image, info.nodata, cfg.clip_percentiles)
    check_statistics(mean, std, info.band_names, store)
    chip = fitted.chip_size if isinstance(fitted, NetworkConfig) else None
    chip_size = chip or DEFAULT_CHIP_SIZE
    # Recorded so that predict refuses imagery of another pixel size (a 10 m model fails at 30 cm).
    pixel_size, units = grid_resolution(info.crs_wkt, info.transform)
    return ModelSpec(
        arch=arch,
        encoder=encoder,
        band_names=info.band_names,
        mean=mean,
        std=std,
        classes=classes,
        chip_size=chip_size,
        nodata=info.nodata,
        options=dict(options or {}),
        clip_low=None if clip is None else clip[0],
        clip_high=None if clip is None else clip[1],
        output_stride=output_stride(arch),
        pixel_size=pixel_size,
        crs_units=units,
    )
