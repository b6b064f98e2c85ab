"""Open GeoTIFF tiles, a VRT or a folder of tiles as one lazy (band, y, x) mosaic.

Several tiles are joined by a GDAL VRT that this module writes itself (rasterio does
not expose ``gdalbuildvrt``), so the mosaic is never loaded into memory: dask tasks
read just their window through GDAL. Tiles must share CRS, pixel size, band count,
dtype, nodata and pixel grid; anything else would mean silent resampling, so it is
refused with :class:`~segpipe.errors.TileMismatchError`.

Inputs may be ``s3://`` URLs (files, VRTs or prefixes standing for folders): GDAL reads
them through ``/vsis3/`` configured by :mod:`segpipe.io.remote`. Their blocks are read by
segpipe's own task function, which sets that configuration in whichever worker thread
or process runs it (rioxarray's reader would run without it there).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import dask.array
import numpy as np
import rasterio
import rioxarray
import xarray as xr
from rasterio._err import CPLE_BaseError
from rasterio.crs import CRS
from rasterio.errors import NotGeoreferencedWarning, RasterioError

from segpipe.errors import InputError, MissingInputError, TileMismatchError
from segpipe.io.remote import as_url, filesystem, gdal_env, gdal_path, is_remote, posix_suffix, remote_errors
from segpipe.io.store import same_nodata

__all__ = ["expand_inputs", "mosaic_vrt_xml", "open_mosaic"]

_TILE_SUFFIXES = (".tif", ".tiff")
# Tiles closer than this fraction of a pixel to the common grid count as aligned:
# coordinates written by other tools carry float rounding, not real shifts.
_ALIGN_TOL = 1e-3

_GDAL_TYPES = {
    "uint8": "Byte",
    "int8": "Int8",
    "uint16": "UInt16",
    "int16": "Int16",
    "uint32": "UInt32",
    "int32": "Int32",
    "uint64": "UInt64",
    "int64": "Int64",
    "float32": "Float32",
    "float64": "Float64",
}

# rasterio warns on every open of a raster without georeferencing, naming no file, from
# each thread that reads it; open_mosaic warns once per image, by name.
warnings.filterwarnings("ignore", message="Dataset has no geotransform", category=NotGeoreferencedWarning)


@dataclass(frozen=True)
class _Tile:
    """What the mosaic needs to know about one tile (read once, from its header)."""

    path: str
    crs: CRS | None
    transform: tuple[float, ...]
    width: int
    height: int
    count: int
    dtype: str
    nodata: float | None
    descriptions: tuple[str | None, ...]
    block: tuple[int, int]

    @property
    def res(self) -> tuple[float, float]:
        return (abs(self.transform[0]), abs(self.transform[4]))


def _expand_remote(url: str) -> list[str]:
    """A URL as raster files: the object itself, or the GeoTIFFs directly under a prefix."""
    fs = filesystem()
    with remote_errors(url, "image"):
        if fs.isfile(url):
            return [url]
        keys = fs.ls(url, detail=False)
        found = sorted("s3://" + k for k in keys if posix_suffix(k) in _TILE_SUFFIXES and fs.isfile(k))
    if not found:
        if fs.exists(url):
            raise MissingInputError(f"folder {url} holds no GeoTIFF (*.tif, *.tiff)")
        raise MissingInputError(f"image {url} does not exist")
    return found


def expand_inputs(images: Sequence[str | Path] | str | Path) -> list[Path | str]:
    """Turn files, VRTs and folders into the list of raster files they stand for.

    A folder stands for every ``*.tif``/``*.tiff`` directly inside it, sorted by name;
    so does an ``s3://`` prefix. Local files come back as paths, remote ones as URLs.

    Raises:
        MissingInputError: A path does not exist, a folder holds no GeoTIFF, or
            nothing was given.
        TransientError: Object storage could not be reached.
    """
    items = [images] if isinstance(images, str | Path) else list(images)
    files: list[Path | str] = []
    for item in items:
        if is_remote(item):
            files.extend(_expand_remote(as_url(item)))
            continue
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in _TILE_SUFFIXES)
            if not found:
                raise MissingInputError(f"folder {p} holds no GeoTIFF (*.tif, *.tiff)")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise MissingInputError(f"image {p} does not exist")
    if not files:
        raise MissingInputError("no image given: pass GeoTIFF files, a VRT or a folder of tiles")
    return files


def _missing_sources(ds: rasterio.DatasetReader) -> list[str]:
    """Local source files a VRT names that do not exist (GDAL only notices when reading)."""
    if ds.driver != "VRT":
        return []
    return [f for f in ds.files[1:] if "/vsi" not in f and "://" not in f and not Path(f).exists()]


def _read_tile(path: Path | str) -> _Tile:
    """Read a tile's header, refusing files that are not a usable raster.

    Raises:
        MissingInputError: ``path`` is not a raster GDAL can read (empty, text, cut
            header), or a VRT whose source files are missing.
        InputError: The raster has no pixel or no band (e.g. a VRT of width 0).
    """
    try:
        with gdal_env(path), rasterio.open(gdal_path(path)) as ds:
            if ds.width < 1 or ds.height < 1 or ds.count < 1:
                raise InputError(
                    f"image {path} has no pixels ({ds.width} x {ds.height} px, {ds.count} bands): "
                    "rebuild it or leave it out"
                )
            missing = _missing_sources(ds)
            if missing:
                raise MissingInputError(
                    f"VRT {path} refers to {len(missing)} missing source file(s), first {missing[0]}: "
                    "restore them or rebuild the VRT"
                )
            return _Tile(
                path=as_url(path) if is_remote(path) else str(Path(path).resolve()),
                crs=ds.crs,
                transform=tuple(ds.transform)[:6],
                width=ds.width,
                height=ds.height,
                count=ds.count,
                dtype=str(ds.dtypes[0]),
                nodata=ds.nodata,
                descriptions=tuple(ds.descriptions),
                block=ds.block_shapes[0],
            )
    except (RasterioError, CPLE_BaseError) as exc:
        raise MissingInputError(
            f"image {path} cannot be read as a raster (empty, truncated or not a GeoTIFF/VRT): {exc}"
        ) from exc


def _crs_name(crs: CRS | None) -> str:
    return "none" if crs is None else crs.to_string()



def _check_tiles(files: Sequence[Path | str], tiles: Sequence[_Tile]) -> None:
    """Refuse tiles that cannot be mosaicked without resampling or guessing."""
    ref, ref_name = tiles[0], files[0]
    for name, t in zip(files, tiles, strict=True):
        if t.transform[1] != 0 or t.transform[3] != 0 or t.transform[4] >= 0:
            raise TileMismatchError(
                f"tile {name} is rotated or not north-up (transform {t.transform}): "
                "warp it to a north-up grid first"
            )
    for name, t in zip(files[1:], tiles[1:], strict=True):
        checks = [
            ("CRS", t.crs == ref.crs, _crs_name(t.crs), _crs_name(ref.crs)),
            (
                "pixel size",
                all(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(t.res, ref.res, strict=True)),
                f"{t.res[0]:g} x {t.res[1]:g}",
                f"{ref.res[0]:g} x {ref.res[1]:g}",
            ),
            ("band count", t.count == ref.count, str(t.count), str(ref.count)),
            ("dtype", t.dtype == ref.dtype, t.dtype, ref.dtype),
            ("nodata", same_nodata(t.nodata, ref.nodata), str(t.nodata), str(ref.nodata)),
        ]
        for what, ok, mine, theirs in checks:
            if not ok:
                raise TileMismatchError(
                    f"tile {name} has {what} {mine} but {ref_name} has {theirs}: "
                    "all tiles of a mosaic must agree"
                )
        for axis, origin, ref_origin, res in (
            ("x", t.transform[2], ref.transform[2], ref.res[0]),
            ("y", t.transform[5], ref.transform[5], ref.res[1]),
        ):
            shift = (origin - ref_origin) / res
            if abs(shift - round(shift)) > _ALIGN_TOL:
                raise TileMismatchError(
                    f"tile {name} is not on the pixel grid of {ref_name}: its {axis} origin is "
                    f"{abs(shift - round(shift)):.3f} px off; warp it onto a common grid first"
                )


def _number(v: float) -> str:
    if math.isnan(v):
        return "nan"
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def _band_names(descriptions: Sequence[str | None]) -> tuple[str, ...]:
    """Band names: the GeoTIFF band descriptions, ``bandN`` where one is empty."""
    return tuple(d if d else f"band{i + 1}" for i, d in enumerate(descriptions))


@dataclass(frozen=True)
class _Part:
    """Where one tile lies in the mosaic: named when a read of its pixels fails."""

    path: str
    y0: int
    x0: int
    height: int
    width: int


def _origin(tiles: Sequence[_Tile]) -> tuple[float, float]:
    """The mosaic's top-left corner in CRS units: its leftmost and topmost tile edges."""
    return min(t.transform[2] for t in tiles), max(t.transform[5] for t in tiles)


def _parts(tiles: Sequence[_Tile]) -> tuple[_Part, ...]:
    left, top = _origin(tiles)
    rx, ry = tiles[0].res
    return tuple(
        _Part(
            t.path, round((top - t.transform[5]) / ry), round((t.transform[2] - left) / rx), t.height, t.width
        )
        for t in tiles
    )


def _size(tiles: Sequence[_Tile]) -> tuple[int, int]:
    """The mosaic's width and height in pixels."""
    left, top = _origin(tiles)
    rx, ry = tiles[0].res
    right = max(t.transform[2] + t.width * rx for t in tiles)
    bottom = min(t.transform[5] - t.height * ry for t in tiles)
    return round((right - left) / rx), round((top - bottom) / ry)


def _vrt_name(path: str, relative_to: str | Path | None) -> tuple[str, int]:
    """How a VRT names a tile, and its ``relativeToVRT`` flag.

    A local tile inside ``relative_to`` (the VRT's folder) is named relative to it, so
    the folder can move as a whole; any other as GDAL opens it.
    """
    if relative_to is not None and not is_remote(path):
        tile, folder = Path(path).resolve(), Path(relative_to).resolve()
        if tile.is_relative_to(folder):
            return str(tile.relative_to(folder)), 1
    return gdal_path(path), 0


def _source_xml(
    tile: _Tile, part: _Part, band: int, kind: str, gdal_type: str, relative_to: str | Path | None
) -> list[str]:
    """The VRT source element (``kind``) that places band ``band`` of ``tile`` in the mosaic."""
    name, relative = _vrt_name(tile.path, relative_to)
    # SourceProperties let GDAL skip opening every tile when the VRT is opened.
    lines = [
        f"    <{kind}>",
        f'      <SourceFilename relativeToVRT="{relative}">{escape(name)}</SourceFilename>',
        f"      <SourceBand>{band}</SourceBand>",
        f'      <SourceProperties RasterXSize="{tile.width}" RasterYSize="{tile.height}" '
        f'DataType="{gdal_type}" BlockXSize="{tile.block[1]}" BlockYSize="{tile.block[0]}"/>',
        f'      <SrcRect xOff="0" yOff="0" xSize="{tile.width}" ySize="{tile.height}"/>',
        f'      <DstRect xOff="{part.x0}" yOff="{part.y0}" xSize="{tile.width}" ySize="{tile.height}"/>',
    ]
    if tile.nodata is not None:
        lines.append(f"      <NODATA>{_number(tile.nodata)}</NODATA>")
    lines.append(f"    </{kind}>")
    return lines


def mosaic_vrt_xml(
    files: Sequence[str | Path], relative_to: str | Path | None = None, tiles: Sequence[_Tile] | None = None
) -> str:
    """Write the GDAL VRT (as XML text) that mosaics ``files`` on their common grid.

    Later tiles win where tiles overlap, except on their nodata pixels, which are
    transparent (as with ``gdalbuildvrt``).

    Args:
        files: The tiles.
        relative_to: Folder the VRT will be saved in: tiles inside it are referenced
            relative to the VRT, so the folder can be moved as a whole.
        tiles: The files' headers, if already read.

    Raises:
        MissingInputError: A file does not exist or is not a raster.
        TileMismatchError: Tiles disagree in CRS, pixel size, band count, dtype,
            nodata or pixel grid, or are rotated.
    """
    paths: list[Path | str] = [as_url(f) if is_remote(f) else Path(f) for f in files]
    tiles = list(tiles) if tiles is not None else [_read_tile(p) for p in paths]
    _check_tiles(paths, tiles)
    ref = tiles[0]
    gdal_type = _GDAL_TYPES.get(ref.dtype)
    if gdal_type is None:
        raise TileMismatchError(f"tile {paths[0]} has dtype {ref.dtype}, which segpipe cannot mosaic")
    (left, top), (width, height), (rx, ry) = _origin(tiles), _size(tiles), ref.res
    out = [f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}">']
    if ref.crs is not None:
        out.append(f'  <SRS dataAxisToSRSAxisMapping="1,2">{escape(ref.crs.to_wkt())}</SRS>')
    out.append(f"  <GeoTransform>{left!r}, {rx!r}, 0.0, {top!r}, 0.0, {-ry!r}</GeoTransform>")
    # ComplexSource honours a tile's nodata (transparent in overlaps); SimpleSource is
    # cheaper and enough when there is none (the tiles share their nodata).
    kind = "SimpleSource" if ref.nodata is None else "ComplexSource"
    parts = _parts(tiles)
    for band, name in enumerate(_band_names(ref.descriptions), start=1):
        out.append(f'  <VRTRasterBand dataType="{gdal_type}" band="{band}">')
        out.append(f"    <Description>{escape(name)}</Description>")
        if ref.nodata is not None:
            out.append(f"    <NoDataValue>{_number(ref.nodata)}</NoDataValue>")
        for tile, part in zip(tiles, parts, strict=True):
            out += _source_xml(tile, part, band, kind, gdal_type, relative_to)
        out.append("  </VRTRasterBand>")
    out.append("</VRTDataset>")
    return "\n".join(out) + "\n"


def _culprit(parts: Sequence[_Part], y0: int, y1: int, x0: int, x1: int) -> str | None:
    """The tile whose own pixels in the window cannot be read (None if every one reads)."""
    for p in parts:
        ys, ye = max(y0, p.y0) - p.y0, min(y1, p.y0 + p.height) - p.y0
        xs, xe = max(x0, p.x0) - p.x0, min(x1, p.x0 + p.width) - p.x0
        if ye <= ys or xe <= xs:
            continue
        try:
            with gdal_env(p.path), rasterio.open(gdal_path(p.path)) as ds:
                ds.read(window=((ys, ye), (xs, xe)))
        except (RasterioError, CPLE_BaseError):
            return p.path
    return None


def _read_block(
    template: np.ndarray,
    source: str,
    parts: tuple[_Part, ...] = (),
    remote: bool = True,
    block_info: dict[Any, Any] | None = None,
) -> np.ndarray:
    """Read one (band, y, x) block of ``source`` in any worker; a failed read names its tile.

    Raises:
        InputError: GDAL could not read the window (a truncated or damaged tile).
    """
    assert block_info is not None
    (_, _), (y0, y1), (x0, x1) = block_info[None]["array-location"]
    failure: str | None = None
    try:
        # Any remote name switches the S3 config on (source may be VRT XML, not a path);
        # local reads keep GDAL's defaults (sidecar files are found as rioxarray finds them).
        with gdal_env("s3://" if remote else None), rasterio.open(source) as ds:
            data: np.ndarray = ds.read(window=((y0, y1), (x0, x1)))
    except (RasterioError, CPLE_BaseError) as exc:
        failure = str(exc.__cause__ or exc)  # rasterio's own text only says "see previous exception"
    if failure is not None:
        # Raised outside the handler, without GDAL's error as context: distributed sends a
        # task's exception with its context, and GDAL's error classes do not unpickle, which
        # would reach the driver as a bare Exception.
        # GDAL's own message ("Read failed") names neither the tile nor the place.
        culprit = _culprit(parts, y0, y1, x0, x1) if parts else None
        name = culprit or (source if len(source) < 500 else "the mosaic's VRT")
        raise InputError(
            f"image {name} cannot be read in window rows {y0}-{y1}, columns {x0}-{x1} of the mosaic "
            f"(truncated or damaged file?): {failure}; replace the file and rerun"
        )
    return data.astype(template.dtype, copy=False)


def _blocks(source: str, like: dask.array.Array, parts: tuple[_Part, ...], remote: bool) -> dask.array.Array:
    """A dask array of ``source`` with the chunks of ``like``, read by :func:`_read_block`."""
    template = dask.array.empty(like.shape, dtype=like.dtype, chunks=like.chunks)
    blocks: dask.array.Array = template.map_blocks(
        _read_block, source, parts, remote, dtype=like.dtype, meta=np.empty((0, 0, 0), like.dtype)
    )
    return blocks


def open_mosaic(
    images: Sequence[str | Path] | str | Path,
    chunk_size: int = 1024,
    vrt_path: str | Path | None = None,
) -> xr.DataArray:
    """Open images as one lazy mosaic, chunked ``(all bands, chunk_size, chunk_size)``.

    Args:
        images: GeoTIFF files, VRTs and/or folders of GeoTIFFs (see :func:`expand_inputs`).
        chunk_size: Dask chunk edge along y and x.
        vrt_path: Where to write the VRT that joins several tiles. Without it the VRT
            travels inside the dask graph as XML text, which is fine for a few hundred
            tiles; give a path (on storage every worker sees) for more.

    Returns:
        A (band, y, x) DataArray backed by dask, with band coordinate 1..N, attribute
        ``long_name`` = tuple of band names (GeoTIFF band descriptions, else
        ``band1``..``bandN``), CRS through rioxarray and ``rio.nodata`` from the files.

    Raises:
        MissingInputError: An input does not exist, is not a raster (empty, text, cut
            header), is a VRT with missing sources, or a folder holds no GeoTIFF.
        InputError: An input has no pixel or band. Reading the array raises it too,
            naming the tile and window, when a tile's pixels cannot be read.
        TileMismatchError: Tiles cannot be mosaicked (see :func:`mosaic_vrt_xml`).
    """
    files = expand_inputs(images)
    remote = any(is_remote(f) for f in files)
    # Headers first, also for a single file: an empty or text file, or a VRT without
    # pixels or sources, is refused by name here rather than as GDAL's error in a task.
    tiles = [_read_tile(f) for f in files]
    for name, tile in zip(files, tiles, strict=True):
        if tile.crs is None and tile.transform == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0):
            warnings.warn(
                f"image {name} has no georeferencing (no CRS, no geotransform): the store and every "
                "map, polygon and STAC Item made from it are in pixel coordinates; georeference it "
                "(gdal_translate -a_srs ... -a_ullr ...) for outputs that line up with other data",
                NotGeoreferencedWarning,
                stacklevel=2,
            )
    source = _mosaic_source(files, tiles, vrt_path, remote)
    with gdal_env(*files):
        with rasterio.open(source) as ds:
            names = _band_names(ds.descriptions)
        # lock=False gives every thread its own GDAL handle: parallel reads, no global lock.
        da = rioxarray.open_rasterio(
            source,
            chunks={"band": -1, "y": chunk_size, "x": chunk_size},
            lock=False,
            mask_and_scale=False,
        )
    assert isinstance(da, xr.DataArray)
    # segpipe's own reader: it sets the S3 config in whichever worker runs it, and a
    # failed read names the tile and window (rioxarray's reader does neither).
    da = da.copy(data=_blocks(source, da.data, _parts(tiles), remote))
    # rioxarray adds a neutral scale/offset to every file; stored they would make
    # default (masking) readers turn integer images into floats.
    if da.attrs.get("scale_factor") == 1.0:
        da.attrs.pop("scale_factor")
    if da.attrs.get("add_offset") == 0.0:
        da.attrs.pop("add_offset")
    da.attrs["long_name"] = names
    da = da.assign_coords(band=np.arange(1, len(names) + 1, dtype=np.int64))
    da.name = "image"
    return da


def _mosaic_source(
    files: Sequence[Path | str], tiles: Sequence[_Tile], vrt_path: str | Path | None, remote: bool
) -> str:
    """What GDAL opens for the mosaic: the one file, else the VRT (a file at ``vrt_path``, or its XML)."""
    if len(files) == 1:
        return gdal_path(files[0])
    xml = mosaic_vrt_xml(files, tiles=tiles)
    if vrt_path is None or remote:
        # GDAL opens VRT XML given in place of a file name. With remote tiles the graph
        # carries it: a local VRT file would not reach workers on other hosts.
        return xml
    Path(vrt_path).write_text(xml)
    return str(vrt_path)
