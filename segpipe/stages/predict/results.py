"""A predict result in the store: its layer templates, its done markers and its publication.

Layers are tagged with the run's key (model hash and window settings): markers count
only for a rerun with the same key. The staging and the publication of a new default
result are :mod:`segpipe.io.runs`'.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from segpipe.errors import StoreBusyError, StoreError
from segpipe.io.runs import RunLock, promote
from segpipe.io.store import NODATA_U8, create_layer, has_layer, marked_cells, open_layer
from segpipe.stages.predict.outputs import DEFAULT_LAYERS, OutputLayers, legacy_progress
from segpipe.types import class_flags, classes_to_json

if TYPE_CHECKING:
    from segpipe.models import ModelSpec

__all__ = ["prepare_layers", "publish", "read_markers"]


def read_markers(
    store: str, blocks: tuple[int, int], key: dict[str, Any], probabilities: bool,
    layers: OutputLayers = DEFAULT_LAYERS,
) -> np.ndarray | None:
    """The done markers of ``layers`` made with ``key``, or None (a layer absent, or another run's).

    Args:
        store: Store location.
        blocks: The region's blocks along (y, x).
        key: The run's identity (model hash and window settings).
        probabilities: Whether the probabilities layer belongs to the result.
        layers: The result's layers.

    Returns:
        (block rows, block columns) bool markers, or None.
    """
    names = (layers.progress, *layers.data(probabilities).values())
    if not all(has_layer(store, name) for name in names):
        return None
    progress, *data = (open_layer(store, name) for name in names)
    made_with_key = all(a.attrs.get(k) == v for a in (progress, *data) for k, v in key.items())
    if progress.shape != blocks or not made_with_key:
        return None
    return marked_cells(progress)


def prepare_layers(
    store: str,
    spec: ModelSpec,
    blocks: tuple[int, int],
    key: dict[str, Any],
    force: bool,
    probabilities: bool = False,
    layers: OutputLayers = DEFAULT_LAYERS,
    model: dict[str, Any] | None = None,
) -> np.ndarray:
    """Create (or keep, to resume) a result's output and progress layers; return its done markers.

    Args:
        store: Store location.
        spec: The model package's description (its classes).
        blocks: The region's blocks along (y, x).
        key: The run's identity, recorded in every layer's attributes.
        force: Recreate the layers even when markers made with ``key`` exist.
        probabilities: Also create the probabilities layer.
        layers: Where the layers go.
        model: Which package made the result (its location, arch, encoder), recorded
            as each output layer's ``model`` attribute for the reports that evaluate it;
            not part of ``key``, so a package moved elsewhere still resumes.

    Returns:
        The done markers (all False for new layers).
    """
    if not force:
        markers = read_markers(store, blocks, key, probabilities, layers)
        if markers is not None:
            return markers
    # Progress is cleared before outputs are replaced, so a crash in between never
    # leaves "done" markers over empty outputs.
    group = zarr.open_group(store, mode="r+")
    if legacy_progress(layers) in group:  # an older segpipe's markers, for the result now replaced
        del group[legacy_progress(layers)]
    group.create_array(
        layers.progress, shape=blocks, dtype="uint8", chunks=(1, 1), fill_value=0,
        dimension_names=["block_y", "block_x"], attributes=key, overwrite=True,
    )
    classes_json = classes_to_json(spec.classes)
    made = {**key, "model": model} if model is not None else key
    classes_attrs = {**made, "long_name": "class", "classes": classes_json, **class_flags(spec.classes)}
    create_layer(store, layers.classes, "uint8", NODATA_U8, attributes=classes_attrs, overwrite=True)
    conf_attrs = {**made, "long_name": "confidence", "units": "percent"}
    create_layer(store, layers.confidence, "uint8", NODATA_U8, attributes=conf_attrs, overwrite=True)
    if probabilities:
        prob_attrs = {**made, "long_name": "class probability", "units": "percent", "classes": classes_json}
        create_layer(store, layers.probabilities, "uint8", NODATA_U8,
                     leading=(("class", len(spec.classes)),), attributes=prob_attrs, overwrite=True)
    return np.zeros(blocks, dtype=bool)


def publish(
    store: str, blocks: tuple[int, int], key: dict[str, Any], probabilities: bool, lock: RunLock
) -> None:
    """Publish the staged default result once every block is marked (re-read from the store, not counted).

    Raises:
        StoreError: Staged blocks are unfinished (the earlier result is kept).
        StoreBusyError: The lock was taken over by another run while this one ran.
    """
    markers = read_markers(store, blocks, key, probabilities, DEFAULT_LAYERS.staged())
    if markers is None or not markers.all():
        missing = "no layers" if markers is None else f"{int((~markers).sum())} unfinished blocks"
        raise StoreError(f"the new predictions of {store} have {missing}; the earlier result is kept: "
                         "rerun predict to finish them")
    if not lock.still_held():
        raise StoreBusyError(
            f"the lock of {store} was taken over by another run while this one ran (its heartbeat "
            "stopped for too long); this run's result is not published: rerun predict when the other ends"
        )
    promote(store, key)
