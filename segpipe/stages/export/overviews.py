"""Mode overviews of class rasters, built while the raster streams (one pass, bounded memory).

GDAL's COG driver spends most of a class raster's export computing MODE overviews
(docs/benchmarks.md, "COG export"). Here each level is the 2 x 2 mode of the level below, as
GDAL builds them, computed with numpy on full-width row bands as the base streams by,
and written to its own tiled GeoTIFF; a VRT declares them as the base's overviews, and
the COG driver copies them (``OVERVIEWS=FORCE_USE_EXISTING``) instead of recomputing.

Mode rule: the most frequent valid value of the cell; a tie goes to the smallest value;
nodata only where the whole cell is nodata (GDAL's MODE also ignores nodata). Cells cut
by the raster's edge use the pixels they have.

:class:`BandFeed` joins the streamed windows into those row bands and computes the levels
in a worker thread while GDAL compresses the next band.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
import rasterio
from rasterio.io import DatasetWriter
from rasterio.windows import Window

from segpipe.grid.box import Box
from segpipe.stages.export.layers import band_colormap

__all__ = ["BandFeed", "ModePyramid", "level_paths", "mode2x2", "overview_shapes", "write_overview_vrt"]


def overview_shapes(height: int, width: int, block: int) -> list[tuple[int, int]]:
    """Shapes of the halving levels, down to the first that fits in one ``block`` tile."""
    shapes = []
    h, w = height, width
    while max(h, w) > block:
        h, w = math.ceil(h / 2), math.ceil(w / 2)
        shapes.append((h, w))
    return shapes


def level_paths(base: Path, levels: int) -> list[Path]:
    """Files of the overview levels of ``base``, beside it: ``<stem>.ovr1.tif``, ``<stem>.ovr2.tif``..."""
    return [base.with_name(f"{base.stem}.ovr{i + 1}.tif") for i in range(levels)]


def mode2x2(rows: np.ndarray, nodata: int) -> np.ndarray:
    """2 x 2 mode of a uint8 array (odd edges padded with nodata), see the module docstring."""
    h, w = rows.shape
    if h % 2 or w % 2:
        padded = np.full((h + h % 2, w + w % 2), nodata, rows.dtype)
        padded[:h, :w] = rows
        rows = padded
    cells = [rows[0::2, 0::2], rows[0::2, 1::2], rows[1::2, 0::2], rows[1::2, 1::2]]
    valid = [c != nodata for c in cells]
    # 6 pairwise equalities instead of 16: a valid value's count is 1 + its equal partners
    # (a partner equal to a valid value is valid itself)
    counts = [v.astype(np.uint8) for v in valid]
    for i in range(4):
        for j in range(i + 1, 4):
            same = cells[i] == cells[j]
            counts[i] += same & valid[i]
            counts[j] += same & valid[j]
    best = np.maximum(np.maximum(counts[0], counts[1]), np.maximum(counts[2], counts[3]))
    top = np.iinfo(rows.dtype).max
    out = np.full(best.shape, top, rows.dtype)
    for c, n, v in zip(cells, counts, valid, strict=True):
        np.minimum(out, np.where((n == best) & v, c, top), out=out)
    out[best == 0] = nodata
    return out.astype(rows.dtype, copy=False)


class ModePyramid:
    """Receives full-width row bands of the base raster, top to bottom, and writes every level.

    Each level keeps at most one odd row back for the next band, so memory stays at one
    band per level (a level-1 band is a quarter of the base band).
    """

    def __init__(
        self,
        paths: list[Path],
        shapes: list[tuple[int, int]],
        nodata: int,
        open_level: Callable[[Path, int, int, int], DatasetWriter],
    ) -> None:
        self.nodata = nodata
        self.shapes = shapes
        self.paths = paths
        self.datasets = [
            open_level(p, h, w, i + 1) for i, (p, (h, w)) in enumerate(zip(paths, shapes, strict=True))
        ]
        self.carry: list[np.ndarray | None] = [None] * len(shapes)
        self.next_row = [0] * len(shapes)

    def push(self, rows: np.ndarray, last: bool, level: int = 0) -> None:
        """Add full-width rows of level ``level`` (0 = base); ``last`` marks the final band."""
        if level >= len(self.shapes):
            return
        held = self.carry[level]
        if held is not None:
            rows = np.concatenate([held, rows])
        self.carry[level] = None
        if not last and rows.shape[0] % 2:
            self.carry[level] = rows[-1:].copy()
            rows = rows[:-1]
        if rows.shape[0] == 0:
            return
        out = mode2x2(rows, self.nodata)
        self.datasets[level].write(out, 1, window=Window(0, self.next_row[level], out.shape[1], out.shape[0]))
        self.next_row[level] += out.shape[0]
        self.push(out, last, level + 1)

    def close(self) -> None:
        """Close every level's file."""
        for ds in self.datasets:
            ds.close()


class BandFeed:
    """Joins streamed windows into full-width row bands and pushes each into a :class:`ModePyramid`.

    Windows arrive row-major, as :func:`segpipe.grid.box.iter_boxes` cuts them, all ``rows``
    tall except the last row of windows. A band's levels are computed in a worker thread
    (numpy releases the GIL) while the caller writes the next band; one band in flight
    bounds the memory to two full-width bands.
    """

    def __init__(self, pyramid: ModePyramid, height: int, width: int, rows: int) -> None:
        self.pyramid = pyramid
        self.height = height
        self.width = width
        self._band = np.empty((min(rows, height), width), np.uint8)
        self._pool = ThreadPoolExecutor(1)
        self._pushed: Future[None] | None = None

    def add(self, box: Box, block: np.ndarray) -> None:
        """Place one window; the band goes to the pyramid once its last window is in."""
        self._band[: box.h, box.x0 : box.x1] = block
        if box.x1 == self.width:
            self.finish()
            self._pushed = self._pool.submit(self.pyramid.push, self._band[: box.h], box.y1 == self.height)
            self._band = np.empty_like(self._band)

    def finish(self) -> None:
        """Wait for the band in flight, raising its error."""
        if self._pushed is not None:
            self._pushed.result()

    def close(self) -> None:
        """Wait for the band in flight (its error is the caller's to raise), then close the level files.

        The levels must not be closed while a band is being written into them.
        """
        if self._pushed is not None:
            self._pushed.exception()
        self._pool.shutdown()
        self.pyramid.close()


def _mdi(tags: dict[str, str]) -> str:
    items = "".join(f'<MDI key="{escape(k)}">{escape(v)}</MDI>' for k, v in tags.items())
    return f"<Metadata>{items}</Metadata>" if items else ""


def write_overview_vrt(vrt: Path, base: Path, overviews: list[Path]) -> Path:
    """A VRT of the single-band ``base`` GeoTIFF with ``overviews`` declared as its overviews.

    Colour table, description, nodata and tags are copied from ``base`` (a VRT does not
    inherit them). Paths are relative to the VRT (all files live side by side).
    """
    with rasterio.open(base) as src:
        crs, transform, nodata = src.crs, src.transform, src.nodata
        description = src.descriptions[0] or ""
        cmap = band_colormap(src)
        tags, band_tags = src.tags(), src.tags(1)
        width, height, dtype = src.width, src.height, src.dtypes[0]
    gdal_type = {"uint8": "Byte"}[dtype]
    gt = ", ".join(
        repr(v) for v in (transform.c, transform.a, transform.b, transform.f, transform.d, transform.e)
    )
    colour = ""
    if cmap:
        entries = "".join(
            f'<Entry c1="{r}" c2="{g}" c3="{b}" c4="{a}"/>' for _, (r, g, b, a) in sorted(cmap.items())
        )
        colour = f"<ColorInterp>Palette</ColorInterp><ColorTable>{entries}</ColorTable>"
    ovr = "".join(
        f'<Overview><SourceFilename relativeToVRT="1">{escape(p.name)}</SourceFilename>'
        "<SourceBand>1</SourceBand></Overview>"
        for p in overviews
    )
    srs = f'<SRS dataAxisToSRSAxisMapping="1,2">{escape(crs.to_wkt())}</SRS>' if crs else ""
    xml = (
        f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}">{srs}<GeoTransform>{gt}</GeoTransform>'
        f'{_mdi(tags)}<VRTRasterBand dataType="{gdal_type}" band="1">'
        f"<Description>{escape(description)}</Description>"
        f"{'' if nodata is None else f'<NoDataValue>{nodata!r}</NoDataValue>'}{colour}{_mdi(band_tags)}"
        f'<SimpleSource><SourceFilename relativeToVRT="1">{escape(base.name)}</SourceFilename>'
        f"<SourceBand>1</SourceBand></SimpleSource>{ovr}</VRTRasterBand></VRTDataset>"
    )
    vrt.write_text(xml)
    return vrt
