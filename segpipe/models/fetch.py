"""Model packages on object storage: a local copy per machine, fetched once.

A cluster's workers rarely share a file system with the machine that trained the
model, but they all reach the same bucket. ``--model s3://bucket/models/unet`` works
anywhere a local package does: every process that needs the package (the driver for
its description and hash, each worker for the weights) calls :func:`local_package`,
which downloads ``model.json`` and ``weights.safetensors`` into a cache folder keyed by
the URL and both objects' ETags and sizes. Processes of one machine share the copy; a
package replaced on S3 has new ETags, hence a new copy. Downloads land in a temporary
folder renamed into place when complete, so a process never loads half a package.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from segpipe.io.remote import as_url, filesystem, is_remote, join, remote_errors, remote_info

__all__ = ["cache_root", "local_package"]


def cache_root() -> Path:
    """Where fetched packages live: ``$SEGPIPE_CACHE/models`` or the system temp folder."""
    base = os.environ.get("SEGPIPE_CACHE")
    root = Path(base) / "models" if base else Path(tempfile.gettempdir()) / "segpipe-models"
    root.mkdir(parents=True, exist_ok=True)
    return root


def local_package(model_dir: str | Path) -> Path:
    """A local folder holding the package at ``model_dir`` (itself when it is local).

    Raises:
        MissingInputError: A package file does not exist at the URL (the message names it).
        TransientError: The object storage could not be reached (worth a retry).
    """
    if not is_remote(model_dir):
        return Path(model_dir)
    from segpipe.models.package import SPEC_FILE, WEIGHTS_FILE  # the package imports this module

    files = (SPEC_FILE, WEIGHTS_FILE)
    url = as_url(str(model_dir)).rstrip("/")
    infos = [remote_info(join(url, name), "model package file") for name in files]
    identity = json.dumps([url, *[[str(i.get("ETag", "")), int(i.get("size", 0))] for i in infos]])
    dest = cache_root() / hashlib.sha256(identity.encode()).hexdigest()[:20]
    if all((dest / name).is_file() for name in files):
        return dest
    tmp = Path(tempfile.mkdtemp(dir=cache_root(), prefix=".fetch-"))
    try:
        with remote_errors(url, "model package"):
            for name in files:
                filesystem().get_file(join(url, name), str(tmp / name))
        try:
            tmp.rename(dest)
        except OSError:
            # Another process of this machine finished the same copy first: use it.
            if not all((dest / name).is_file() for name in files):
                raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(tmp)
    return dest
