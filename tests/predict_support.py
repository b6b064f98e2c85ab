"""Shared pieces of the predict tests: a tiny region store in segpipe's layout and settings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr
import zarr
from affine import Affine

from segpipe.grid.box import Box
from segpipe.models import ModelSpec, model_hash, save_model
from segpipe.stages.predict.jobs import BlockJob, JobSettings
from segpipe.types import ClassInfo

CLASSES = (
    ClassInfo(3, "water", "#1f77b4"),
    ClassInfo(7, "forest", "#1f7a1f"),
    ClassInfo(9, "urban", "#d62728"),
)
HEIGHT, WIDTH = 200, 170


def make_store(path: Path, block: int, bands: int = 3, nan_nodata: bool = False) -> Path:
    """A tiny region store in segpipe's layout, nodata in a corner and a stripe."""
    rng = np.random.default_rng(42)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    img = np.stack([(np.sin(yy / (9 + b)) + np.cos(xx / (7 + 2 * b))) * 300 + 700 for b in range(bands)])
    img = (img + rng.normal(0, 30, img.shape)).clip(1, 2000).astype(np.uint16)
    img[:, :30, :25] = 0
    img[1, 120:125, :] = 0  # one band only: still nodata
    nodata: float = 0
    if nan_nodata:
        img = img.astype(np.float32)
        img[img == 0] = nodata = np.nan
    da = xr.DataArray(
        img,
        dims=("band", "y", "x"),
        coords={
            "band": np.arange(1, bands + 1),
            "y": 4000.0 - 10 * np.arange(HEIGHT) - 5,
            "x": 300000.0 + 10 * np.arange(WIDTH) + 5,
        },
    )
    da = da.rio.write_crs("EPSG:32617").rio.write_transform(Affine(10, 0, 300000, 0, -10, 4000))
    da.attrs["long_name"] = [f"b{i + 1}" for i in range(bands)]
    ds = da.to_dataset(name="image")
    enc = {
        "image": {
            **ds["image"].encoding,
            "chunks": (bands, block, block),
            "shards": (bands, block, block),
            "_FillValue": nodata,
        }
    }
    ds.to_zarr(path, zarr_format=3, encoding=enc, consolidated=False, mode="w")
    zarr.open_group(path, mode="r+").attrs["segpipe"] = {"schema": 1, "block_size": block, "classes": []}
    return path


# One block per task (max_task_pixels), so block borders fall between tasks.
SETTINGS = {"tile_size": 64, "overlap": 16, "batch_size": 4, "max_task_pixels": 64 * 64}


def block_job(store: Path, model_dir: Path, box: Box, blocks: tuple[tuple[int, int], ...] = ()) -> BlockJob:
    """A task over ``box`` (its ``blocks``, default all) with the windows of SETTINGS."""
    settings = JobSettings(store=str(store), model_dir=str(model_dir), model_hash=model_hash(model_dir),
                           tile=64, overlap=16, batch_size=4)
    return BlockJob(settings=settings, box=box, blocks=blocks)


def stub_package(path: Path, seed: int = 0) -> Path:
    """A cheap stand-in for a network, packaged for the 3-band stores: a small forest on 3 x 3 windows.

    It is an ordinary ``random_forest`` package (rebuilt as a
    :class:`segpipe.models.forest.ForestNet`, nothing patched): a per-pixel classifier of
    each band's value and its 3 x 3 window mean and standard deviation. It runs in
    milliseconds where a U-Net takes seconds to build in every worker, and the window
    statistics, cut at a window's edge, still make a pixel's output depend on the window
    that computes it, as a network's does.
    """
    import torch
    from sklearn.ensemble import RandomForestClassifier

    from segpipe.models.forest import context_features, from_sklearn

    rng = np.random.default_rng(seed)
    image = torch.from_numpy(rng.normal(size=(1, 3, 48, 48)).astype(np.float32))
    feats = context_features(image, 3)[0].reshape(9, -1).T.numpy()
    labels = (feats[:, 0] > 0).astype(int) + (feats[:, 4] - feats[:, 7] > 0)  # value and window means
    forest = RandomForestClassifier(n_estimators=4, max_depth=5, random_state=seed).fit(feats, labels)
    net = from_sklearn(forest, len(CLASSES), context=3)
    spec = ModelSpec("random_forest", "none", ("b1", "b2", "b3"), (700.0,) * 3, (300.0,) * 3, CLASSES, 64,
                     options=net.options(), output_stride=1)
    return save_model(path, spec, net)
