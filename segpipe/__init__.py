"""segpipe: classify every pixel of very large raster mosaics with deep learning.

The public API is small; stages are also reachable as the ``segpipe`` command:

- :func:`open_region`: a region store as a lazy xarray Dataset (CRS decoded);
- :func:`ingest`, :func:`train`, :func:`predict`, :func:`export`, :func:`evaluate`: the
  stages, with the command's options as keyword arguments, returning
  :class:`IngestResult`, :class:`TrainResult`, :class:`PredictSummary`,
  :class:`ExportResult` and :class:`EvaluateResult`;
- :func:`classify`: a model package applied lazily to any (band, y, x) DataArray, with
  the classes ``segpipe predict`` gives;
- :class:`ClassInfo` and the errors (:class:`SegpipeError` and its family, with the
  training settings' :class:`SettingError`).

Importing segpipe never imports torch's CUDA runtime nor Prefect: the functions and
result types load on first use (PEP 562), so ``import segpipe`` and ``segpipe
--version`` stay fast. The stages themselves live in ``segpipe.stages.<name>``, so
``segpipe.predict`` is always the function.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from segpipe.errors import (
    ArchitectureError,
    BandMismatchError,
    BatchError,
    ClusterError,
    EngineError,
    EnvironmentFaultError,
    InputError,
    LabelsError,
    MissingInputError,
    MissingLayerError,
    ModelPackageError,
    PretrainedWeightsError,
    ResolutionMismatchError,
    SegpipeError,
    StacError,
    StorageError,
    StoreBusyError,
    StoreError,
    TileMismatchError,
    TransientError,
    VectorFormatError,
)
from segpipe.types import ClassInfo

if TYPE_CHECKING:
    from segpipe.api import (
        ClassScore,
        EvaluateResult,
        ExportResult,
        IngestResult,
        TrainResult,
        evaluate,
        export,
        export_model,
        ingest,
        polygons,
        predict,
        preview,
        train,
    )
    from segpipe.io.store import open_region
    from segpipe.stages.export.collection import write_collection
    from segpipe.stages.predict.classify import classify
    from segpipe.stages.predict.driver import PredictSummary
    from segpipe.stages.train.config import SettingError

__version__ = "0.1.0"

# Public name -> the module defining it, imported on first access.
_LAZY: dict[str, str] = {
    "open_region": "segpipe.io.store",
    "classify": "segpipe.stages.predict.classify",
    "PredictSummary": "segpipe.stages.predict.driver",
    "SettingError": "segpipe.stages.train.config",
    "write_collection": "segpipe.stages.export.collection",
    **{
        name: "segpipe.api"
        for name in ("ingest", "train", "predict", "export", "export_model", "polygons", "preview",
                     "evaluate", "ClassScore", "EvaluateResult", "ExportResult", "IngestResult",
                     "TrainResult")
    },
}

__all__ = [
    "ArchitectureError",
    "BandMismatchError",
    "BatchError",
    "ClassInfo",
    "ClassScore",
    "ClusterError",
    "EngineError",
    "EnvironmentFaultError",
    "EvaluateResult",
    "ExportResult",
    "IngestResult",
    "InputError",
    "LabelsError",
    "MissingInputError",
    "MissingLayerError",
    "ModelPackageError",
    "PredictSummary",
    "PretrainedWeightsError",
    "ResolutionMismatchError",
    "StacError",
    "SegpipeError",
    "SettingError",
    "StorageError",
    "StoreBusyError",
    "StoreError",
    "TileMismatchError",
    "TrainResult",
    "TransientError",
    "VectorFormatError",
    "__version__",
    "classify",
    "evaluate",
    "export",
    "export_model",
    "ingest",
    "open_region",
    "polygons",
    "predict",
    "preview",
    "train",
    "write_collection",
]


def __getattr__(name: str) -> Any:
    """Import a public function or result type on first access (PEP 562)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'segpipe' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later accesses skip this hook
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
