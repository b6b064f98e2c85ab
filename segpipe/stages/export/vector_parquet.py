"""GeoParquet output of the class polygons, streamed in row groups with pyarrow.

The GDAL behind pyogrio's wheels has no Parquet driver, so GeoParquet is written with
pyarrow directly: geometries as WKB, and the file-level ``geo`` metadata of GeoParquet
1.1.0 (primary column, encoding, geometry types, the CRS as PROJJSON, the bbox of all
features) that geopandas, GDAL, DuckDB and QGIS read. Features arrive in batches as the
block rows are merged; they are buffered into row groups of :data:`ROW_GROUP` features,
so memory stays bounded whatever the number of polygons.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import shapely
from pyproj import CRS

__all__ = ["GEOPARQUET_VERSION", "ROW_GROUP", "GeoParquetSink", "geo_metadata"]

GEOPARQUET_VERSION = "1.1.0"
ROW_GROUP = 65_536

_SCHEMA = pa.schema([
    ("class", pa.int32()),
    ("class_name", pa.string()),
    ("area", pa.float64()),
    ("mean_confidence", pa.float64()),
    ("geometry", pa.binary()),
])


def geo_metadata(crs_wkt: str, bbox: list[float] | None) -> dict[str, Any]:
    """GeoParquet's ``geo`` metadata for a polygon column in ``crs_wkt`` ("" = unknown CRS).

    An unknown CRS is written as ``null`` (a missing ``crs`` would mean OGC:CRS84).
    """
    column: dict[str, Any] = {
        "encoding": "WKB",
        "geometry_types": ["Polygon"],
        "crs": CRS.from_wkt(crs_wkt).to_json_dict() if crs_wkt else None,
    }
    if bbox is not None:
        column["bbox"] = bbox
    return {"version": GEOPARQUET_VERSION, "primary_column": "geometry", "columns": {"geometry": column}}


class GeoParquetSink:
    """Append GeoDataFrames of polygons to one GeoParquet file; :meth:`close` finishes it."""

    def __init__(self, path: Path, crs_wkt: str) -> None:
        self.path, self.crs_wkt = path, crs_wkt
        self.buffer: list[pa.Table] = []
        self.buffered = 0
        self.bounds = np.array([np.inf, np.inf, -np.inf, -np.inf])
        self.writer: pq.ParquetWriter | None = None

    def append(self, frame: gpd.GeoDataFrame) -> None:
        """Queue a batch of features; full row groups are written at once."""
        if len(frame):
            b = frame.geometry.total_bounds
            low, high = np.minimum(self.bounds[:2], b[:2]), np.maximum(self.bounds[2:], b[2:])
            self.bounds = np.concatenate([low, high])
        columns = {name: frame[name] for name in _SCHEMA.names if name != "geometry"}
        table = pa.table({**columns, "geometry": shapely.to_wkb(frame.geometry.values)}, schema=_SCHEMA)
        self.buffer.append(table)
        self.buffered += len(frame)
        if self.buffered >= ROW_GROUP:
            self._flush()

    def _flush(self) -> None:
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.path, _SCHEMA, compression="zstd")
        if self.buffer:
            self.writer.write_table(pa.concat_tables(self.buffer), row_group_size=max(self.buffered, 1))
        self.buffer, self.buffered = [], 0

    def close(self) -> None:
        """Write what is buffered and the ``geo`` metadata (with the bbox of every feature)."""
        self._flush()
        assert self.writer is not None
        bbox = [float(v) for v in self.bounds] if np.isfinite(self.bounds).all() else None
        self.writer.add_key_value_metadata({"geo": json.dumps(geo_metadata(self.crs_wkt, bbox))})
        self.writer.close()
