"""Prediction runs in a region store: staging layers, their promotion, and the run lock.

A new predict run never writes over the store's published layers (``classes``,
``confidence``, ``probabilities``, and the markers ``_progress/predict``: bookkeeping in a
subgroup, so xarray does not list it as a data variable). It writes the same layers
in the hidden ``_predict`` subgroup (xarray ignores subgroups), and only when every
block is marked finished are they promoted to the root names. On a local store the
arrays' folders are renamed (the old one moved aside into ``_predict/replaced`` first,
deleted after); on object storage the objects are copied, each array's ``zarr.json``
last. The staging markers move last, so while it is still in staging and
complete, a promotion is known to be under way: :func:`finish_promotion` rolls it
forward after a crash. At every moment the store holds the old complete result or the
new complete one (during a promotion's two renames of one layer, the next run repairs).

The run lock is a group ``_predict/lock`` whose attributes say who holds the store
(run id, host, pid, model hash, start time) and a heartbeat refreshed by a thread.
Locally it is created by ``mkdir`` (atomic: one of two runs wins); on object storage,
by writing it and reading it back (a race of a few milliseconds remains there). A lock
whose heartbeat is older than :data:`STALE_SECONDS`, or whose process is gone on this
host, is stale and taken over.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segpipe.errors import StoreBusyError, StoreError
from segpipe.io.remote import filesystem, is_remote, join
from segpipe.io.store import store_location

__all__ = [
    "DATA_LAYERS",
    "HEARTBEAT_SECONDS",
    "LEGACY_PROGRESS",
    "PROGRESS_LAYER",
    "STAGING",
    "STALE_SECONDS",
    "RunLock",
    "acquire_lock",
    "finish_promotion",
    "has_staged_progress",
    "promote",
    "read_lock",
    "staged",
]

log = logging.getLogger(__name__)

STAGING = "_predict"
PROGRESS_LAYER = "_progress/predict"
# Where stores of segpipe before 0.2 kept the markers, at the root (a data variable to xarray).
LEGACY_PROGRESS = "progress_predict"
DATA_LAYERS = ("classes", "confidence", "probabilities")
_REPLACED = f"{STAGING}/replaced"
_LOCK = f"{STAGING}/lock"
HEARTBEAT_SECONDS = 15.0
STALE_SECONDS = 120.0
_GROUP_JSON = {"zarr_format": 3, "node_type": "group"}


def staged(name: str) -> str:
    """The staging path of a layer (``classes`` -> ``_predict/classes``)."""
    return f"{STAGING}/{name}"


def _local(store: str) -> Path | None:
    loc = store_location(store)
    return None if is_remote(loc) else Path(loc)


def _read_json(store: str, key: str) -> dict[str, Any] | None:
    """A JSON object of the store (``key`` relative to its root), or None if absent or unreadable."""
    try:
        local = _local(store)
        if local is not None:
            text = (local / key).read_text()
        else:
            with filesystem().open(join(store_location(store), key), "r") as f:
                text = str(f.read())
        data = json.loads(text)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_json(store: str, key: str, data: dict[str, Any]) -> None:
    text = json.dumps(data, indent=2)
    local = _local(store)
    if local is None:
        filesystem().pipe(join(store_location(store), key), text.encode())  # whole or not at all
        return
    path = local / key
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(text)
    os.replace(tmp, path)  # readers see the old record or the new one


def _exists(store: str, key: str) -> bool:
    local = _local(store)
    if local is not None:
        return (local / key).exists()
    return bool(filesystem().exists(join(store_location(store), key)))


def _remove(store: str, key: str) -> None:
    local = _local(store)
    if local is not None:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(local / key)
        return
    fs = filesystem()
    url = join(store_location(store), key)
    if fs.exists(url):
        fs.rm(url, recursive=True)


# --- the lock --------------------------------------------------------------------------


def read_lock(store: str | Path) -> dict[str, Any] | None:
    """The lock record of the run holding ``store``, or None."""
    data = _read_json(str(store), f"{_LOCK}/zarr.json")
    record = (data or {}).get("attributes", {}).get("segpipe_lock")
    return record if isinstance(record, dict) else None


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (another user's counts as running).

    A killed process that its parent has not reaped yet (a zombie) is dead: ``kill -9``
    under ``timeout`` leaves one until init reaps it, and its leftovers are garbage now.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    """Whether ``pid`` has ended but is not reaped (Linux's /proc; False where there is none)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # "pid (command) state ...": the command may hold spaces and parentheses.
    return stat[stat.rfind(")") + 1 :].split()[:1] == ["Z"]


def _stale(record: dict[str, Any] | None, created: float | None) -> bool:
    """Whether a lock no longer guards a live run (no fresh heartbeat, or a dead pid here)."""
    if record is None:  # being created by its owner, or a cut record
        return created is None or time.time() - created > STALE_SECONDS
    if time.time() - float(record.get("heartbeat", 0)) > STALE_SECONDS:
        return True
    return record.get("host") == socket.gethostname() and not pid_alive(int(record.get("pid", 0)))


def _lock_created(store: str) -> float | None:
    local = _local(store)
    if local is None:
        return None
    try:
        return (local / _LOCK).stat().st_mtime
    except FileNotFoundError:
        return None


def _busy_message(store: str, record: dict[str, Any] | None) -> str:
    if record is None:
        return (f"region store {store} is being locked by another predict run right now; retry in a moment, "
                f"or remove {store}/{_LOCK} if no run is active")
    age = time.time() - float(record.get("heartbeat", 0))
    return (
        f"region store {store} is busy: predict run {record.get('run_id')} on host {record.get('host')} "
        f"(pid {record.get('pid')}) with model {record.get('model_hash')} started at {record.get('started')} "
        f"and was alive {age:.0f} s ago; wait for it to finish. If that run is dead, remove {store}/{_LOCK} "
        f"(a lock is taken over by itself once its heartbeat is {STALE_SECONDS:.0f} s old, or at once when "
        "its process is gone on the same host)"
    )


@dataclass
class RunLock:
    """The lock of one predict run on one store, with its heartbeat thread.

    Attributes:
        store: Store location.
        record: What the lock says (run id, host, pid, model hash, start, heartbeat).
    """

    store: str
    record: dict[str, Any]
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def _write(self) -> None:
        self.record["heartbeat"] = time.time()
        node = {**_GROUP_JSON, "attributes": {"segpipe_lock": self.record}}
        _write_json(self.store, f"{_LOCK}/zarr.json", node)

    def _beat(self, interval: float) -> None:
        while not self._stop.wait(interval):
            held = read_lock(self.store)
            if held is not None and held.get("run_id") != self.record["run_id"]:
                log.error("the lock of %s was taken over by run %s", self.store, held.get("run_id"))
                return
            try:
                self._write()
            except OSError as exc:  # a storage hiccup: the next beat tries again
                log.warning("could not refresh the lock of %s: %s", self.store, exc)

    def start(self, interval: float = HEARTBEAT_SECONDS) -> RunLock:
        """Start refreshing the heartbeat every ``interval`` seconds, from a daemon thread."""
        self._thread = threading.Thread(target=self._beat, args=(interval,), name="segpipe-lock", daemon=True)
        self._thread.start()
        return self

    def still_held(self) -> bool:
        """Whether the store's lock is still this run's (not taken over as stale)."""
        held = read_lock(self.store)
        return held is not None and held.get("run_id") == self.record["run_id"]

    def release(self) -> None:
        """Stop the heartbeat and remove the lock (only if it is still this run's)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.still_held():
            _remove(self.store, _LOCK)

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _ensure_group(store: str, key: str) -> None:
    if not _exists(store, f"{key}/zarr.json"):
        local = _local(store)
        if local is not None:
            (local / key).mkdir(parents=True, exist_ok=True)
        _write_json(store, f"{key}/zarr.json", {**_GROUP_JSON, "attributes": {}})


def _take(store: str) -> bool:
    """Create the lock folder; False when another run's lock is there."""
    local = _local(store)
    if local is None:
        return not _exists(store, f"{_LOCK}/zarr.json")
    try:
        (local / _LOCK).mkdir()
    except FileExistsError:
        return False
    return True


def _clear_stale(store: str) -> None:
    """Move a stale lock out of the way so that exactly one taker can then create a new one."""
    local = _local(store)
    if local is None:
        _remove(store, _LOCK)
        return
    aside = local / STAGING / f".stale-lock-{uuid.uuid4().hex[:8]}"
    with contextlib.suppress(FileNotFoundError):
        (local / _LOCK).rename(aside)  # atomic: of two takers, one moves it
        shutil.rmtree(aside, ignore_errors=True)


def acquire_lock(store: str | Path, model_hash: str) -> RunLock:
    """Take the store for one predict run, or refuse if another live run holds it.

    Returns:
        The lock, its heartbeat thread started; release it (or use it as a context
        manager) when the run ends.

    Raises:
        StoreBusyError: Another run's lock is live (the message names its host, pid,
            model and start, and how to clear a stale lock).
    """
    s = store_location(store)
    _ensure_group(s, STAGING)
    now = dt.datetime.now(dt.UTC)
    record = {
        "run_id": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
        "model_hash": model_hash, "started": now.isoformat(timespec="seconds"), "heartbeat": time.time(),
    }
    for _ in range(3):
        if _take(s):
            lock = RunLock(s, record)
            lock._write()
            if lock.still_held():  # on object storage, the last of two writers wins: check
                return lock.start()
        other = read_lock(s)
        if not _stale(other, _lock_created(s)):
            raise StoreBusyError(_busy_message(s, other))
        log.warning("taking over the stale lock of %s (%s)", s, other)
        _clear_stale(s)
    raise StoreBusyError(_busy_message(s, read_lock(s)))


# --- promotion -------------------------------------------------------------------------


def _attrs(store: str, key: str) -> dict[str, Any] | None:
    data = _read_json(store, f"{key}/zarr.json")
    return None if data is None else dict(data.get("attributes") or {})


def _copy_remote(store: str, src: str, dst: str) -> None:
    """Replace array ``dst`` by a copy of ``src`` on object storage, its ``zarr.json`` last."""
    fs = filesystem()
    root = store_location(store)
    _remove(store, dst)  # stale chunks of the old array must not survive under the new metadata
    src_url = join(root, src)
    objects = sorted(fs.find(src_url), key=lambda p: p.endswith("/zarr.json"))
    for obj in objects:
        rel = obj[len(src_url.split("://", 1)[-1]):].lstrip("/")
        fs.copy(obj, join(root, f"{dst}/{rel}"))
    _remove(store, src)


def _swap_in(store: str, name: str) -> None:
    """Publish the staging array ``name``: the old one moved aside, then the new one moved in."""
    local = _local(store)
    if local is None:
        _ensure_parents(store, name)
        _copy_remote(store, staged(name), name)
        return
    src, dst = local / staged(name), local / name
    _ensure_parents(store, name)
    if dst.exists():
        _ensure_parents(store, f"{_REPLACED}/{name}")
        aside = local / _REPLACED / name
        if aside.exists():
            shutil.rmtree(aside)
        dst.rename(aside)
    src.rename(dst)


def _ensure_parents(store: str, name: str) -> None:
    """The groups above array ``name`` (``_progress`` for ``_progress/predict``)."""
    parts = name.split("/")[:-1]
    for i in range(1, len(parts) + 1):
        _ensure_group(store, "/".join(parts[:i]))


def _set_aside(store: str, name: str) -> None:
    """Retire a published layer the new result does not have (e.g. an old ``probabilities``)."""
    local = _local(store)
    if local is None:
        _remove(store, name)
        return
    _ensure_group(store, _REPLACED)
    aside = local / _REPLACED / name
    if aside.exists():
        shutil.rmtree(aside)
    (local / name).rename(aside)


def promote(store: str | Path, key: dict[str, Any]) -> None:
    """Publish a complete staging result under the root names; progress moves last.

    Idempotent, so a promotion cut short by a crash is finished by calling it again
    (see :func:`finish_promotion`).

    Args:
        store: Store location.
        key: The run's identity (model hash and settings) recorded in its layers'
            attributes; a published layer without a staging twin and with another key
            belongs to an older result and is retired.
    """
    s = store_location(store)

    def made_by_run(attrs: dict[str, Any] | None) -> bool:
        return attrs is not None and all(attrs.get(k) == v for k, v in key.items())

    for name in DATA_LAYERS:
        if made_by_run(_attrs(s, staged(name))):
            _swap_in(s, name)
            continue
        # A staged layer of another, abandoned run (an old ``probabilities``) is dropped.
        _remove(s, staged(name))
        if _exists(s, f"{name}/zarr.json") and not made_by_run(_attrs(s, name)):
            _set_aside(s, name)
    if _exists(s, f"{staged(PROGRESS_LAYER)}/zarr.json"):
        _swap_in(s, PROGRESS_LAYER)
    _remove(s, LEGACY_PROGRESS)  # an older segpipe's markers, of the result just replaced
    _remove(s, _REPLACED)
    log.info("published the new predictions of %s", s)


def has_staged_progress(store: str | Path) -> bool:
    """Whether the store holds staged markers (an unfinished run, or an unfinished publication)."""
    return _exists(store_location(store), f"{staged(PROGRESS_LAYER)}/zarr.json")


def finish_promotion(store: str | Path) -> bool:
    """Finish a promotion a crash cut short (or one never begun after the last block).

    Complete staging markers mean every staged block is finished:
    the staged result is the newest complete one, so it is published. Call it while
    holding the store's lock.

    Returns:
        Whether a staged result was published.
    """
    from segpipe.io.store import marked_cells, open_layer

    s = store_location(store)
    if _exists(s, _REPLACED) and not _exists(s, f"{staged(PROGRESS_LAYER)}/zarr.json"):
        _remove(s, _REPLACED)  # the crash came after the last move: only the cleanup was left
    try:
        progress = open_layer(s, staged(PROGRESS_LAYER))
        complete = bool(marked_cells(progress).all())
        key = dict(progress.attrs)
    except (StoreError, OSError, ValueError):
        return False
    if not complete:
        return False
    log.warning("%s holds a complete result that was not yet published (an interrupted promotion): "
                "publishing it", s)
    promote(s, key)
    return True
