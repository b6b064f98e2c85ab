"""What an ingest reads, before any grid is chosen: scenes made of band files.

A STAC Item is one scene whose bands are separate assets (one COG per band, often at
different resolutions); a GeoTIFF tile is one scene whose bands all live in one file.
Both become a :class:`Scene`, so choosing the target grid and warping onto it
(:mod:`segpipe.io.warp`) never needs to know where the scenes came from
(:mod:`segpipe.io.stac_in` for STAC, plain files otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BandFile", "Scene", "SceneSet"]


@dataclass(frozen=True)
class BandFile:
    """One image band as GDAL reads it.

    Attributes:
        href: What GDAL opens: a local path, an ``s3://`` URL or an ``http(s)://`` URL
            (never downloaded whole; GDAL reads the windows it needs).
        band: 1-based band index inside ``href``.
        nodata: The band's nodata value (STAC raster extension, else the file's own).
        scale: Multiplier from stored values to physical ones (None: 1).
        offset: Added after ``scale`` (None: 0).
    """

    href: str
    band: int = 1
    nodata: float | None = None
    scale: float | None = None
    offset: float | None = None


@dataclass(frozen=True)
class Scene:
    """One acquisition: its bands in the order the image stacks them.

    Attributes:
        id: A name for messages (the STAC Item id, or the tile's file name).
        bands: One :class:`BandFile` per image band, in image order.
        datetime: ISO 8601 acquisition time, or None where unknown.
        start_datetime: Start of the acquisition interval, or None.
        end_datetime: End of the acquisition interval, or None.
        cloud_cover: ``eo:cloud_cover`` in percent, or None.
    """

    id: str
    bands: tuple[BandFile, ...]
    datetime: str | None = None
    start_datetime: str | None = None
    end_datetime: str | None = None
    cloud_cover: float | None = None


@dataclass(frozen=True)
class SceneSet:
    """Scenes that form one image: same bands, in the same order, in every scene.

    Attributes:
        scenes: In the order the user gave them (where scenes overlap, the first
            valid pixel in this order wins unless an ordering rule says otherwise).
        band_names: One name per image band (STAC asset keys or ``eo:bands`` names).
        source: What the user named (a STAC file or URL, a folder...), for messages.
    """

    scenes: tuple[Scene, ...]
    band_names: tuple[str, ...]
    source: str
