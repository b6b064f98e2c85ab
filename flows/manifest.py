"""Region and batch descriptions read from YAML files.

A region file holds one :class:`~flows.process_region.RegionRun`; a manifest holds
several plus a concurrency limit. Relative paths are taken relative to the file, so a
folder of inputs and its manifest can be moved together.
"""

# No `from __future__ import annotations`: Manifest is a parameter of the deployed
# process_regions flow, whose parameter model Prefect builds from evaluated annotations.
from pathlib import Path
from typing import Any, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import ErrorDetails

from flows.process_region import RegionRun
from flows.runners import TaskRunnerName
from segpipe.errors import InputError
from segpipe.stages.train.config import setting_error, shown
from segpipe.stages.train.config_file import read_mapping

__all__ = ["Manifest", "read_manifest", "read_region"]

_PATH_FIELDS = ("store", "labels", "classes", "model", "export_dir", "reference", "report_dir", "aoi")


class Manifest(BaseModel):
    """Many regions processed in one batch.

    Attributes:
        regions: The regions, each a full region description.
        concurrency: Regions processed at the same time.
        task_runner: Where every region's stages run, overriding the regions' own
            ``task_runner``: ``local`` (threads of the flow's process) or ``dask`` (a
            Dask cluster: the regions' ``scheduler``, else ``SEGPIPE_SCHEDULER``, else
            one local cluster for the batch). None: each region's own setting.
        collection: Where to write a STAC Collection of every exported layer's Item
            (``collection.json``; relative to the manifest). None: no Collection.
    """

    model_config = ConfigDict(extra="forbid")

    regions: list[RegionRun] = Field(min_length=1)
    concurrency: int = Field(default=2, ge=1)
    task_runner: TaskRunnerName | None = None
    collection: str | None = None


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
    """The file's mapping of settings, and the folder its relative paths start from."""
    return read_mapping(path), Path(path).parent.resolve()


def _submodel(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation (``list[RegionRun]``, ``str | None``: None)."""
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


def _where(loc: tuple[int | str, ...]) -> str:
    """A location as the file spells it: ``regions[0].train.epochs``."""
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")


def _explain(path: str | Path, exc: ValidationError, model: type[BaseModel]) -> InputError:
    first = exc.errors()[0]
    loc = tuple(first["loc"])
    if "train" in loc:
        return _explain_train(path, first, loc.index("train"))
    where = _where(loc)
    if first["type"] == "extra_forbidden":
        known = ", ".join(_known_fields(model, loc))
        return InputError(f"{path}: {where}: unknown setting" + (f" (known: {known})" if known else ""))
    if first["type"] == "missing":
        return InputError(f"{path}: {where}: missing (required)")
    return InputError(f"{path}: {where}: {first['msg']} (got {shown(first.get('input'))})")


def _explain_train(path: str | Path, error: ErrorDetails, at: int) -> InputError:
    """A region's training settings are refused as ``train_config`` refuses them, naming the setting.

    Args:
        path: The file.
        error: The first validation error.
        at: Where ``train`` is in the error's location.
    """
    loc = tuple(error["loc"])
    refused = setting_error({**error, "loc": loc[at + 1 :]})
    return InputError(refused.in_file(path, _where(loc[: at + 1] + ((refused.key,) if refused.key else ()))))


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
        resolved = {**data, "regions": [_resolve_region(r, base) for r in regions]}
        if isinstance(data.get("collection"), str):
            resolved["collection"] = _resolve(data["collection"], base)
        manifest = Manifest(**resolved)
    except ValidationError as exc:
        raise _explain(path, exc, Manifest) from exc
    stores = [r.store for r in manifest.regions]
    if len(set(stores)) != len(stores):
        raise InputError(f"{path}: two regions write the same store; give each region its own 'store'")
    return manifest
