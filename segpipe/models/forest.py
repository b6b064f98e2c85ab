"""A fitted random forest as a torch module, so it predicts through the network path.

The classical per-pixel baseline is packaged like any network: its trees become
buffers in ``weights.safetensors`` (no pickle) and its shapes go into
``ModelSpec.options``, so :func:`segpipe.models.load_model` rebuilds it with
:func:`segpipe.models.build_network` and prediction blends its probabilities exactly
as it blends a network's.

Every tree is stored as arrays over its nodes, padded to a common node count:

- ``feature`` (trees, nodes): feature tested at the node (0 at leaves);
- ``threshold`` (trees, nodes): go left when ``band value <= threshold``;
- ``child`` (trees, nodes, 2): left and right child; a leaf points to itself, so a
  fixed number of descent steps (the deepest tree's depth) lands every pixel on a leaf;
- ``value`` (trees, nodes, classes): class distribution of the training pixels at the
  node (used at leaves).

The trees' features are the band values and, with a ``context`` window K > 1, each
band's mean and standard deviation over the K x K pixels around the pixel
(:func:`context_features`): the texture that separates, say, suburbs under trees from
forest, which one pixel's spectrum cannot. Training computes them with the same
function on the store block plus a halo, so the trees see the values prediction gives.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from segpipe.errors import ArchitectureError, InputError
from segpipe.models.catalog import (
    FOREST_ARCH,
    FOREST_OPTIONS,
    default_overlap,
    feature_names,
    features_per_band,
)

__all__ = [
    "FOREST_ARCH",
    "FOREST_OPTIONS",
    "ForestNet",
    "context_features",
    "default_overlap",
    "feature_names",
    "features_per_band",
    "forest_from_options",
    "from_sklearn",
]

# Log of a zero probability would be -inf, which softmax turns into NaN when a whole
# row is -inf; exp(log(1e-30)) is 1e-30, far below any rounding that matters.
_TINY = 1e-30
# Pixels descended at once: calls this large amortise torch's per-op overhead (smaller
# ones were measured slower), and a chunk's working tensors stay at a few MiB.
_CHUNK = 1 << 16


def context_features(x: torch.Tensor, context: int) -> torch.Tensor:
    """Per-pixel features of (N, bands, H, W) normalised input: (N, bands * k, H, W).

    With ``context`` K > 1 the band values are followed by every band's mean, then its
    standard deviation, over the K x K window centred on the pixel. At the input's
    edges the window is cut to the pixels inside it (not padded), so a pixel on the
    raster's edge gets the same features in training (store block plus halo, clipped
    to the raster) as in prediction.

    Raises:
        InputError: ``context`` is not a positive odd number.
    """
    if context < 1 or context % 2 == 0:
        raise InputError(f"the forest's context window must be a positive odd pixel count, got {context}")
    if context == 1:
        return x
    x = x.float()
    pool = {"kernel_size": context, "stride": 1, "padding": context // 2, "count_include_pad": False}
    mean = nn.functional.avg_pool2d(x, **pool)  # type: ignore[arg-type]
    square = nn.functional.avg_pool2d(x * x, **pool)  # type: ignore[arg-type]
    # E[x^2] - E[x]^2 can come out a hair below 0 in float32 on flat windows.
    std = (square - mean * mean).clamp_min(0).sqrt()
    return torch.cat([x, mean, std], dim=1)


class ForestNet(nn.Module):
    """A random forest classifying every pixel of (N, bands, H, W) input.

    Args:
        n_bands: Input bands.
        n_classes: Output classes.
        n_trees: Number of trees.
        max_nodes: Node count of the largest tree (every tree is padded to it).
        depth: Depth of the deepest tree (descent steps).
        context: Window edge K of the neighbourhood features (1 = band values only).

    The forward pass returns log-probabilities (N, n_classes, H, W): the log of the mean
    of the trees' leaf class distributions, so ``softmax`` of the output gives back the
    forest's probabilities (``predict_proba`` of scikit-learn).
    """

    feature: torch.Tensor
    threshold: torch.Tensor
    child: torch.Tensor
    value: torch.Tensor

    def __init__(
        self, n_bands: int, n_classes: int, n_trees: int, max_nodes: int, depth: int, context: int = 1
    ) -> None:
        super().__init__()
        if min(n_bands, n_classes, n_trees, max_nodes) < 1 or depth < 0 or context < 1 or context % 2 == 0:
            raise ArchitectureError(
                f"a random forest needs at least one band, class, tree and node, a depth >= 0 and an odd "
                f"context window; got {n_bands} bands, {n_classes} classes, {n_trees} trees, {max_nodes} "
                f"nodes, depth {depth}, context {context}"
            )
        self.n_bands = n_bands
        self.context = context
        self.n_features = n_bands * features_per_band(context)
        self.n_classes = n_classes
        self.depth = depth
        self.register_buffer("feature", torch.zeros(n_trees, max_nodes, dtype=torch.int32))
        self.register_buffer("threshold", torch.zeros(n_trees, max_nodes, dtype=torch.float32))
        # Every node a leaf pointing to itself: an unfitted forest is well-defined.
        self_index = torch.arange(max_nodes, dtype=torch.int32).expand(n_trees, max_nodes)
        self.register_buffer("child", torch.stack([self_index, self_index], dim=-1).contiguous())
        self.register_buffer("value", torch.full((n_trees, max_nodes, n_classes), 1.0 / n_classes))

    @property
    def n_trees(self) -> int:
        """Number of trees."""
        return int(self.feature.shape[0])

    @property
    def max_nodes(self) -> int:
        """Node count every tree is padded to."""
        return int(self.feature.shape[1])

    def options(self) -> dict[str, int]:
        """The shapes :func:`forest_from_options` needs to rebuild this module (``ModelSpec.options``)."""
        return {
            "n_trees": self.n_trees,
            "max_nodes": self.max_nodes,
            "depth": self.depth,
            "context": self.context,
        }

    def probabilities(self, pixels: torch.Tensor) -> torch.Tensor:
        """Class probabilities of (P, features) pixel features: (P, classes) float32."""
        if pixels.ndim != 2 or pixels.shape[1] != self.n_features:
            raise InputError(
                f"the forest expects (pixels, {self.n_features}) features, got shape {tuple(pixels.shape)}"
            )
        pixels = pixels.float()
        out = torch.empty(pixels.shape[0], self.n_classes, device=pixels.device)
        chunk = max(1, min(_CHUNK, (2**31 - 1) // self.n_features))
        for start in range(0, pixels.shape[0], chunk):
            out[start : start + chunk] = self._chunk_probabilities(pixels[start : start + chunk])
        return out

    def log_probabilities(self, pixels: torch.Tensor) -> torch.Tensor:
        """Log of :meth:`probabilities` (what :meth:`forward` returns per pixel)."""
        return self.probabilities(pixels).clamp_min(_TINY).log()

    def _chunk_probabilities(self, x: torch.Tensor) -> torch.Tensor:
        # One tree at a time over all pixels: a tree's tables stay in cache, and int32
        # indices through index_select halve the memory traffic of int64 gathers
        # (measured 2-3x faster on CPU than descending all trees at once).
        n = x.shape[0]
        flat = x.contiguous().reshape(-1)
        base = torch.arange(n, dtype=torch.int32, device=x.device) * self.n_features
        total = torch.zeros(n, self.n_classes, device=x.device)
        for tree in range(self.n_trees):
            feature, threshold = self.feature[tree], self.threshold[tree]
            child = self.child[tree].reshape(-1)  # (left, right) pairs: 2 * node + went right
            node = torch.zeros(n, dtype=torch.int32, device=x.device)
            for step in range(self.depth):
                v = flat.index_select(0, base + feature.index_select(0, node))
                nxt = child.index_select(0, node * 2 + (v > threshold.index_select(0, node)))
                # Most trees are shallower than the deepest, and most paths end well
                # above their tree's deepest leaf: stop once every pixel sits on a leaf.
                if step % 4 == 3 and torch.equal(nxt, node):
                    break
                node = nxt
            total += self.value[tree].index_select(0, node)
        return total / self.n_trees

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Log-probabilities (N, classes, H, W) of (N, bands, H, W) normalised band values."""
        if x.ndim != 4 or x.shape[1] != self.n_bands:
            raise InputError(
                f"the forest expects (N, {self.n_bands}, H, W) input, got shape {tuple(x.shape)}"
            )
        n, _, h, w = x.shape
        pixels = context_features(x, self.context).permute(0, 2, 3, 1).reshape(-1, self.n_features)
        logp = self.log_probabilities(pixels)
        return logp.reshape(n, h, w, self.n_classes).permute(0, 3, 1, 2).contiguous()


def forest_from_options(n_bands: int, n_classes: int, options: Mapping[str, Any] | None) -> ForestNet:
    """An empty :class:`ForestNet` of the shapes in ``options`` (as saved in ``ModelSpec.options``).

    Raises:
        ArchitectureError: ``options`` lacks the tree shapes.
    """
    opts = dict(options or {})
    missing = [k for k in FOREST_OPTIONS if k not in opts]
    if missing:
        raise ArchitectureError(
            f"a {FOREST_ARCH} model needs {', '.join(missing)} in its options: retrain it with "
            f"segpipe train --arch {FOREST_ARCH}"
        )
    return ForestNet(
        n_bands,
        n_classes,
        int(opts["n_trees"]),
        int(opts["max_nodes"]),
        int(opts["depth"]),
        int(opts.get("context", 1)),
    )


def _threshold_f32(threshold: np.ndarray) -> np.ndarray:
    """Largest float32 at or below each threshold.

    scikit-learn compares float32 inputs with float64 thresholds (midpoints between two
    float32 training values). For a float32 ``x``, ``x <= t`` holds exactly when
    ``x <= t32`` with ``t32`` rounded down, so the trees keep their splits bit for bit.
    """
    t32 = threshold.astype(np.float32)
    up = t32.astype(np.float64) > threshold
    t32[up] = np.nextafter(t32[up], np.float32(-np.inf))
    return t32


def from_sklearn(forest: Any, n_classes: int, context: int = 1) -> ForestNet:
    """Convert a fitted scikit-learn ``RandomForestClassifier`` (or ``ExtraTreesClassifier``).

    Args:
        forest: The fitted single-output classifier; its ``classes_`` must be class
            indices 0 .. n_classes - 1 (a class missing from the training pixels simply
            gets probability 0).
        n_classes: Output classes of the module.
        context: Window the forest's features were computed with
            (:func:`context_features`); its feature count must fit it.

    Returns:
        The forest as an eval-mode :class:`ForestNet`.

    Raises:
        InputError: Not fitted, multi-output, or class labels outside 0 .. n_classes - 1.
    """
    estimators = getattr(forest, "estimators_", None)
    if not estimators:
        raise InputError("the random forest is not fitted: call fit() before converting it")
    if getattr(forest, "n_outputs_", 1) != 1:
        raise InputError("only single-output random forests can be converted")
    labels = np.asarray(forest.classes_)
    columns = labels.astype(np.int64)
    if not np.array_equal(columns, labels) or columns.min() < 0 or columns.max() >= n_classes:
        raise InputError(f"forest classes {labels.tolist()} are not class indices 0..{n_classes - 1}")
    n_features, per_band = int(forest.n_features_in_), features_per_band(context)
    if n_features % per_band:
        raise InputError(
            f"the forest has {n_features} features: not {per_band} per band, as context {context} gives"
        )
    trees = [est.tree_ for est in estimators]
    n_trees, max_nodes = len(trees), max(int(t.node_count) for t in trees)
    depth = max(int(t.max_depth) for t in trees)
    net = ForestNet(n_features // per_band, n_classes, n_trees, max_nodes, depth, context)
    feature = np.zeros((n_trees, max_nodes), np.int32)
    threshold = np.zeros((n_trees, max_nodes), np.float32)
    children = np.tile(np.arange(max_nodes, dtype=np.int32)[None, :, None], (n_trees, 1, 2))
    value = np.zeros((n_trees, max_nodes, n_classes), np.float32)
    for i, tree in enumerate(trees):
        n = int(tree.node_count)
        left, right = tree.children_left, tree.children_right
        split = left >= 0
        feature[i, :n] = np.where(split, tree.feature, 0)
        threshold[i, :n] = np.where(split, _threshold_f32(tree.threshold), 0.0)
        children[i, :n, 0] = np.where(split, left, np.arange(n))
        children[i, :n, 1] = np.where(split, right, np.arange(n))
        # As scikit-learn's predict_proba: each leaf's distribution normalised to sum 1.
        dist = np.asarray(tree.value[:, 0, :], dtype=np.float64)
        total = dist.sum(axis=1, keepdims=True)
        value[i, :n][:, columns] = dist / np.where(total == 0, 1.0, total)
    net.feature.copy_(torch.from_numpy(feature))
    net.threshold.copy_(torch.from_numpy(threshold))
    net.child.copy_(torch.from_numpy(children))
    net.value.copy_(torch.from_numpy(value))
    return net.eval()
