"""The file names inside a model package folder, and how its files are written.

Shared by the package, its fetcher, its ONNX form and its STAC MLM description.
"""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path

__all__ = ["ONNX_FILE", "SPEC_FILE", "WEIGHTS_FILE", "atomic_write"]

SPEC_FILE = "model.json"
WEIGHTS_FILE = "weights.safetensors"
# The weights of an ONNX package (model.json's weights_format "onnx"), run by onnxruntime.
ONNX_FILE = "model.onnx"


def _umask() -> int:
    """The process's umask (read by setting it, the only portable way, and setting it back)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


_UMASK_LOCK = threading.Lock()


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``path`` whole or not at all (a temporary beside it, renamed over it)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        # mkstemp makes the file 0600: workers or containers running as another user
        # could not read the package. Give it the mode open() would have.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


