"""Region and batch descriptions read from YAML files.

A region file holds one :class:`~flows.process_region.RegionRun`; a manifest holds
several plus a concurrency limit. Relative paths are taken relative to the file, so a
folder of inputs and its manifest can be moved together.
"""

# No `from __future__ import annotations`: Manifest is a parameter of the deployed
# process_regions flow, whose parameter model Prefect builds from evaluated annotations.
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from flows.process_region import RegionRun
from flows.runners import TaskRunnerName
from segpipe.errors import InputError, MissingInputError

__all__ = ["Manifest", "read_manifest", "read_region"]

_PATH_FIELDS = ("store", "labels", "classes", "model", "export_dir", "reference", "report_dir")


class Manifest(BaseModel):
    """Many regions processed in one batch.

    Attributes:
        regions: The regions, each a full region description.
        concurrency: Regions processed at the same time.
        task_runner: Where every region's stages run, overriding the regions' own
            ``task_runner``: ``local`` (threads of the flow's process) or ``dask`` (a
            Dask cluster: the regions' ``scheduler``, else ``SEGPIPE_SCHEDULER``, else
            one local cluster for the batch). None: each region's own setting.
    """

    model_config = ConfigDict(extra="forbid")

    regions: list[RegionRun] = Field(min_length=1)
    concurrency: int = Field(default=2, ge=1)
    task_runner: TaskRunnerName | None = None


def _resolve(value: str, base: Path) -> str:
    if "://" in value or Path(value).is_absolute():
        return value
    return str((base / value).resolve())


def _resolve_region(data: dict[str, Any], base: Path) -> dict[str, Any]:
    out = dict(data)
    if isinstance(out.get("images"), list):
        out["images"] = [_resolve(str(p), base) for p in out["images"]]
    for key in _PATH_FIELDS:
        if isinstance(out.get(key), str):
            out[key] = _resolve(out[key], base)
    return out


def _load(path: str | Path) -> tuple[dict[str, Any], Path]:
    p = Path(path)
    if not p.is_file():
        raise MissingInputError(f"{p} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise InputError(f"{p} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise InputError(f"{p} must hold a mapping of settings, not {type(data).__name__}")
    return data, p.parent.resolve()


def _explain(path: str | Path, exc: ValidationError) -> InputError:
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    return InputError(f"{path}: {where}: {first['msg']}")


def read_region(path: str | Path) -> RegionRun:
    """Read one region description.

    Raises:
        MissingInputError: The file does not exist.
        InputError: Invalid YAML or settings (the message names the setting).
    """
    data, base = _load(path)
    try:
        return RegionRun(**_resolve_region(data, base))
    except ValidationError as exc:
        raise _explain(path, exc) from exc


def read_manifest(path: str | Path) -> Manifest:
    """Read a batch manifest: ``regions`` (a list of region descriptions) and ``concurrency``.

    Raises:
        MissingInputError: The file does not exist.
        InputError: Invalid YAML or settings, or two regions writing the same store.
    """
    data, base = _load(path)
    regions = data.get("regions")
    if not isinstance(regions, list):
        raise InputError(f"{path}: 'regions' must be a list of region descriptions")
    try:
        manifest = Manifest(**{**data, "regions": [_resolve_region(r, base) for r in regions]})
    except ValidationError as exc:
        raise _explain(path, exc) from exc
    stores = [r.store for r in manifest.regions]
    if len(set(stores)) != len(stores):
        raise InputError(f"{path}: two regions write the same store; give each region its own 'store'")
    return manifest
