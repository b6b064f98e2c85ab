"""segpipe: classify every pixel of very large raster mosaics with deep learning.

The public API is small; stages are also reachable as the ``segpipe`` command.
Importing segpipe never imports torch's CUDA runtime nor Prefect.
"""

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
    ModelPackageError,
    SegpipeError,
    StorageError,
    StoreBusyError,
    StoreError,
    TileMismatchError,
    TransientError,
)
from segpipe.types import ClassInfo

__version__ = "0.1.0"

__all__ = [
    "ArchitectureError",
    "BandMismatchError",
    "BatchError",
    "ClassInfo",
    "ClusterError",
    "EngineError",
    "EnvironmentFaultError",
    "InputError",
    "LabelsError",
    "MissingInputError",
    "ModelPackageError",
    "SegpipeError",
    "StorageError",
    "StoreBusyError",
    "StoreError",
    "TileMismatchError",
    "TransientError",
    "__version__",
]
