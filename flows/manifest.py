"""Region and batch descriptions read from YAML files.

A region file holds one :class:`~flows.process_region.RegionRun`; a manifest holds
several plus a concurrency limit. Relative paths are taken relative to the file, so a
folder of inputs and its manifest can be moved together.
"""

# No `from __future__ import annotations`: Manifest is a parameter of the deployed
# process_regions flow, whose parameter model Prefect builds from evaluated annotations.
from pathlib import Path
from typing import Any, get_args

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
    if p.is_dir():
        raise InputError(f"{p} is a folder: name a YAML file")
    if not p.is_file():
        raise MissingInputError(f"{p} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except UnicodeDecodeError:
        raise InputError(f"{p} is not a text file: expected YAML") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise InputError(f"{p} is not valid YAML{where}: {' '.join(str(problem).split())}") from exc
    if data is None:
        raise InputError(f"{p} is empty: it must hold a mapping of settings")
    if not isinstance(data, dict):
        raise InputError(f"{p} must hold a mapping of settings (name: value), not a {type(data).__name__}")
    return data, p.parent.resolve()


def _submodel(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation (``list[RegionRun]``, ``TrainConfig | None``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _submodel(arg)
        if found is not None:
            return found
    return None


def _known_fields(model: type[BaseModel], loc: tuple[int | str, ...]) -> list[str]:
    """The settings the model at ``loc``'s parent accepts, to list beside an unknown one."""
    for part in loc[:-1]:
        if isinstance(part, int):  # an index into a list of the same model
            continue
        field = model.model_fields.get(part)
        sub = _submodel(field.annotation) if field is not None else None
        if sub is None:
            return []
        model = sub
    return list(model.model_fields)


def _explain(path: str | Path, exc: ValidationError, model: type[BaseModel]) -> InputError:
    first = exc.errors()[0]
    loc = tuple(first["loc"])
    where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")
    if first["type"] == "extra_forbidden":
        known = ", ".join(_known_fields(model, loc))
        return InputError(f"{path}: {where}: unknown setting" + (f" (known: {known})" if known else ""))
    got = repr(first.get("input"))
    got = got if len(got) <= 60 else got[:57] + "..."
    if first["type"] == "missing":
        return InputError(f"{path}: {where}: missing (required)")
    return InputError(f"{path}: {where}: {first['msg']} (got {got})")


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
        raise _explain(path, exc, RegionRun) from exc


def read_manifest(path: str | Path) -> Manifest:
    """Read a batch manifest: ``regions`` (a list of region descriptions) and ``concurrency``.

    Raises:
        MissingInputError: The file does not exist.
        InputError: Invalid YAML or settings, or two regions writing the same store.
    """
    data, base = _load(path)
    regions = data.get("regions")
    if not isinstance(regions, list):
        raise InputError(
            f"{path}: regions: must be a list of region descriptions, not "
            + ("missing" if regions is None else f"a {type(regions).__name__}")
        )
    for i, region in enumerate(regions):
        if not isinstance(region, dict):
            raise InputError(
                f"{path}: regions[{i}]: must be a mapping of region settings (images, store, model, ...), "
                f"not a {type(region).__name__} ({str(region)[:40]!r})"
            )
    try:
        manifest = Manifest(**{**data, "regions": [_resolve_region(r, base) for r in regions]})
    except ValidationError as exc:
        raise _explain(path, exc, Manifest) from exc
    stores = [r.store for r in manifest.regions]
    if len(set(stores)) != len(stores):
        raise InputError(f"{path}: two regions write the same store; give each region its own 'store'")
    return manifest
