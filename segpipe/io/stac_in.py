"""STAC in: Items, ItemCollections (saved searches) and Catalogs/Collections as scenes.

A STAC document names Cloud-Optimized GeoTIFFs, usually one per band, that GDAL reads
in place (local paths, ``s3://``, ``http(s)://``); :func:`read_stac` turns it into a
:class:`~segpipe.io.sources.SceneSet` (one :class:`~segpipe.io.sources.Scene` per Item)
without reading a pixel. pystac reads and walks the documents; ``s3://`` ones are read
through segpipe's own s3fs filesystem (:mod:`segpipe.io.remote`), so the endpoint and
credentials come from the same AWS variables as everywhere else.

Bands come from assets, chosen by key (``assets``) or, by default, every GeoTIFF asset
whose roles include ``data`` (or that has no roles), in the first Item's order. Band
names, nodata, scale and offset come from STAC 1.1 ``bands`` (``name``, ``nodata``,
``raster:scale``, ``raster:offset``) or the older ``eo:bands`` + ``raster:bands``;
an asset with several bands gives several bands (``band`` 1..N of the same file).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pystac
from pystac.serialization import identify_stac_object_type
from pystac.stac_io import DefaultStacIO
from pystac.utils import make_absolute_href

from segpipe.errors import MissingInputError, SegpipeError, StacError, TransientError
from segpipe.io.remote import as_url, filesystem, is_remote, remote_errors, remote_exists
from segpipe.io.sources import BandFile, Scene, SceneSet

__all__ = ["is_stac", "read_stac"]

# Media types of the images GDAL reads band by band (GeoTIFF and COG, old and new names).
_TIFF_TYPES = ("image/tiff", "image/geotiff", "image/vnd.stac.geotiff")
_TIFF_SUFFIXES = (".tif", ".tiff")
_JSON_SUFFIXES = (".json", ".geojson")
_CHECKS = 16  # existence checks in flight at once (requests on object storage)
_KINDS = "a STAC Item, ItemCollection, Catalog or Collection"


class _StacIO(DefaultStacIO):
    """pystac's reader, with ``s3://`` documents read through segpipe's s3fs filesystem."""

    def read_text_from_href(self, href: str) -> str:
        """The document at ``href`` as text (``s3://`` through s3fs, the rest as pystac does)."""
        if is_remote(href):
            with remote_errors(as_url(href), "STAC file"), filesystem().open(as_url(href), "r") as f:
                text: str = f.read()
            return text
        return super().read_text_from_href(href)


def _absolute(source: str | Path) -> str:
    """``source`` as pystac resolves relative hrefs against it: an absolute path or a URL."""
    text = _gdal_href(str(source))
    if is_remote(text):
        return as_url(text)
    if "://" in text:
        return text
    return os.path.abspath(text)


def _read_json(href: str, io: _StacIO) -> dict[str, Any]:
    """The JSON object at ``href``.

    Raises:
        MissingInputError: Nothing exists at ``href``.
        StacError: It is not a JSON object.
    """
    local = not is_remote(href) and "://" not in href
    if local and os.path.isdir(href):
        raise StacError(f"{href} is a folder: give the STAC file itself (catalog.json, an Item's JSON...)")
    if local and not os.path.isfile(href):
        raise MissingInputError(f"STAC file {href} does not exist: check the path")
    try:
        data = io.read_json(href)
    except SegpipeError:  # s3: missing (MissingInputError), denied or unreachable, already named
        raise
    except ValueError as exc:  # JSON (also orjson's) and UTF-8 decoding errors, duplicate keys
        raise StacError(f"{href} is not valid JSON ({exc}): give {_KINDS}") from exc
    except Exception as exc:  # pystac's http reader raises a bare Exception
        if local:
            raise
        raise StacError(f"cannot read {href} ({exc}): check the URL and the network") from exc
    if not isinstance(data, dict):
        raise StacError(f"{href} holds a JSON {type(data).__name__}, not {_KINDS}")
    return data


def _kind(data: dict[str, Any]) -> str | None:
    """``"ItemCollection"``, ``"Item"``, ``"Catalog"`` or ``"Collection"``; None if not STAC."""
    if data.get("type") == "FeatureCollection":
        return "ItemCollection" if pystac.ItemCollection.is_item_collection(data) else None
    try:
        kind = identify_stac_object_type(data)
    except Exception:  # pystac raises assorted errors on arbitrary JSON: it is not STAC
        return None
    return {
        pystac.STACObjectType.ITEM: "Item",
        pystac.STACObjectType.CATALOG: "Catalog",
        pystac.STACObjectType.COLLECTION: "Collection",
    }.get(kind) if kind is not None else None  # fmt: skip


def is_stac(path: str | Path) -> bool:
    """Whether ``path`` (a ``.json``/``.geojson`` file or URL) holds STAC: Item, ItemCollection or catalogue.

    Never raises for an input that is not STAC: a missing or unreadable file, another
    suffix or other JSON all answer False (the caller then treats it as a raster).

    Raises:
        TransientError: Object storage could not be reached (a retry may tell).
    """
    href = _absolute(path)
    if not href.lower().split("?", 1)[0].endswith(_JSON_SUFFIXES):
        return False
    try:
        return _kind(_read_json(href, _StacIO())) is not None
    except TransientError:  # not an answer about the file: "not STAC" would mislead the caller
        raise
    except Exception:  # anything unreadable is "not STAC" here; read_stac names the fault
        return False


def _load_items(href: str, data: dict[str, Any], io: _StacIO) -> list[tuple[pystac.Item, str]]:
    """Every Item ``data`` holds or links to, each with the href its relative assets start from.

    Raises:
        StacError: ``data`` is not STAC, or holds no Item.
    """
    kind = _kind(data)
    if kind is None:
        found = data.get("type", "no type")
        raise StacError(f"{href} is not {_KINDS} (its type is {found!r}): give a STAC document")
    try:
        if kind == "ItemCollection":
            # Items of a saved search have no file of their own: the collection's file is their base.
            collection = pystac.ItemCollection.from_dict(data, preserve_dict=False)
            items = [(item, item.get_self_href() or href) for item in collection]
        else:
            obj = pystac.read_dict(data, href=href, stac_io=io)
            if isinstance(obj, pystac.Item):
                items = [(obj, href)]
            elif isinstance(obj, pystac.Catalog):  # a Collection is a Catalog too
                items = [(item, item.get_self_href() or href) for item in obj.get_items(recursive=True)]
            else:
                raise StacError(f"{href} is not {_KINDS} but a {type(obj).__name__}: give a STAC document")
    except (MissingInputError, StacError):
        raise
    except (pystac.STACError, KeyError, TypeError, ValueError) as exc:
        raise StacError(f"{href}: unreadable {kind} ({exc}): fix the document") from exc
    if not items:
        raise StacError(
            f"{kind} {href} holds no items: give a search result or catalogue with at least one Item"
        )
    return items


def _is_image(asset: pystac.Asset) -> bool:
    """A GeoTIFF/COG asset holding data (roles include ``data``, or no roles at all)."""
    media = (asset.media_type or "").lower()
    if media:
        tiff = media.startswith(_TIFF_TYPES)
    else:  # many catalogues omit the type: the file name tells
        tiff = asset.href.lower().split("?", 1)[0].endswith(_TIFF_SUFFIXES)
    return tiff and (not asset.roles or "data" in asset.roles)


def _chosen_keys(items: list[tuple[pystac.Item, str]], assets: Sequence[str] | None, href: str) -> list[str]:
    """The asset keys that become bands, in image order.

    Raises:
        StacError: An asked asset is missing from an Item, was asked twice, or the
            Items' image assets differ (by default).
    """
    first = items[0][0]
    if assets:
        keys = [a.strip() for a in (assets.split(",") if isinstance(assets, str) else assets)]
        twice = sorted({k for k in keys if keys.count(k) > 1})
        if twice:
            raise StacError(
                f"assets {', '.join(twice)} asked more than once for {href}: name each asset once"
            )
        for item, _ in items:
            missing = [k for k in keys if k not in item.assets]
            if missing:
                raise StacError(
                    f"item {item.id} in {href} has no asset {', '.join(missing)} "
                    f"(it has {', '.join(item.assets) or 'none'}): choose among those with --assets"
                )
        return keys
    keys = [k for k, a in first.assets.items() if _is_image(a)]
    if not keys:
        raise StacError(
            f"item {first.id} in {href} has no GeoTIFF data asset "
            f"(it has {', '.join(first.assets) or 'none'}): choose the band assets with --assets"
        )
    for item, _ in items[1:]:
        theirs = [k for k, a in item.assets.items() if _is_image(a)]
        if set(theirs) != set(keys):
            raise StacError(
                f"items {first.id} and {item.id} in {href} have different band sets "
                f"({', '.join(keys)} vs {', '.join(theirs) or 'none'}): choose common bands with --assets"
            )
    return keys


def _number(value: Any) -> float | None:
    """A STAC number (JSON number, or ``"nan"``/``"inf"`` strings for nodata) as a float."""
    if value is None:
        return None
    if isinstance(value, bool):  # a JSON true/false is no number, though Python's float takes it
        raise TypeError(f"{value!r} is not a number")
    return float(value)


def _band_dicts(asset: pystac.Asset) -> list[dict[str, Any]]:
    """One dict per band of ``asset``: name, nodata, scale, offset (None where absent).

    STAC 1.1 ``bands`` inherit what the asset itself states (``nodata``,
    ``raster:scale``...); STAC 1.0 spreads the same over ``eo:bands`` and ``raster:bands``.
    """
    fields = asset.extra_fields
    new = [b for b in fields.get("bands") or [] if isinstance(b, dict)]
    eo = [b for b in fields.get("eo:bands") or [] if isinstance(b, dict)]
    raster = [b for b in fields.get("raster:bands") or [] if isinstance(b, dict)]
    count = max(len(new), len(eo), len(raster), 1)
    out = []
    for i in range(count):
        b = new[i] if i < len(new) else {}
        e = eo[i] if i < len(eo) else {}
        r = raster[i] if i < len(raster) else {}
        out.append(
            {
                "name": b.get("name") or e.get("name"),
                "nodata": _first(b.get("nodata"), r.get("nodata"), fields.get("nodata")),
                "scale": _first(b.get("raster:scale"), r.get("scale"), fields.get("raster:scale")),
                "offset": _first(b.get("raster:offset"), r.get("offset"), fields.get("raster:offset")),
            }
        )
    return out


def _first(*values: Any) -> Any:
    """The first value that is not None."""
    return next((v for v in values if v is not None), None)


def _gdal_href(href: str) -> str:
    """What GDAL opens for an absolute href: ``file://`` URLs as plain paths, the rest unchanged."""
    return href[len("file://") :] if href.startswith("file://") else href


def _asset_bands(item: pystac.Item, key: str, base: str) -> list[tuple[str, BandFile]]:
    """The (name, band file) of every band of asset ``key`` of ``item``.

    Raises:
        StacError: A number in the band metadata is not a number.
    """
    asset = item.assets[key]
    href = _gdal_href(make_absolute_href(asset.href, base))
    dicts = _band_dicts(asset)
    out = []
    for i, band in enumerate(dicts, start=1):
        name = band["name"] or (key if len(dicts) == 1 else f"{key}_{i}")
        try:
            nodata, scale, offset = (_number(band[k]) for k in ("nodata", "scale", "offset"))
        except (TypeError, ValueError) as exc:
            raise StacError(
                f"asset {key} of item {item.id}: band {i} has a nodata, scale or offset "
                f"that is not a number ({exc}): fix the item's raster metadata"
            ) from exc
        out.append((str(name), BandFile(href, i, nodata, scale, offset)))
    return out


def _scene(item: pystac.Item, base: str, keys: list[str]) -> tuple[Scene, tuple[str, ...]]:
    """``item`` as a Scene of the assets ``keys``, and its band names."""
    bands = [band for key in keys for band in _asset_bands(item, key, base)]
    names = tuple(name for name, _ in bands)
    if len(set(names)) < len(names):  # two assets naming their bands alike: the keys tell them apart
        names = tuple(_key_names(item, keys))
    props = item.properties
    cloud = props.get("eo:cloud_cover")
    scene = Scene(
        id=item.id,
        bands=tuple(b for _, b in bands),
        datetime=_iso(props.get("datetime")),
        start_datetime=_iso(props.get("start_datetime")),
        end_datetime=_iso(props.get("end_datetime")),
        cloud_cover=None if cloud is None else float(cloud),
    )
    return scene, names


def _key_names(item: pystac.Item, keys: list[str]) -> list[str]:
    """Band names made of asset keys (``key``, or ``key_1``.. for a multi-band asset)."""
    out = []
    for key in keys:
        n = len(_band_dicts(item.assets[key]))
        out.extend([key] if n == 1 else [f"{key}_{i}" for i in range(1, n + 1)])
    return out


def _iso(value: Any) -> str | None:
    """A STAC datetime property as a string (pystac may hold a datetime object)."""
    if value is None:
        return None
    return value if isinstance(value, str) else str(value.isoformat())


def _exists(path: str) -> bool:
    """Whether a band file exists: local paths and ``s3://``; other URLs count as present.

    ``http(s)`` is left to GDAL: no request before its own, the network may be off until the read.
    """
    if is_remote(path):
        return remote_exists(path)
    if "://" in path or path.startswith("/vsi"):
        return True
    return os.path.exists(path)


def _check_hrefs(scenes: list[Scene], href: str) -> None:
    """Every band file of every scene exists; the first missing one (in scene order) is named.

    Raises:
        StacError: A band file does not exist.
        TransientError: Object storage could not be reached.
    """
    paths = list(dict.fromkeys(b.href for scene in scenes for b in scene.bands))
    # A search result of hundreds of items on S3 is thousands of HEAD requests: in parallel.
    with ThreadPoolExecutor(max_workers=_CHECKS) as pool:
        found = dict(zip(paths, pool.map(_exists, paths), strict=True))
    for scene in scenes:
        for band in scene.bands:
            if not found[band.href]:
                raise StacError(
                    f"item {scene.id} in {href} names {band.href}, which does not exist: "
                    "fix the asset href or upload the file"
                )


def read_stac(source: str | Path, assets: Sequence[str] | None = None) -> SceneSet:
    """The scenes of a STAC Item, ItemCollection, Catalog or Collection (local or ``s3://``).

    Args:
        source: The STAC JSON file or URL.
        assets: Asset keys to stack as bands, in this order (a comma-separated string
            works too); None or empty: every GeoTIFF data asset, in the first Item's order.

    Returns:
        One Scene per Item (in document order; a catalogue walked depth first), the band
        names, and ``source``.

    Raises:
        MissingInputError: ``source`` does not exist.
        StacError: It is not STAC, holds no Item, lacks an asked asset, its Items have
            different band sets, or an asset's file does not exist.
    """
    href = _absolute(source)
    io = _StacIO()
    items = _load_items(href, _read_json(href, io), io)
    keys = _chosen_keys(items, assets, href)
    scenes: list[Scene] = []
    names: tuple[str, ...] = ()
    for item, base in items:
        scene, theirs = _scene(item, base, keys)
        if scenes and theirs != names:
            raise StacError(
                f"items {scenes[0].id} and {item.id} in {href} have different band sets "
                f"({', '.join(names)} vs {', '.join(theirs)}): choose common bands with --assets"
            )
        scenes.append(scene)
        names = theirs
    _check_hrefs(scenes, href)
    return SceneSet(tuple(scenes), names, str(source))
