"""One error tree for segpipe.

Every error segpipe raises on purpose derives from :class:`SegpipeError`, so callers,
the CLI and Prefect retry policies match on types, never on message strings.
Errors that say "the input is wrong, fix it" derive from :class:`InputError`;
errors worth retrying (a flaky object store, a lost worker) derive from
:class:`TransientError`.
"""

from __future__ import annotations

__all__ = [
    "ArchitectureError",
    "BatchError",
    "BandMismatchError",
    "InputError",
    "LabelsError",
    "MissingInputError",
    "ModelPackageError",
    "PretrainedWeightsError",
    "SegpipeError",
    "StoreError",
    "TileMismatchError",
    "TransientError",
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


class StoreError(InputError):
    """A region store is missing a layer, or a write does not align with it."""


class TransientError(SegpipeError):
    """A failure that may succeed when retried (storage hiccup, lost worker)."""


class BatchError(SegpipeError):
    """One or more regions of a batch failed; the others ran to the end."""
