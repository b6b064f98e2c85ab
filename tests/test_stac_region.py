"""Issue 15's end to end: a STAC ItemCollection of per-band COGs in two CRSs and two
resolutions goes through ``segpipe run REGION.yaml`` to a COG and an accuracy report,
with no step outside segpipe."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import yaml
from stac_schemas import ITEM_SCHEMA, validate_offline
from stac_support import BANDS, SCENES, write_stac_labels, write_stac_scenes
from test_cli_errors import run

from segpipe.io.store import open_region


@pytest.fixture(scope="module")
def stac_region(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("stac-region")
    items = write_stac_scenes(tmp)
    labels = write_stac_labels(tmp, SCENES[0])
    region = {
        "images": [str(items)],
        "assets": list(BANDS),
        "store": "out/stac.zarr",
        "block_size": 256,
        "labels": str(labels),
        "model": "out/model",
        "train": {"arch": "random_forest", "trees": 8},
        "exports": ["classes"],
        "export_dir": "out/cog",
        "reference": str(labels),
        "report_dir": "out/report",
    }
    path = tmp / "region.yaml"
    path.write_text(yaml.safe_dump(region))
    return path


def test_stac_scenes_in_two_crs_go_through_segpipe_run(stac_region: Path, prefect_home: Path) -> None:
    done = run("run", stac_region, env={"PREFECT_HOME": str(prefect_home)})
    assert done.returncode == 0, done.stderr[-3000:]
    out = stac_region.parent / "out"
    ds = open_region(out / "stac.zarr")
    assert list(ds.image.attrs["long_name"]) == list(BANDS)
    assert ds.rio.crs.to_epsg() == 32617  # zone 17 covers most of the area
    assert abs(ds.rio.resolution()[0]) == 10.0  # the finest band's pixel size
    assert ds.image.dtype == np.float32  # the items' scale and offset applied
    cog = out / "cog" / "classes.tif"
    with rasterio.open(cog) as src:
        assert src.crs.to_epsg() == 32617 and (src.read(1) != 255).any()
    item = json.loads((out / "cog" / "classes.stac.json").read_text())
    assert validate_offline(item)[0] == ITEM_SCHEMA
    assert item["properties"]["start_datetime"] and "segpipe:datetime" not in item["properties"]
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    assert metrics["overall_accuracy"] > 0.5  # a forest on the scene's own classes
