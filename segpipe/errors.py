"""One error tree for segpipe.

Every error segpipe raises on purpose derives from :class:`SegpipeError`, so callers,
the CLI and Prefect retry policies match on types, never on message strings.
Errors that say "the input is wrong, fix it" derive from :class:`InputError`;
errors worth retrying (a flaky object store, a lost worker) derive from
:class:`TransientError`; errors of the machine rather than the input (a full disk,
a folder without write permission, an unreachable scheduler, a Prefect engine that
will not start) derive from :class:`EnvironmentFaultError`.

Every message is one line that names the file, tile, store or address at fault and
says what to do. The ``segpipe`` command maps each family to an exit code
(:func:`exit_code`): 2 for bad input and usage errors, 3 for faults of the
environment, 4 for a store held by another run, 1 for anything unexpected (a bug).
"""

from __future__ import annotations

import errno

__all__ = [
    "STORAGE_HINTS",
    "ArchitectureError",
    "BatchError",
    "BandMismatchError",
    "ClusterError",
    "EnvironmentFaultError",
    "EngineError",
    "InputError",
    "LabelsError",
    "MissingInputError",
    "MissingLayerError",
    "ModelPackageError",
    "PretrainedWeightsError",
    "ResolutionMismatchError",
    "StacError",
    "SegpipeError",
    "StoreBusyError",
    "StoreError",
    "StorageError",
    "TileMismatchError",
    "TransientError",
    "VectorFormatError",
    "exit_code",
]


class SegpipeError(Exception):
    """Base class of every error segpipe raises on purpose."""


class InputError(SegpipeError, ValueError):
    """The user's input is unusable; the message says what to fix."""


class MissingInputError(InputError, FileNotFoundError):
    """An input file, folder or store does not exist or holds nothing usable."""


class TileMismatchError(InputError):
    """Tiles of one mosaic disagree in CRS, resolution, band count or dtype."""


class LabelsError(InputError):
    """Labels are unusable: outside the image, no class field, no labelled pixel."""


class ArchitectureError(InputError):
    """An unknown model architecture or encoder was asked for."""


class BandMismatchError(InputError):
    """The image's bands do not match what the model was trained on."""


class ModelPackageError(InputError):
    """A model package is missing, incomplete or of an unsupported schema."""


class PretrainedWeightsError(InputError):
    """A pretrained weights file is unreadable or holds nothing that fits the encoder."""


class StacError(InputError):
    """A STAC Item, ItemCollection or catalogue is unusable: a missing asset, mixed band sets."""


class ResolutionMismatchError(InputError):
    """The image's pixel size differs from the one the model was trained at by more than allowed."""


class VectorFormatError(InputError):
    """A vector destination segpipe cannot write: an extension other than .gpkg or .parquet."""


class StoreError(InputError):
    """A region store is missing a layer, or a write does not align with it."""


class MissingLayerError(StoreError, MissingInputError):
    """A region store lacks a layer a stage needs (the message says which step makes it)."""


class TransientError(SegpipeError):
    """A failure that may succeed when retried (storage hiccup, lost worker)."""


class BatchError(SegpipeError):
    """One or more regions of a batch failed; the others ran to the end."""


# errno -> what to do, for faults of a destination (not of the input): one table for the
# errors mapped where they happen (segpipe.io.remote.storage_errors) and for the CLI's
# last-resort mapping (segpipe.boundary).
STORAGE_HINTS: dict[int, str] = {
    errno.ENOSPC: "the disk is full: free space or choose another destination, then rerun",
    errno.EDQUOT: "the disk quota is exceeded: free space or choose another destination, then rerun",
    errno.EFBIG: "the file is too large for that filesystem: choose another destination",
    errno.EROFS: "the filesystem is read-only: choose a writable destination",
    errno.EACCES: "permission denied: choose a writable destination or fix its permissions",
    errno.EPERM: "operation not permitted: choose a writable destination or fix its permissions",
    errno.EISDIR: "a folder is in the way: name a file, not a folder",
    errno.ENOTDIR: "a file is in the way where a folder should be: choose another destination",
}


class EnvironmentFaultError(SegpipeError):
    """The machine, not the input, is at fault: fix the environment and rerun."""


class StorageError(EnvironmentFaultError, OSError):
    """A destination cannot be written: full disk, no permission, read-only, a folder in the way."""


class ClusterError(EnvironmentFaultError, TransientError):
    """The Dask scheduler cannot be reached, or the cluster cannot start."""


class EngineError(EnvironmentFaultError, TransientError):
    """The local Prefect engine did not start (or answer) in time."""


class StoreBusyError(StoreError):
    """Another run holds the region store (for example a predict in progress)."""


def exit_code(exc: BaseException) -> int:
    """The ``segpipe`` command's exit code for an error.

    Returns:
        4 for a store held by another run, 2 for other bad input, 3 for faults of the
        environment (and other segpipe errors, such as a failed batch), 1 for anything
        that is not a segpipe error (a bug: rerun with ``--debug`` for the traceback).
    """
    if isinstance(exc, StoreBusyError):
        return 4
    if isinstance(exc, InputError):
        return 2
    if isinstance(exc, SegpipeError):
        return 3
    return 1
