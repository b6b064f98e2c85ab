"""Mode overviews of class rasters, built while the raster streams (one pass, bounded memory).

GDAL's COG driver spends most of a class raster's export computing MODE overviews
(docs/benchmarks.md, "COG export"). Here each level is the mode of the level below, as
GDAL builds them, computed with numpy on full-width row bands as the base streams by,
and written to its own tiled GeoTIFF; a VRT declares them as the base's overviews, and
the COG driver copies them (``OVERVIEWS=FORCE_USE_EXISTING``) instead of recomputing.

Mode rule: GDAL's own (``gdaladdo -r mode`` on a byte band, gcore/overview.cpp,
``GDALResampleChunk_ModeT``), so segpipe's levels equal GDAL's bit for bit: each level is
built from the level below; overview pixel ``i`` covers source pixels
``[floor(i * r), ceil((i + 1) * r))`` with ``r = source / overview size`` (exactly 2 x 2
cells on even axes, overlapping 2- or 3-pixel spans on odd ones); pixels are scanned row
by row and a value wins once its running count exceeds the best so far, so a tie goes to
the value that reached the top count first (not the smallest); nodata pixels are
skipped, and a cell of nodata only is nodata. Like GDAL, a level is built from the
level above only if that one is wider, else from the base (a raster one pixel wide).
Checked against GDAL 3.10 and 3.6 in tests/test_overviews.py.

:class:`BandFeed` joins the streamed windows into those row bands and computes the levels
of each band as soon as its last window is in.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
import rasterio
from rasterio.io import DatasetWriter
from rasterio.windows import Window

from segpipe.grid.box import Box
from segpipe.stages.export.layers import band_colormap

__all__ = [
    "BandFeed",
    "ModePyramid",
    "level_paths",
    "mode2x2",
    "mode_spans",
    "overview_shapes",
    "source_spans",
    "write_overview_vrt",
]


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


def source_spans(src: int, dst: int) -> tuple[np.ndarray, np.ndarray]:
    """GDAL's source span ``[start, end)`` of each of ``dst`` overview pixels along an axis of ``src``.

    GDAL's ratio is ``src / dst``, not 2: on an odd axis the spans are 2 or 3 pixels and
    overlap (gcore/overview.cpp, GDALResampleChunk_ModeT: ``nSrcXOff``/``nSrcXOff2``,
    with the same 1e-8 epsilons).
    """
    ratio = src / dst
    index = np.arange(dst, dtype=np.float64)
    start = np.floor(index * ratio + 1e-8).astype(np.int64)
    end = np.ceil((index + 1) * ratio - 1e-8).astype(np.int64)
    end = np.minimum(np.maximum(end, start + 1), src)
    return start, end


# Output columns of an overview level computed at once (bounds the mode's counts).
STRIP = 1024


def _take(
    rows: np.ndarray, start: np.ndarray, end: np.ndarray, offset: int, axis: int
) -> tuple[np.ndarray, np.ndarray]:
    """Pixels at ``start + offset`` along ``axis``, and whether that offset lies inside each span."""
    inside = offset < end - start
    n = len(start)
    if offset < 2 and rows.shape[axis] >= 2 * n and np.array_equal(start, np.arange(0, 2 * n, 2)):
        # exact halving (even axis): a strided view, no copy
        picked = rows[offset : 2 * n : 2] if axis == 0 else rows[:, offset : 2 * n : 2]
    else:
        index = np.minimum(start + offset, rows.shape[axis] - 1)
        picked = np.take(rows, index, axis=axis)
    return picked, inside


def mode_spans(
    rows: np.ndarray, nodata: int, ys: tuple[np.ndarray, np.ndarray], xs: tuple[np.ndarray, np.ndarray]
) -> np.ndarray:
    """GDAL's MODE of uint8 ``rows`` over the source spans ``ys`` (rows) x ``xs`` (columns).

    The rule of GDAL's byte path: pixels are scanned row by row and a value becomes the
    result when its running count exceeds the best count so far, so a tie goes to the
    value that reached the top count first; nodata pixels are skipped and a cell of
    nodata only is nodata.

    Computed :data:`STRIP` output columns at a time: the counts take about 16 bytes per
    output pixel, which over a full-width band of a 32768 px raster was most of export's
    peak memory, and would grow with the width.
    """
    starts, ends = xs
    out = np.empty((len(ys[0]), len(starts)), rows.dtype)
    for a in range(0, len(starts), STRIP):
        b = min(a + STRIP, len(starts))
        lo = int(starts[a])
        strip = rows[:, lo : int(ends[a:b].max())]
        out[:, a:b] = _mode_strip(strip, nodata, ys, (starts[a:b] - lo, ends[a:b] - lo))
    return out


def _mode_strip(
    rows: np.ndarray, nodata: int, ys: tuple[np.ndarray, np.ndarray], xs: tuple[np.ndarray, np.ndarray]
) -> np.ndarray:
    """:func:`mode_spans` over columns whose spans all lie in ``rows``."""
    cells, valid = [], []
    for dy in range(int((ys[1] - ys[0]).max())):
        band, in_y = _take(rows, ys[0], ys[1], dy, 0)
        for dx in range(int((xs[1] - xs[0]).max())):
            cell, in_x = _take(band, xs[0], xs[1], dx, 1)
            cells.append(cell)
            valid.append((cell != nodata) & in_y[:, None] & in_x[None, :])
    # prefix[k]: count of cell k's value among cells 0..k; total[k]: among all cells
    prefix = [v.astype(np.uint8) for v in valid]
    total = [p.copy() for p in prefix]
    for k in range(len(cells)):
        for j in range(k + 1, len(cells)):
            same = (cells[k] == cells[j]) & valid[k] & valid[j]
            prefix[j] += same
            total[j] += same
            total[k] += same
    best = np.maximum.reduce(total)
    out = np.full(best.shape, nodata, rows.dtype)
    for k in reversed(range(len(cells))):  # the earliest cell to reach the best count wins
        np.copyto(out, cells[k], where=valid[k] & (prefix[k] == best))
    return out


def mode2x2(rows: np.ndarray, nodata: int) -> np.ndarray:
    """The next overview level of a whole uint8 array, as ``gdaladdo -r mode`` computes it."""
    h, w = rows.shape
    return mode_spans(rows, nodata, source_spans(h, math.ceil(h / 2)), source_spans(w, math.ceil(w / 2)))


Spans = tuple[np.ndarray, np.ndarray]


class ModePyramid:
    """Receives full-width row bands of the base raster, top to bottom, and writes every level.

    Each level keeps back only the rows of the level below that its next row still needs
    (one row on an even axis, up to two where GDAL's spans overlap on an odd one), so
    memory stays at one band per level (a level-1 band is a quarter of the base band).
    """

    def __init__(
        self,
        paths: list[Path],
        shapes: list[tuple[int, int]],
        nodata: int,
        open_level: Callable[[Path, int, int, int], DatasetWriter],
        *,
        base: tuple[int, int],
    ) -> None:
        """Open every level's file.

        Args:
            paths: One file per level.
            shapes: (height, width) of each level, as :func:`overview_shapes` gives them.
            nodata: Nodata value of the raster.
            open_level: Opens a level's file: (path, height, width, level).
            base: (height, width) of the base raster (GDAL's spans depend on it).
        """
        self.nodata = nodata
        self.shapes = shapes
        self.paths = paths
        self.datasets = [
            open_level(p, h, w, i + 1) for i, (p, (h, w)) in enumerate(zip(paths, shapes, strict=True))
        ]
        # GDAL computes a level from the level above it only when that one is wider, else
        # from the base (GDALRegenerateOverviewsMultiBand: "Try to use previous level")
        self.sources = [
            i if i and shapes[i - 1][1] > shapes[i][1] else 0 for i in range(len(shapes))
        ]  # per level (0-based): 0 = the base, i = level i (1-based, the level above it)
        below = [shapes[src - 1] if src else base for src in self.sources]
        self.spans: list[tuple[Spans, Spans]] = [
            (source_spans(sh, h), source_spans(sw, w)) for (sh, sw), (h, w) in zip(below, shapes, strict=True)
        ]
        self.carry: list[np.ndarray | None] = [None] * len(shapes)
        self.carry_row = [0] * len(shapes)  # row of the source where ``carry`` starts
        self.next_row = [0] * len(shapes)

    def push(self, rows: np.ndarray, last: bool, level: int = 0) -> None:
        """Add full-width rows of level ``level`` (0 = base); ``last`` marks the final band."""
        for index, source in enumerate(self.sources):
            if source == level:
                self._build(index, rows, last)

    def _build(self, index: int, rows: np.ndarray, last: bool) -> None:
        """Compute the rows of level ``index + 1`` that ``rows`` of its source complete, and pass them on."""
        held = self.carry[index]
        if held is not None and held.shape[0]:  # an even axis carries nothing: no copy of the band
            rows = np.concatenate([held, rows])
        first = self.carry_row[index]  # row of the source that rows[0] is
        (starts, ends), xs = self.spans[index]
        # the level's rows whose whole span has arrived (all of them with the last band)
        stop = len(starts) if last else int(np.searchsorted(ends, first + rows.shape[0], side="right"))
        begin = self.next_row[index]
        if stop < len(starts):  # keep what the next row needs: spans can overlap on odd axes
            self.carry[index] = rows[starts[stop] - first :].copy()
            self.carry_row[index] = int(starts[stop])
        else:
            self.carry[index] = None
        if stop <= begin:
            return
        ys = (starts[begin:stop] - first, ends[begin:stop] - first)
        out = mode_spans(rows, self.nodata, ys, xs)
        self.datasets[index].write(out, 1, window=Window(0, begin, out.shape[1], out.shape[0]))
        self.next_row[index] = stop
        self.push(out, last, index + 1)

    def close(self) -> None:
        """Close every level's file."""
        for ds in self.datasets:
            ds.close()


class BandFeed:
    """Joins streamed windows into full-width row bands and pushes each into a :class:`ModePyramid`.

    Windows arrive row-major, as :func:`segpipe.grid.box.iter_boxes` cuts them, all ``rows``
    tall except the last row of windows. One band is held, and its levels are computed in
    the caller's thread once its last window is in. Computing them in a worker thread while
    the next band filled needed a second full-width band (32 MB at 32,768 px wide) and was
    not faster on 2 cores, where reading, compressing and the levels already share both
    (export at 32,768^2: 42 MB less peak RSS, the stream no slower; docs/benchmarks.md).
    """

    def __init__(self, pyramid: ModePyramid, height: int, width: int, rows: int) -> None:
        self.pyramid = pyramid
        self.height = height
        self.width = width
        self._band = np.empty((min(rows, height), width), np.uint8)

    def add(self, box: Box, block: np.ndarray) -> None:
        """Place one window; the band goes to the pyramid once its last window is in."""
        self._band[: box.h, box.x0 : box.x1] = block
        if box.x1 == self.width:
            self.pyramid.push(self._band[: box.h], box.y1 == self.height)

    def close(self) -> None:
        """Close the level files."""
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
