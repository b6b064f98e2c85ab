"""Model packages on object storage: a local copy per machine and user, fetched once.

A cluster's workers rarely share a file system with the machine that trained the
model, but they all reach the same bucket. ``--model s3://bucket/models/unet`` works
anywhere a local package does: every process that needs the package (the driver for
its description and hash, each worker for the weights) calls :func:`local_package`,
which downloads ``model.json`` and ``weights.safetensors`` (an ONNX package's
``model.onnx``) into a cache folder keyed by
the URL and both objects' ETags and sizes. Processes of one machine share the copy; a
package replaced on S3 has new ETags, hence a new copy. Downloads land in a temporary
folder renamed into place when complete, so a process never loads half a package.

The cache is private to its user: ``$SEGPIPE_CACHE/models``, else
``<temp folder>/segpipe-<uid>/models``, created with mode 0700. A cache folder owned
by another user, or writable by others, is refused: whoever can write there can make
this user's workers load any weights. A copy records the SHA-256 of its files when it
is fetched, and is reused only while its files still match; a copy that does not is
fetched again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any

from segpipe.errors import MissingInputError, StorageError
from segpipe.io.remote import as_url, filesystem, is_remote, join, remote_errors, remote_exists, remote_info
from segpipe.models.files import ONNX_FILE, SPEC_FILE, WEIGHTS_FILE, settle_package

__all__ = ["CACHE_ENV", "cache_root", "check_private", "local_package"]

log = logging.getLogger(__name__)

CACHE_ENV = "SEGPIPE_CACHE"
# Written into each copy after its files, with their hashes: a copy without it is incomplete.
RECORD = ".segpipe-fetch.json"


def check_private(folder: Path) -> None:
    """Refuse a cache folder that another user owns or may write into.

    Raises:
        StorageError: The folder is owned by another user or writable by group or others
            (the message names it and says how to fix it).
    """
    st = folder.stat()
    uid = os.getuid()
    if st.st_uid != uid:
        raise StorageError(
            f"model cache {folder} belongs to user {st.st_uid}, not to this user ({uid}): it could hold "
            f"weights planted by someone else; set {CACHE_ENV} to a folder of your own"
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise StorageError(
            f"model cache {folder} is writable by other users (mode {stat.S_IMODE(st.st_mode):o}): run "
            f"'chmod go-w {folder}' or set {CACHE_ENV} to a private folder"
        )


def _private_dir(folder: Path) -> Path:
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"cannot create the model cache {folder} ({exc}): set {CACHE_ENV} to a "
                           "writable folder") from exc
    check_private(folder)
    return folder


def cache_root() -> Path:
    """Where fetched packages live: ``$SEGPIPE_CACHE/models``, else ``<tmp>/segpipe-<uid>/models``.

    Raises:
        StorageError: The folder (or the per-user folder above it) cannot be created,
            belongs to another user or is writable by others.
    """
    base = os.environ.get(CACHE_ENV)
    if base:
        return _private_dir(Path(base) / "models")
    # The per-user folder in the shared temp folder is checked too: another user could
    # have created it first, to plant a package.
    user = _private_dir(Path(tempfile.gettempdir()) / f"segpipe-{os.getuid()}")
    return _private_dir(user / "models")


def hash_file(h: hashlib._Hash, path: Path) -> None:
    """Feed ``path``'s bytes to ``h`` in 1 MiB pieces (weights files are tens of MB)."""
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)


def _digests(folder: Path, names: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for name in names:
        h = hashlib.sha256()
        hash_file(h, folder / name)
        out[name] = h.hexdigest()
    return out


# Copies found intact, by their files' identity: every read_spec, model_hash and load
# of a URL asks, and hashing 50 MB of weights each time would cost ~40 ms.
_CHECKED: set[tuple[tuple[int, int, int, int], ...]] = set()


def _intact(dest: Path, names: tuple[str, ...]) -> bool:
    """Whether a cached copy is complete and its files still have the hashes recorded at fetch time."""
    try:
        ident = tuple((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
                      for st in (os.stat(dest / n) for n in (*names, RECORD)))
        if ident in _CHECKED:
            return True
        recorded = json.loads((dest / RECORD).read_text()).get("sha256")
        ok = isinstance(recorded, dict) and _digests(dest, names) == {n: recorded.get(n) for n in names}
    except (OSError, ValueError, AttributeError):
        return False
    if ok:
        _CHECKED.add(ident)
    return ok


def _fetch(url: str, dest: Path, names: tuple[str, ...]) -> None:
    """Download the package into a temporary folder, record its hashes, rename it to ``dest``."""
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".fetch-"))
    try:
        with remote_errors(url, "model package"):
            for name in names:
                filesystem().get_file(join(url, name), str(tmp / name))
        (tmp / RECORD).write_text(json.dumps({"url": url, "sha256": _digests(tmp, names)}))
        try:
            tmp.rename(dest)
        except OSError:
            # Another process of this machine finished the same copy first: use it.
            if not _intact(dest, names):
                raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(tmp)


def _remote_weights(url: str) -> tuple[str, dict[str, Any]]:
    """The package's weights file at ``url`` and its metadata: torch's, else an ONNX package's.

    Asked for by name rather than read from ``model.json``, so a torch package (the usual
    case) costs no more requests than before.

    Raises:
        MissingInputError: Neither weights file exists (the message names torch's).
    """
    try:
        return WEIGHTS_FILE, remote_info(join(url, WEIGHTS_FILE), "model package file")
    except MissingInputError:
        if not remote_exists(join(url, ONNX_FILE)):
            raise
    return ONNX_FILE, remote_info(join(url, ONNX_FILE), "model package file")


def local_package(model_dir: str | Path) -> Path:
    """A local folder holding the package at ``model_dir`` (itself when it is local).

    Raises:
        MissingInputError: A package file does not exist at the URL (the message names it).
        TransientError: The object storage could not be reached (worth a retry).
        StorageError: The cache folder is not private to this user.
    """
    if not is_remote(model_dir):
        settle_package(Path(model_dir))  # a write cut between its two renames is finished first
        return Path(model_dir)

    url = as_url(str(model_dir)).rstrip("/")
    spec_info = remote_info(join(url, SPEC_FILE), "model package file")
    weights, weights_info = _remote_weights(url)
    files, infos = (SPEC_FILE, weights), [spec_info, weights_info]
    identity = json.dumps([url, *[[str(i.get("ETag", "")), int(i.get("size", 0))] for i in infos]])
    dest = cache_root() / hashlib.sha256(identity.encode()).hexdigest()[:20]
    if _intact(dest, files):
        return dest
    if dest.exists():
        log.warning("cached copy %s of %s does not match the hashes recorded when it was fetched; "
                    "fetching it again", dest, url)
        shutil.rmtree(dest, ignore_errors=True)
    _fetch(url, dest, files)
    return dest
