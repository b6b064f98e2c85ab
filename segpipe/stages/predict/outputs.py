"""The layers a predict run writes: their names, for the default output and for a named one.

Plain ``segpipe predict`` writes ``classes``, ``confidence``, optionally ``probabilities``
and its markers ``_progress/predict`` (in a subgroup: bookkeeping, not a data variable). A
run given another output name, ``classes_<name>``, writes ``classes_<name>``,
``confidence_<name>``, ``probabilities_<name>`` and ``_progress/predict_<name>`` beside
them (the random-forest baseline's ``classes_rf``), so the network's layers stay untouched.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from segpipe.errors import InputError
from segpipe.io.runs import LEGACY_PROGRESS, PROGRESS_LAYER, staged

__all__ = ["DEFAULT_LAYERS", "DEFAULT_OUTPUT", "OutputLayers", "legacy_progress", "output_layers"]

DEFAULT_OUTPUT = "classes"
_NAMED = re.compile(rf"{DEFAULT_OUTPUT}_([A-Za-z0-9][A-Za-z0-9_]*)")


class OutputLayers(NamedTuple):
    """Paths of one predict result's layers in the store (a tuple: small, hashable, tokenizable).

    Attributes:
        classes: Class values (uint8, 255 = nodata).
        confidence: Winning probability in percent.
        probabilities: Per-class probabilities in percent (written only when asked for).
        progress: Per-block markers of finished blocks.
    """

    classes: str = DEFAULT_OUTPUT
    confidence: str = "confidence"
    probabilities: str = "probabilities"
    progress: str = PROGRESS_LAYER

    @property
    def publishable(self) -> bool:
        """Whether these are the default layers, the ones :mod:`segpipe.io.runs` stages and publishes."""
        return self == DEFAULT_LAYERS

    def staged(self) -> OutputLayers:
        """The same layers in the store's hidden staging group (``classes`` -> ``_predict/classes``)."""
        return OutputLayers(*(staged(name) for name in self))

    def data(self, probabilities: bool) -> dict[str, str]:
        """Layer path of each output of :func:`segpipe.stages.predict.pixels.encode_probabilities`."""
        names = {"classes": self.classes, "confidence": self.confidence}
        return {**names, "probabilities": self.probabilities} if probabilities else names


DEFAULT_LAYERS = OutputLayers()
"""The layers of plain ``segpipe predict``."""


def output_layers(output: str = DEFAULT_OUTPUT) -> OutputLayers:
    """The layers of the output named ``output``: ``classes``, or ``classes_<name>`` for a result beside it.

    Args:
        output: Name of the classes layer.

    Returns:
        The default layers for ``classes``; for ``classes_<name>`` the same layers
        with the suffix ``_<name>``.

    Raises:
        InputError: ``output`` is neither ``classes`` nor ``classes_`` followed by
            letters, digits and underscores (anything else could name an input layer).
    """
    if output == DEFAULT_OUTPUT:
        return DEFAULT_LAYERS
    match = _NAMED.fullmatch(output)
    if match is None:
        raise InputError(
            f"output layer {output!r} must be '{DEFAULT_OUTPUT}' or '{DEFAULT_OUTPUT}_<name>' "
            "(letters, digits and underscores), e.g. 'classes_rf'"
        )
    suffix = f"_{match.group(1)}"
    return OutputLayers(output, f"confidence{suffix}", f"probabilities{suffix}", f"{PROGRESS_LAYER}{suffix}")


def legacy_progress(layers: OutputLayers) -> str:
    """Where an older segpipe kept these layers' markers (``progress_predict[_<name>]``, at the root)."""
    return layers.progress.replace(PROGRESS_LAYER, LEGACY_PROGRESS, 1)
