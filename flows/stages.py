"""One flow per stage, for running or scheduling a single stage on its own.

Each flow is a thin wrapper around the stage's task in :mod:`flows.tasks`, which is
itself one call into segpipe; ``process_region`` chains the same tasks.
"""

# No `from __future__ import annotations`: Prefect builds its parameter model from the
# evaluated annotations, and string annotations fail to resolve in served deployments.
from typing import Any

from prefect import flow

from flows.signals import relays_signals
from flows.tasks import evaluate_stage, export_stage, ingest_stage, predict_stage, train_stage
from segpipe.stages.train import NetworkConfig, TrainConfigField

__all__ = ["evaluate_flow", "export_flow", "ingest_flow", "predict_flow", "train_flow"]


@flow(name="ingest")
@relays_signals
def ingest_flow(
    images: list[str],
    store: str,
    labels: str | None = None,
    label_field: str | None = None,
    classes: str | None = None,
    block_size: int = 1024,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Build a region store from image tiles, a VRT or STAC scenes, and optional labels.

    Args:
        images: GeoTIFFs, a VRT, a folder of GeoTIFFs, or a STAC document.
        store: Region store (Zarr) to write.
        labels: Label raster or polygons (0 = unlabelled).
        label_field: Class field of label polygons.
        classes: classes.json with class names and colours.
        block_size: Block (shard) edge in pixels.
        options: Further ingest settings by name (``crs``, ``resolution``, ``bounds``,
            ``aoi``, ``resampling``, ``order``, ``assets``, ``label_layer``, ``background_value``).
    """
    return ingest_stage(images, store, labels, label_field, classes, block_size, options)


@flow(name="train")
@relays_signals
def train_flow(store: str, model: str, config: TrainConfigField | None = None) -> dict[str, Any]:
    """Train a model package from a store's labels.

    Args:
        store: Region store with labels.
        model: Model package directory to write.
        config: Training settings (a network's defaults when None).
    """
    return train_stage(store, model, config or NetworkConfig())


@flow(name="predict")
@relays_signals
def predict_flow(
    store: str,
    model: str,
    tile_size: int | None = None,
    overlap: int | None = None,
    scheduler: str | None = None,
    allow_resolution_mismatch: bool = False,
    tta: bool | None = None,
) -> dict[str, Any]:
    """Classify every pixel of a store on a Dask cluster.

    Args:
        store: Region store.
        model: Model package directory.
        tile_size: Window edge (default: from the model).
        overlap: Window overlap (default: a quarter of the window).
        scheduler: Dask scheduler address; None starts a local cluster.
        allow_resolution_mismatch: Predict even where the pixel size differs by more than
            25 % from the model's.
        tta: Average each window's 8 flips and rotations (default: as ``segpipe predict``).
    """
    return predict_stage(store, model, tile_size, overlap, scheduler, allow_resolution_mismatch, tta)


@flow(name="export")
@relays_signals
def export_flow(store: str, out: str, layer: str = "classes") -> dict[str, Any]:
    """Export a store layer as a Cloud-Optimized GeoTIFF.

    Args:
        store: Region store.
        out: GeoTIFF to write.
        layer: Store layer, e.g. classes or confidence.
    """
    return export_stage(store, out, layer)


@flow(name="evaluate")
@relays_signals
def evaluate_flow(store: str, reference: str, report_dir: str, layer: str = "classes") -> dict[str, Any]:
    """Evaluate a store layer against reference labels.

    Args:
        store: Region store with predictions.
        reference: Reference label raster or polygons.
        report_dir: Folder of the report.
        layer: Store layer to evaluate.
    """
    return evaluate_stage(store, reference, report_dir, layer)
