"""The Python API: each stage as a plain function with the ``segpipe`` command's options.

Each function calls the stage in :mod:`segpipe.stages` and returns a small frozen
dataclass (predict returns the stage's own :class:`~segpipe.stages.predict.PredictSummary`).
Stage modules are imported by the functions, not by this module: ``segpipe.ingest`` is
as light to reach as the package itself, and torch loads only when a stage needs it.
Together with :func:`segpipe.io.store.open_region` and
:func:`segpipe.stages.predict.classify.classify` they are segpipe's public API (see the
README's "Python API").
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from segpipe.errors import InputError
from segpipe.io.remote import as_url, beside, is_remote, join
from segpipe.types import ClassInfo

if TYPE_CHECKING:
    import distributed

    from segpipe.models import ModelSpec
    from segpipe.models.onnx import OnnxExport
    from segpipe.stages.predict.driver import PredictSummary
    from segpipe.stages.train.progress import TrainProgress

__all__ = [
    "ClassScore",
    "EvaluateResult",
    "ExportResult",
    "IngestResult",
    "TrainResult",
    "evaluate",
    "export",
    "export_model",
    "ingest",
    "polygons",
    "predict",
    "preview",
    "train",
]


@dataclass(frozen=True)
class IngestResult:
    """The region store :func:`ingest` wrote.

    Attributes:
        store: The store's location (a path, or its ``s3://`` URL).
        shape: (height, width) of the region in pixels.
        bands: Band names, in order.
        classes: Classes known to the store (from the labels or the classes file).
        block_size: Shard (and dask chunk) edge in pixels.
        dtype: The image's dtype name.
        nodata: The image's nodata value, or None.
        crs: The region's CRS as WKT ("" when the imagery has none).
    """

    store: str
    shape: tuple[int, int]
    bands: tuple[str, ...]
    classes: tuple[ClassInfo, ...]
    block_size: int
    dtype: str
    nodata: float | None
    crs: str


@dataclass(frozen=True)
class TrainResult:
    """The model package :func:`train` wrote.

    Attributes:
        package: The package directory (give it to :func:`predict`, :func:`classify`).
        arch: Its architecture (``random_forest`` for the baseline).
        bands: The band names the model expects.
        classes: The classes it predicts.
        metrics: Validation scores of the kept model, as in ``model.json`` (``miou``,
            ``overall_accuracy``, ``per_class``...; empty without validation).
        warnings: What the training changed or noticed (e.g. a chip clamped to the region).
        selection: With ``arch="auto"``: every candidate's held-out scores and the one kept
            (``models``, ``kept``), as in ``model.json``'s ``training.selection``.
    """

    package: Path
    arch: str
    bands: tuple[str, ...]
    classes: tuple[ClassInfo, ...]
    metrics: Mapping[str, Any]
    warnings: tuple[str, ...] = ()
    selection: Mapping[str, Any] | None = None

    @property
    def miou(self) -> float | None:
        """Validation mIoU (None without validation)."""
        value = self.metrics.get("miou")
        return None if value is None else float(value)


@dataclass(frozen=True)
class ExportResult:
    """The Cloud-Optimized GeoTIFF :func:`export` wrote.

    Attributes:
        path: The COG (a path, or its ``s3://`` URL).
        layer: The store layer it holds.
        stac_item: Its STAC Item ``<name>.stac.json`` beside it, or None when not asked for.
        legend: A class COG's legend beside it: GDAL's ``<name>.tif.aux.xml`` (class names
            and attribute table) and the QGIS style ``<stem>.qml``.
    """

    path: Path | str
    layer: str
    stac_item: Path | str | None
    legend: tuple[Path | str, ...] = ()

    @property
    def files(self) -> tuple[Path | str, ...]:
        """Every file the export wrote: the COG, its legend, its STAC Item."""
        return (self.path, *self.legend, *((self.stac_item,) if self.stac_item is not None else ()))


@dataclass(frozen=True)
class ClassScore:
    """One class's scores in an evaluation (undefined ratios are None).

    Attributes:
        value: Class value.
        name: Class name.
        support: Reference pixels (or points) of the class.
        predicted: Pixels (or points) predicted as the class.
        precision: User's accuracy.
        recall: Producer's accuracy.
        f1: Harmonic mean of precision and recall.
        iou: Intersection over union.
    """

    value: int
    name: str
    support: int
    predicted: int
    precision: float | None
    recall: float | None
    f1: float | None
    iou: float | None


@dataclass(frozen=True)
class EvaluateResult:
    """The scores :func:`evaluate` found and where its report is.

    Attributes:
        miou: Mean IoU over the classes present in the reference or the prediction.
        overall_accuracy: Share of evaluated pixels (or points) classified right.
        kappa: Cohen's kappa.
        per_class: Scores of each evaluated class.
        report: ``report.md``.
        metrics_file: ``metrics.json`` (every number, the confusion matrix included).
        figures: ``confusion_matrix.png`` and, unless turned off, ``preview.png``.
        points_file: ``points.csv`` of the drawn points, when evaluated on points.
        metrics: The content of ``metrics.json``.
    """

    miou: float | None
    overall_accuracy: float | None
    kappa: float | None
    per_class: tuple[ClassScore, ...]
    report: Path | str
    metrics_file: Path | str
    figures: tuple[Path | str, ...]
    points_file: Path | str | None
    metrics: Mapping[str, Any]


def _require_paths(**given: object) -> None:
    """Refuse an argument that is not a path or URL by name (``None`` raised a TypeError deep inside).

    Raises:
        InputError: A value is not a ``str`` or ``os.PathLike``.
    """
    for name, value in given.items():
        if not isinstance(value, str | os.PathLike):
            raise InputError(f"{name} must be a path or an s3:// URL (str or pathlib.Path), not {value!r}")


def _within(folder: str | Path, name: str) -> Path | str:
    """``name`` in a local folder (a Path) or under an ``s3://`` prefix (a URL)."""
    return join(as_url(folder), name) if is_remote(folder) else Path(folder) / name


def ingest(
    images: Sequence[str | Path] | str | Path,
    out: str | Path,
    *,
    labels: str | Path | None = None,
    label_field: str | None = None,
    classes: Sequence[ClassInfo] | str | Path | None = None,
    block_size: int = 1024,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
    crs: str | None = None,
    resolution: float | tuple[float, float] | None = None,
    bounds: tuple[float, float, float, float] | None = None,
    aoi: str | Path | None = None,
    resampling: str = "bilinear",
    order: str = "given",
    assets: Sequence[str] | None = None,
    label_layer: str | None = None,
    background_value: int | None = None,
) -> IngestResult:
    """Build a region store from image tiles, VRTs or STAC scenes and optional labels (``segpipe ingest``).

    Args:
        images: GeoTIFFs, VRTs, folders of GeoTIFFs or ``s3://`` URLs forming one mosaic,
            or one STAC Item, ItemCollection (a saved search), Catalog or Collection.
        out: Region store (Zarr) to create: a folder or an ``s3://`` URL.
        labels: Label raster or polygons (any CRS; 0 = unlabelled).
        label_field: Class field of label polygons (integer, or text whose values become classes).
        classes: Classes, or a ``classes.json`` with names and colours.
        block_size: Block (shard) edge in pixels: at most 256, or a multiple of 256.
        overwrite: Replace an existing store (only once the new one is complete).
        progress: Called with a short message at each step.
        crs: Target CRS (default: the CRS covering most of the scenes' area).
        resolution: Target pixel size in CRS units (default: the finest band's).
        bounds: Target (left, bottom, right, top) in the target CRS.
        aoi: Vector file of the area of interest (any CRS): its bounding box is ingested
            and pixels outside the polygon become nodata.
        resampling: GDAL resampling of imagery onto the grid (labels are always nearest).
        order: Where scenes overlap: ``given``, ``latest`` or ``least-cloudy``.
        assets: STAC asset keys to stack as bands, in this order (STAC inputs only).
        label_layer: Layer of a multi-layer vector labels file (default: one class per layer).
        background_value: Label value meaning background, not unlabelled (a class of its own).

    Returns:
        What the new store holds.

    Raises:
        SegpipeError: As :func:`segpipe.stages.ingest.ingest` (bad or missing inputs, tiles
            that disagree in bands or type, unusable STAC or labels, a destination that
            cannot be written).
    """
    _require_paths(out=out)
    from segpipe.stages.ingest import ingest as run

    info = run(images, out, labels=labels, label_field=label_field, classes=classes,
               block_size=block_size, overwrite=overwrite, progress=progress, crs=crs,
               resolution=resolution, bounds=bounds, aoi=aoi, resampling=resampling, order=order,
               assets=assets, label_layer=label_layer, background_value=background_value)
    return IngestResult(info.path, (info.height, info.width), info.band_names, info.classes,
                        info.block_size, info.dtype, info.nodata, info.crs_wkt)


def _trained(out: str | Path, spec: ModelSpec) -> TrainResult:
    warnings = spec.training.get("warnings") or ()
    return TrainResult(Path(out), spec.arch, spec.band_names, spec.classes, dict(spec.metrics),
                       tuple(str(w) for w in warnings), spec.training.get("selection"))


def train(
    store: str | Path,
    out: str | Path,
    *,
    config: Mapping[str, Any] | None = None,
    resume: bool = False,
    scheduler: str | None = None,
    progress: Callable[[TrainProgress], None] | None = None,
    budget_minutes: float | None = None,
    **fields: Any,
) -> TrainResult:
    """Train a network (or the random-forest baseline) on the store's labels (``segpipe train``).

    Settings are those of :func:`segpipe.stages.train.config.train_config`, by the names
    of the command's options (``arch``, ``encoder``, ``epochs``, ``chip_size``,
    ``dice_weight``, ``trees``...): from ``config`` (e.g. the command's ``--config`` file,
    read with :func:`segpipe.stages.train.config_file.read_mapping`), overridden by ``fields``.
    Network settings left out are chosen from the data (``training.auto`` in the package).
    ``arch="auto"`` trains the forest and a U-Net within ``budget_minutes`` and keeps the
    better on the same held-out pixels, or their ensemble
    (:func:`segpipe.stages.train.select.train_auto`); it trains from the start.
    ``members=3`` trains three networks of one split from three seeds and keeps their
    average as one package (:func:`segpipe.stages.train.members.train_members`).

    Args:
        store: Region store with labels.
        out: Model package directory to write.
        config: Settings as a mapping.
        resume: Continue from the checkpoint in ``out`` (an error when there is none).
        scheduler: Train on a worker of this dask cluster (``tcp://host:port``); the store
            and ``out`` must be reachable there under the same names.
        progress: Called after every step (in this process only).
        budget_minutes: ``arch="auto"``: wall-clock minutes for every candidate's training
            (the setting ``budget_minutes``, default 5; refused for another arch).
        **fields: More settings; they override ``config``.

    Returns:
        The package and its validation scores.

    Raises:
        SettingError: A setting is unknown, of the wrong type or out of range (an InputError).
        SegpipeError: As :func:`segpipe.stages.train.train` (no labels, a store that is
            missing or damaged, nothing to resume).
    """
    _require_paths(store=store, out=out)
    from segpipe.stages.train.config import train_config

    settings = {**(config or {}), **fields}
    if budget_minutes is not None:
        settings["budget_minutes"] = budget_minutes
    cfg = train_config(settings)
    if scheduler:
        from segpipe.stages.train.remote import train_on_scheduler

        return _trained(out, train_on_scheduler(scheduler, store, out, cfg, resume))
    from segpipe.stages.train import train as run

    return _trained(out, run(store, out, cfg, progress=progress, resume=resume))


def predict(
    store: str | Path,
    model: str | Path,
    *,
    tile_size: int | None = None,
    overlap: int | None = None,
    batch_size: int | None = None,
    scheduler: str | None = None,
    client: distributed.Client | None = None,
    force: bool = False,
    blend: str = "cosine",
    tta: bool | None = None,
    probabilities: bool = False,
    task_size: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    allow_resolution_mismatch: bool = False,
) -> PredictSummary:
    """Classify every pixel of the store on a dask cluster (``segpipe predict``).

    Writes ``classes`` and ``confidence`` (and with ``probabilities`` the per-class
    ``probabilities``) into the store; read them with :func:`segpipe.open_region`.

    Args:
        store: Region store (a folder or an ``s3://`` URL).
        model: Model package directory or ``s3://`` URL.
        tile_size: Window edge (a multiple of the network's stride); default from the package.
        overlap: Window overlap in pixels; default from the package.
        batch_size: Most windows per forward pass (default: 8 on GPUs, 2 on CPUs).
        scheduler: Dask scheduler address (default: ``SEGPIPE_SCHEDULER``, else a local
            cluster), or ``threads`` / ``synchronous`` to run the tasks in this process.
        client: A connected dask client to use instead.
        force: Recompute finished blocks.
        blend: Blending of overlapping windows: ``cosine``, ``gaussian``, ``mean`` or ``crop``.
        tta: Average 8 flips and rotations per window (8x the forward calls); default: a
            network does on a region of at most 4096 x 4096 px, a per-pixel model never.
        probabilities: Also write the per-class probabilities layer.
        task_size: Largest task edge in pixels (whole blocks); default 4096.
        progress: Called as ``progress(done, total)`` in blocks.
        allow_resolution_mismatch: Predict even where the image's pixel size differs by more
            than 25 % from the training pixel size the package records.

    Returns:
        What the run did.

    Raises:
        SegpipeError: As :func:`segpipe.stages.predict.predict` (an invalid package, bands
            or pixel size that differ, bad settings, a store held by another run).
    """
    _require_paths(store=store, model=model)
    from segpipe.stages.predict.driver import MAX_TASK_PIXELS
    from segpipe.stages.predict.driver import predict as run

    return run(store, model, tile_size=tile_size, overlap=overlap, batch_size=batch_size, client=client,
               force=force, progress=progress, blend=blend, tta=tta, probabilities=probabilities,
               max_task_pixels=MAX_TASK_PIXELS if task_size is None else task_size * task_size,
               scheduler=scheduler, allow_resolution_mismatch=allow_resolution_mismatch)


def export(
    store: str | Path,
    out: str | Path,
    *,
    layer: str = "classes",
    compress: str = "DEFLATE",
    stac: bool = True,
    overwrite: bool = True,
) -> ExportResult:
    """Export a store layer as a validated Cloud-Optimized GeoTIFF (``segpipe export``).

    Args:
        store: Region store (a folder or an ``s3://`` URL).
        out: The ``.tif`` to write (a path or an ``s3://`` URL).
        layer: ``classes``, ``confidence``, ``probabilities`` or ``image``.
        compress: ``DEFLATE`` (readable everywhere) or ``ZSTD`` (faster, smaller).
        stac: Also write a STAC Item ``<name>.stac.json`` beside the COG.
        overwrite: Replace an existing COG (only once the new one is complete and valid).

    Returns:
        Where the COG, its legend files and its STAC Item are.

    Raises:
        SegpipeError: As :func:`segpipe.stages.export.write_cog` (no such layer, a bad
            destination or compression, a destination that cannot be written).
    """
    _require_paths(store=store, out=out)
    from segpipe.stages.export.cog import write_cog
    from segpipe.stages.export.legend import legend_files
    from segpipe.stages.export.stac import stac_item_path

    path = write_cog(store, out, layer=layer, overwrite=overwrite, compress=compress, stac=stac)
    legend = tuple(legend_files(path))
    item = beside(path, stac_item_path) if stac else None
    return ExportResult(path, layer, item, legend)


def export_model(
    model: str | Path,
    onnx: str | Path,
    *,
    package: str | Path | None = None,
    opset: int = 17,
    window: int | None = None,
) -> OnnxExport:
    """Export a trained package's network to ONNX, checked against torch (``segpipe export-model``).

    Args:
        model: A trained model package (torch weights).
        onnx: The ONNX file to write (input ``image`` N x bands x H x W float32,
            normalised as the package says; output ``logits``).
        package: Also write an ONNX model package folder there (``model.json``,
            ``model.onnx``, ``mlm.json``) that :func:`predict` runs with onnxruntime.
        opset: The ONNX opset.
        window: Window edge of a network exported at one size (PSPNet); default the
            tile :func:`predict` uses for the package.

    Returns:
        What was written, with the largest difference to torch measured on a check input.

    Raises:
        ModelPackageError: The package is invalid or already ONNX, the window does not
            fit the network, the export does not match torch, or ``package`` holds torch weights.
    """
    _require_paths(model=model, onnx=onnx)
    from segpipe.models.onnx import export_onnx

    return export_onnx(model, onnx, opset, package=package, window=window)


def polygons(
    store: str | Path,
    out: str | Path,
    *,
    min_area: float | None = None,
    simplify: float | None = None,
    client: distributed.Client | None = None,
) -> Path:
    """One polygon per connected patch of the store's classes (``segpipe export --vector``).

    The store is read block by block (on ``client``'s cluster when given) and the result
    equals a whole-raster polygonization with 4-connectivity; 0 and 255 are skipped.

    Args:
        store: Region store with a ``classes`` layer.
        out: The ``.gpkg`` to write (layer ``classes``: ``class``, ``class_name``, ``area``
            in map units², ``mean_confidence`` in percent); replaced only once complete.
        min_area: Minimum mapping unit in map units², applied as ``gdal_sieve -4`` would
            on the whole raster.
        simplify: Tolerance in map units for simplifying each polygon.
        client: Dask client to run the blocks on (None: in this process).

    Returns:
        The written file.

    Raises:
        InputError: A bad destination or setting; MissingLayerError without classes.
    """
    _require_paths(store=store, out=out)
    from segpipe.stages.export.vector import write_vector

    return write_vector(store, out, min_area=min_area, simplify=simplify, client=client)


def preview(cog: str | Path, out: str | Path, *, max_size: int = 1024) -> Path:
    """Draw a whole exported layer into a PNG with its legend (``segpipe preview``).

    Classes are drawn in their colours with their names and shares of the valid pixels;
    any other band with a colour bar. The overview nearest the size shown is read.

    Args:
        cog: An exported layer (a COG of :func:`export`) or any GeoTIFF.
        out: The ``.png`` to write (replaced whole, never half-written).
        max_size: Longest side of the map, in pixels.

    Returns:
        The written PNG.

    Raises:
        InputError: ``cog`` is missing or no raster, or ``out`` is no ``.png``.
    """
    _require_paths(cog=cog, out=out)
    from segpipe.stages.export.preview import write_preview

    return write_preview(cog, out, max_size)


def evaluate(
    prediction: str | Path,
    reference: str | Path,
    out: str | Path,
    *,
    reference_field: str | None = None,
    layer: str = "classes",
    points: int | None = None,
    sampling: str = "stratified",
    seed: int = 0,
    preview: bool = True,
) -> EvaluateResult:
    """Compare a prediction with a reference and write a report (``segpipe evaluate``).

    Args:
        prediction: Region store (its ``layer``) or class GeoTIFF (or an ``s3://`` URL).
        reference: Reference label raster or polygons (or an ``s3://`` URL).
        out: Report folder (or an ``s3://`` prefix).
        reference_field: Class field of reference polygons (default: guessed).
        layer: Store layer to evaluate.
        points: Evaluate on this many random points, not every pixel.
        sampling: Points: ``stratified``, ``equalized`` or ``random``.
        seed: Seed of the point draw.
        preview: Also draw image, prediction, reference and disagreement (``preview.png``).

    Returns:
        The scores and where the report's files are.

    Raises:
        SegpipeError: As :func:`segpipe.stages.evaluate.evaluate` (missing inputs, no
            overlap or no labelled pixel, bad points or sampling, a report folder that
            cannot be written).
    """
    _require_paths(prediction=prediction, reference=reference, out=out)
    from segpipe.stages.evaluate import evaluate as run

    metrics = run(prediction, reference, out, reference_field=reference_field, layer=layer,
                  preview=preview, points=points, sampling=sampling, seed=seed)
    per_class = tuple(
        ClassScore(int(c["value"]), str(c["name"]), int(c["support"]), int(c["predicted"]),
                   c["precision"], c["recall"], c["f1"], c["iou"])
        for c in metrics["per_class"]
    )
    figures = ("confusion_matrix.png", *(("preview.png",) if preview else ()))
    return EvaluateResult(
        miou=metrics["miou"],
        overall_accuracy=metrics["overall_accuracy"],
        kappa=metrics["kappa"],
        per_class=per_class,
        report=_within(out, "report.md"),
        metrics_file=_within(out, "metrics.json"),
        figures=tuple(_within(out, name) for name in figures),
        points_file=None if points is None else _within(out, "points.csv"),
        metrics=metrics,
    )
