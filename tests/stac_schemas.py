"""Validate STAC documents against the official JSON schemas, offline.

pystac ships the core STAC 1.1 schemas; the extension schemas segpipe uses are bundled in
``tests/data/stac-schemas``, laid out by URL (``<host>/<path>``), copied unchanged from the
extensions' own repositories (stac-extensions/*, Apache-2.0) at the tags their URLs name.
A schema that is neither bundled nor shipped fails the validation instead of being fetched:
tests never reach the network.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np  # noqa: F401
import pystac
import pytest
import rasterio
from pystac.validation import JsonSchemaSTACValidator, validate_dict
from pystac.validation.stac_validator import GetSchemaError

from segpipe.stages.export.stac import FILE_EXTENSION, RASTER_EXTENSION, stac_item_path

SCHEMAS = Path(__file__).parent / "data" / "stac-schemas"
ITEM_SCHEMA = "https://schemas.stacspec.org/v1.1.0/item-spec/json-schema/item.json"
COLLECTION_SCHEMA = "https://schemas.stacspec.org/v1.1.0/collection-spec/json-schema/collection.json"


class OfflineValidator(JsonSchemaSTACValidator):
    """pystac's JSON-schema validator with every schema read from disk."""

    def __init__(self) -> None:
        super().__init__()
        for path in SCHEMAS.rglob("*.json"):
            schema = json.loads(path.read_text())
            url = f"https://{path.relative_to(SCHEMAS).as_posix()}"
            self.schema_cache[url] = schema
            # Some tags carry an older $id (processing v1.1.0 says v1.0.0): refs inside a
            # schema resolve against its $id, so it is known under that name too.
            self.schema_cache.setdefault(str(schema.get("$id", url)).rstrip("#"), schema)

    def _get_schema(self, schema_uri: str) -> dict[str, Any]:
        key = schema_uri.rstrip("#")
        if key not in self.schema_cache:
            raise GetSchemaError(schema_uri, LookupError("schema not bundled in tests/data/stac-schemas"))
        return self.schema_cache[key]


def validate_offline(stac: dict[str, Any] | pystac.STACObject | Path) -> list[str]:
    """Validate a STAC Item, Collection or Catalog (a dict, a pystac object or a JSON file).

    Returns:
        The schema URIs it was validated against (core first, then each extension).

    Raises:
        pystac.STACValidationError: It does not conform, or names a schema not bundled.
    """
    if isinstance(stac, Path):
        stac = json.loads(stac.read_text())
    elif isinstance(stac, pystac.STACObject):
        stac = stac.to_dict(include_self_link=False, transform_hrefs=False)
    return [str(uri) for uri in validate_dict(stac, validator=OfflineValidator())]


def check_item(cog: Path) -> dict[str, Any]:
    """The Item beside ``cog`` validates, and its band statistics are the file's own."""
    item = json.loads(stac_item_path(cog).read_text())
    schemas = validate_offline(item)
    assert schemas[0] == ITEM_SCHEMA and RASTER_EXTENSION in schemas and FILE_EXTENSION in schemas
    with rasterio.open(cog) as ds:
        for i, band in enumerate(item["assets"]["data"]["bands"], start=1):
            values = ds.read(i, masked=True).compressed().astype(float)
            stats = band["statistics"]
            assert stats["valid_percent"] == pytest.approx(100 * values.size / ds.width / ds.height)
            assert stats["mean"] == pytest.approx(values.mean(), abs=1e-5)
            assert (stats["minimum"], stats["maximum"]) == (values.min(), values.max())
            assert sum(band["raster:histogram"]["buckets"]) == values.size
    return item
