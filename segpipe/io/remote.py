"""Object storage: ``s3://`` URLs for images, labels, region stores, exports and reports.

Credentials and the endpoint come from the usual AWS environment variables, read by
each process for itself, so no secret ever travels inside a dask task graph (workers
of a ``LocalCluster`` inherit the environment of the process that starts them; on
other clusters, give every worker the same variables):

- ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` (and ``AWS_SESSION_TOKEN``), or any
  other source botocore and GDAL know (profiles, instance roles);
- ``AWS_REGION`` / ``AWS_DEFAULT_REGION``;
- ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``): an S3-compatible server (MinIO,
  Ceph, moto). botocore (hence s3fs and zarr) reads it; GDAL 3.10 does not, so
  :func:`gdal_options` maps it to GDAL's ``AWS_S3_ENDPOINT``, ``AWS_HTTPS`` and
  ``AWS_VIRTUAL_HOSTING``. That mapping lives here and nowhere else.

Zarr stores are reached through fsspec (s3fs) with :func:`storage_options`; rasters and
polygons through GDAL's ``/vsis3/`` (:func:`gdal_path`, inside :func:`gdal_env`). GDAL
cannot write a COG in place on S3, so outputs are built in a local folder and uploaded
only once complete and validated (:func:`upload`, :func:`staged_dir`): S3 makes an
object visible only when its single PUT or its multipart upload completes, so a failed
or interrupted upload never leaves a partial object at the destination key.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from segpipe.errors import (
    STORAGE_HINTS,
    InputError,
    MissingInputError,
    SegpipeError,
    StorageError,
    TransientError,
)

if TYPE_CHECKING:
    import s3fs

__all__ = [
    "S3_SCHEME",
    "as_url",
    "beside",
    "check_bucket",
    "filesystem",
    "gdal_env",
    "gdal_options",
    "gdal_path",
    "is_remote",
    "join",
    "posix_suffix",
    "remote_errors",
    "remote_exists",
    "remote_info",
    "remove_tree",
    "staged_dir",
    "storage_options",
    "storage_errors",
    "storage_fault",
    "storage_options_for",
    "upload",
    "url_name",
    "url_parent",
    "vector_path",
]

S3_SCHEME = "s3://"
_VSIS3 = "/vsis3/"


def is_remote(path: object) -> bool:
    """True for an ``s3://`` URL (also one a ``pathlib.Path`` squashed to ``s3:/``)."""
    return isinstance(path, str | Path) and str(path).startswith(("s3://", "s3:/"))


def as_url(path: str | Path) -> str:
    """``path`` as a normalised ``s3://bucket/key`` URL (no trailing slash).

    Accepts URLs that went through ``pathlib.Path`` (``s3:/bucket/key``).
    """
    text = str(path)
    rest = text[len("s3:") :].lstrip("/")
    return S3_SCHEME + rest.rstrip("/")


def join(url: str, *parts: str) -> str:
    """``url`` with ``parts`` appended as key components."""
    return "/".join([as_url(url), *(p.strip("/") for p in parts)])


def url_name(url: str) -> str:
    """Last key component of a URL (``s3://b/p/x.tif`` -> ``x.tif``)."""
    return as_url(url).rsplit("/", 1)[-1]


def url_parent(url: str) -> str:
    """The URL one key component up (``s3://b/p/x.tif`` -> ``s3://b/p``)."""
    return as_url(url).rsplit("/", 1)[0]


def beside(location: Path | str, name_of: Callable[[Path], Path]) -> Path | str:
    """The file ``name_of`` names after ``location``, in the same folder.

    A path for a local ``location``; for an ``s3://`` object, the URL beside it
    (``s3://b/p/x.tif`` -> ``s3://b/p/x.stac.json``).
    """
    if isinstance(location, Path):
        return name_of(location)
    return join(url_parent(location), name_of(Path(url_name(location))).name)


def _endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _region() -> str | None:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None


def storage_options() -> dict[str, Any]:
    """fsspec/s3fs options for ``s3://`` URLs (the endpoint from the environment).

    Credentials are left to botocore's own lookup, so they never end up in pickled task
    graphs that carry a filesystem object.
    """
    # Other processes write the same prefixes (dask workers, a rerun): a cached listing
    # would hide their objects.
    opts: dict[str, Any] = {"use_listings_cache": False}
    # The region is left to botocore too (it reads AWS_REGION / AWS_DEFAULT_REGION): an
    # explicit one makes s3fs send a LocationConstraint that us-east-1 rejects.
    endpoint = _endpoint()
    if endpoint:
        opts["client_kwargs"] = {"endpoint_url": endpoint}
    return opts


def storage_options_for(path: str | Path) -> dict[str, Any] | None:
    """:func:`storage_options` for a URL, None for a local path (zarr and xarray refuse them there)."""
    return storage_options() if is_remote(path) else None


def filesystem() -> s3fs.S3FileSystem:
    """The s3fs filesystem for ``s3://`` URLs (fsspec caches instances, so this is cheap)."""
    import s3fs

    return s3fs.S3FileSystem(**storage_options())


def gdal_options() -> dict[str, str]:
    """GDAL config options for ``/vsis3/`` built from the AWS environment variables.

    GDAL reads the credentials and region from the environment itself; only the
    endpoint override needs translating. Options the user set in the environment
    under GDAL's own names win.
    """
    opts: dict[str, str] = {}
    endpoint = _endpoint()
    if endpoint:
        parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        opts["AWS_S3_ENDPOINT"] = parts.netloc + parts.path.rstrip("/")
        opts["AWS_HTTPS"] = "NO" if parts.scheme == "http" else "YES"
        # Servers other than AWS rarely have per-bucket DNS names: path-style requests.
        opts["AWS_VIRTUAL_HOSTING"] = "FALSE"
    region = _region()
    if region:
        opts["AWS_REGION"] = region
    return {k: v for k, v in opts.items() if k not in os.environ}


@contextlib.contextmanager
def gdal_env(*paths: str | Path | None) -> Iterator[None]:
    """GDAL configured for ``/vsis3/`` while the block runs, if any of ``paths`` is a URL.

    Local-only work runs without a new ``rasterio.Env``, exactly as before. Safe in
    dask worker threads: rasterio keeps the options thread-local outside the main thread.
    """
    if not any(is_remote(p) for p in paths):
        yield
        return
    import rasterio

    # A listing of the "folder" on every open (to find sidecar files) is slow on
    # object storage and useless for segpipe's inputs.
    with rasterio.Env(GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR", **gdal_options()):
        yield


def gdal_path(path: str | Path) -> str:
    """The name GDAL opens: ``s3://bucket/key`` -> ``/vsis3/bucket/key``; local paths unchanged."""
    if not is_remote(path):
        return str(path)
    return _VSIS3 + as_url(path)[len(S3_SCHEME) :]


@functools.lru_cache(maxsize=4)
def _configure_pyogrio(options: tuple[tuple[str, str], ...]) -> None:
    import pyogrio

    pyogrio.set_gdal_config_options(dict(options))


def vector_path(path: str | Path) -> str:
    """The name pyogrio opens for ``path``, configuring pyogrio's GDAL for ``/vsis3/`` first.

    pyogrio bundles its own GDAL, which ``rasterio.Env`` does not reach; its config
    options are process-wide, so only the endpoint options (harmless for local files)
    are set, once per process and endpoint.
    """
    if is_remote(path):
        _configure_pyogrio(tuple(sorted(gdal_options().items())))
    return gdal_path(path)


def _is_transient(exc: BaseException) -> bool:
    """Connection-level failures that a retry may cure."""
    try:
        import botocore.exceptions as bce

        if isinstance(exc, bce.ConnectionError | bce.HTTPClientError):
            return True
    except ImportError:  # pragma: no cover - s3fs depends on botocore
        pass
    try:
        import aiohttp

        if isinstance(exc, aiohttp.ClientConnectionError | aiohttp.ServerTimeoutError):
            return True
    except ImportError:  # pragma: no cover
        pass
    return isinstance(exc, ConnectionError | TimeoutError)


@contextlib.contextmanager
def remote_errors(url: str, what: str = "object", missing: str | None = None) -> Iterator[None]:
    """Turn s3fs/botocore errors about ``url`` into segpipe errors.

    Args:
        url: The URL being accessed (named in the messages).
        what: What it is, for the messages ("image", "region store"...).
        missing: The message when it does not exist (default: "<what> <url> does not exist").

    Raises:
        MissingInputError: The bucket or the key does not exist.
        InputError: Access was denied.
        TransientError: The endpoint could not be reached (worth a retry).
    """
    try:
        yield
    except MissingInputError:
        raise
    except FileNotFoundError as exc:
        raise MissingInputError(missing or f"{what} {url} does not exist") from exc
    except PermissionError as exc:
        raise InputError(
            f"access to {what} {url} was denied: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY ({exc})"
        ) from exc
    except Exception as exc:
        if _is_transient(exc):
            raise TransientError(f"object storage unreachable for {what} {url}: {exc}") from exc
        raise


def remote_info(url: str, what: str = "object") -> dict[str, Any]:
    """s3fs metadata of ``url`` (``size``, ``ETag``, ``LastModified``, ``type``), no download.

    Raises:
        MissingInputError: Nothing is stored at ``url`` (nor under it, as a prefix).
        TransientError: The endpoint could not be reached.
    """
    with remote_errors(as_url(url), what):
        info: dict[str, Any] = filesystem().info(as_url(url))
    return info


def remote_exists(url: str) -> bool:
    """Whether an object (or a prefix) exists at ``url``; a missing bucket counts as missing.

    Raises:
        TransientError: The endpoint could not be reached.
    """
    with remote_errors(as_url(url)):
        try:
            return bool(filesystem().exists(as_url(url)))
        except FileNotFoundError:
            return False


def check_bucket(url: str) -> None:
    """Fail early, before a long computation, if the bucket of an output URL is missing.

    Raises:
        MissingInputError: The bucket does not exist (the message names ``url``).
        TransientError: The endpoint could not be reached.
    """
    bucket = S3_SCHEME + as_url(url)[len(S3_SCHEME) :].split("/", 1)[0]
    with remote_errors(url, "output", f"bucket {bucket} of {url} does not exist"):
        filesystem().info(bucket)


def upload(local: str | Path, url: str) -> str:
    """Upload one finished local file to ``url`` (replacing what is there).

    S3 publishes an object only when its upload completes (one PUT, or the completion
    of a multipart upload), so on failure ``url`` keeps its previous object, or none.

    Raises:
        MissingInputError: The bucket does not exist.
        TransientError: The endpoint could not be reached.
    """
    target = as_url(url)
    with remote_errors(target, "upload to"):
        filesystem().put_file(str(local), target)
    return target


def remove_tree(url: str) -> None:
    """Delete every object under the prefix ``url`` (best effort: used to clean up)."""
    with contextlib.suppress(Exception):
        filesystem().rm(as_url(url), recursive=True)


def _upload_dir(local: Path, url: str, last: Iterable[str], owned: Iterable[str]) -> None:
    files = sorted(p for p in local.rglob("*") if p.is_file())
    late = set(last)
    _withdraw(url, late, set(owned) - {f.relative_to(local).as_posix() for f in files})
    # Files a consumer checks for completeness (e.g. metrics.json) go up after the rest.
    for f in sorted(files, key=lambda p: (p.name in late, str(p))):
        upload(f, join(url, f.relative_to(local).as_posix()))


def _withdraw(url: str, late: set[str], stale: set[str]) -> None:
    """Remove the earlier run's completion marks, then its files that this run does not write.

    Marks first: from then until the new ones are uploaded, a reader sees no finished
    result, never the new files beside an earlier run's (a points.csv beside a full report).
    """
    fs = filesystem()
    for name in [*sorted(late), *sorted(stale - late)]:
        key = join(url, name)
        if fs.exists(key):
            fs.rm_file(key)


@contextlib.contextmanager
def staged_dir(dest: str | Path, last: Iterable[str] = (), owned: Iterable[str] = ()) -> Iterator[Path]:
    """A local folder standing for ``dest`` while the block writes into it.

    For a local ``dest`` it is ``dest`` itself (created). For a URL it is a temporary
    folder whose files are uploaded under ``dest`` once the block ends without error,
    the files named in ``last`` after all others; before that, the earlier run's ``last``
    files, then those of ``owned`` (the names such a run may write) that this run did not
    write, are removed. On error nothing is uploaded or removed. The temporary folder is
    always removed.
    """
    if not is_remote(dest):
        out = Path(dest)
        out.mkdir(parents=True, exist_ok=True)
        yield out
        return
    tmp = Path(tempfile.mkdtemp(prefix="segpipe-stage-"))
    try:
        yield tmp
        _upload_dir(tmp, as_url(dest), last, owned)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# GDAL reports the same faults as text inside its own errors (no errno).
_GDAL_TEXTS = {
    "No space left on device": errno.ENOSPC,
    "Disk quota exceeded": errno.EDQUOT,
    "Read-only file system": errno.EROFS,
    "Permission denied": errno.EACCES,
    "Is a directory": errno.EISDIR,
    "Not a directory": errno.ENOTDIR,
}


def storage_fault(exc: BaseException) -> int | None:
    """The errno of a destination fault (full disk, no permission...) behind ``exc``, else None.

    Looks at ``exc`` and its causes: an OSError's errno, or the text of a GDAL error.
    """
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, SegpipeError) and not isinstance(cur, StorageError):
            return None  # already named by whoever raised it
        code = getattr(cur, "errno", None)
        if isinstance(cur, OSError) and code in STORAGE_HINTS:
            return int(code)
        text = str(cur)
        for needle, code in _GDAL_TEXTS.items():
            if needle in text:
                return code
        cur = cur.__cause__ or cur.__context__
    return None


# Below this much free space a failed GDAL write is taken for a full disk: GDAL reports
# ENOSPC only as a log line ("_tiffWriteProc: No space left on device"), while the
# exception says "Write failed".
_NEARLY_FULL = 16 * 2**20


def _destination_fault(dest: str | Path) -> int | None:
    """Probe a local destination's filesystem after a write failed without an errno."""
    if is_remote(dest):
        return None
    folder = Path(dest)
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    if st.f_flag & os.ST_RDONLY:
        return errno.EROFS
    if st.f_bavail * st.f_frsize < _NEARLY_FULL:
        return errno.ENOSPC
    if not os.access(folder, os.W_OK):
        return errno.EACCES
    return None


@contextlib.contextmanager
def storage_errors(dest: str | Path, what: str) -> Iterator[None]:
    """Name ``dest`` in a :class:`~segpipe.errors.StorageError` when it cannot be written.

    A full disk, a read-only or forbidden destination, or a folder in the way; other
    errors pass unchanged.

    Args:
        dest: The destination being written (named in the message).
        what: What it is ("region store", "COG"...).

    Raises:
        StorageError: The destination cannot be written.
    """
    try:
        yield
    except StorageError:
        raise
    except Exception as exc:
        code = storage_fault(exc)
        if code is None and type(exc).__module__.startswith("rasterio"):
            code = _destination_fault(dest)
        if code is None:
            raise
        # One argument: OSError's (errno, text) form would print as "[Errno 28] ...".
        hint = f"{STORAGE_HINTS[code]} ({os.strerror(code)})"
        raise StorageError(f"cannot write {what} {dest}: {hint}") from exc


def posix_suffix(path: str | Path) -> str:
    """Lower-case suffix of a local path or URL."""
    return PurePosixPath(str(path)).suffix.lower()
