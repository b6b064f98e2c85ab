"""Model packages as ONNX: export a torch package, and run an ONNX package with onnxruntime.

:func:`export_onnx` writes a package's network as one ONNX file, taking the same input as
the torch network (N x bands x H x W float32 normalised band values, H and W multiples of
the package's ``output_stride``) and giving the same logits (N x classes x H x W), so any
ONNX runtime (QGIS and ArcGIS deep-learning tools, a browser, a site without torch)
runs it. Batch, height and width are dynamic, except for networks whose adaptive
pooling needs a fixed input size (smp's PSPNet): those are exported for one window size
(by default the tile ``segpipe predict`` uses for the package), batch still dynamic.

It uses torch's TorchScript exporter (``torch.onnx.export(..., dynamo=False)``): the
torch.export-based one needs onnxscript, a dependency this would add for nothing the
networks need. Tracing records one run, so control flow that depends on the data would
be frozen into the graph: the random forest's early stop is, which is why forests are
exported through :func:`_forest_graph` (every descent step, no early stop), and every
export is checked against the torch network on an input of another size before it is
kept.

An ONNX *package* (``package=`` of :func:`export_onnx`) is a folder with ``model.json``
(``weights_format`` = ``onnx``) and ``model.onnx``, and no torch weights:
``segpipe predict`` runs it through :class:`OnnxNetwork` (onnxruntime, on the CPU, or
on CUDA where onnxruntime-gpu is installed).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from segpipe.errors import EnvironmentFaultError, ModelPackageError
from segpipe.io.swap import remove_stale_temporaries, temporary_name
from segpipe.models.files import (
    SPEC_FILE,
    WEIGHTS_FILE,
    atomic_write,
    give_default_mode,
    replace_package_files,
)
from segpipe.models.package import ONNX_FILE, load_model
from segpipe.models.spec import ModelSpec

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "DEFAULT_OPSET", "INPUT_NAME", "OUTPUT_NAME", "OnnxExport", "OnnxNetwork", "export_onnx", "load_onnx",
    "write_onnx_package",
]

# Opset 17 is read by every onnxruntime since 1.11 and by the GIS tools' bundled runtimes.
DEFAULT_OPSET = 17
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
# An export is kept only if onnxruntime's logits are this close to torch's (relative to
# the largest logit, at least 1): real exporter faults are far larger, float rounding far smaller.
_VERIFY_TOLERANCE = 1e-3
_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")


@dataclass(frozen=True)
class OnnxExport:
    """What :func:`export_onnx` wrote.

    Attributes:
        path: The ONNX file.
        package: The ONNX package folder written beside it, or None.
        window: The one window edge the graph takes, or None (height and width dynamic).
        max_abs_diff: Largest difference between onnxruntime's and torch's logits on the check input.
        opset: The ONNX opset.
    """

    path: Path
    package: Path | None
    window: int | None
    max_abs_diff: float
    opset: int


class OnnxNetwork:
    """An ONNX network run by onnxruntime: (N, bands, H, W) float32 -> (N, classes, H, W) logits.

    Calls are thread-safe (onnxruntime sessions are), so prediction's parallel streams
    share one.

    Attributes:
        path: The ONNX file.
        window: The window edge the graph was exported for, or None (any multiple of the stride).
        providers: onnxruntime's execution providers, in order of preference.
    """

    def __init__(self, path: Path, session: Any) -> None:
        self.path = path
        self._session = session
        shape = session.get_inputs()[0].shape
        fixed = [d for d in shape[2:] if isinstance(d, int)]
        self.window: int | None = fixed[0] if len(fixed) == 2 else None
        self.providers: tuple[str, ...] = tuple(session.get_providers())

    @property
    def on_cpu(self) -> bool:
        """Whether onnxruntime runs it on the CPU (no CUDA provider in use)."""
        return self.providers[0] == "CPUExecutionProvider"

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """Logits of a (N, bands, H, W) batch of normalised pixels.

        Raises:
            ModelPackageError: The graph takes one window size and the batch has another.
        """
        if self.window is not None and batch.shape[2:] != (self.window, self.window):
            raise ModelPackageError(
                f"{self.path} was exported for {self.window} x {self.window} px windows (its architecture "
                f"takes no other size), not {batch.shape[2]} x {batch.shape[3]}: predict with --tile "
                f"{self.window}, or export the torch package again with that window"
            )
        x = np.ascontiguousarray(batch, dtype=np.float32)
        out: np.ndarray = self._session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
        return out


def _in_dask_worker() -> bool:
    try:
        from distributed import get_worker

        get_worker()
    except (ImportError, ValueError):
        return False
    return True


def load_onnx(path: str | Path, spec: ModelSpec, threads: int | None = None) -> OnnxNetwork:
    """Open an ONNX network for prediction, on CUDA when onnxruntime offers it, else the CPU.

    Args:
        path: The ONNX file.
        spec: Its package's description (the graph must take its bands and give its classes).
        threads: onnxruntime's intra-op threads; None: 1 inside a dask worker (prediction
            runs as many single-threaded streams as the task has cores, as with torch),
            else onnxruntime's default (every core).

    Raises:
        EnvironmentFaultError: onnxruntime is not installed.
        ModelPackageError: The file is missing, not ONNX, or its input or output does not
            fit the package's bands and classes.
    """
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise EnvironmentFaultError(f"{path} needs onnxruntime to run: pip install onnxruntime") from exc
    path = Path(path)
    if not path.is_file():
        raise ModelPackageError(f"{path.parent} is not a complete model package: {path.name} is missing")
    options = ort.SessionOptions()
    options.intra_op_num_threads = (1 if _in_dask_worker() else 0) if threads is None else threads
    providers = [p for p in _PROVIDERS if p in ort.get_available_providers()]
    try:
        session = ort.InferenceSession(str(path), options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable graphs
        raise ModelPackageError(f"{path} is not a readable ONNX model ({type(exc).__name__}: {exc}): "
                                "copy the package again or export it again") from exc
    _check_signature(path, session, spec)
    return OnnxNetwork(path, session)


def _check_signature(path: Path, session: Any, spec: ModelSpec) -> None:
    """Refuse a graph whose input or output names or channel counts differ from the package's."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    found = {"input": [i.name for i in inputs], "output": [o.name for o in outputs]}
    if found != {"input": [INPUT_NAME], "output": [OUTPUT_NAME]}:
        raise ModelPackageError(f"{path} has inputs {found['input']} and outputs {found['output']}, not "
                                f"'{INPUT_NAME}' and '{OUTPUT_NAME}': it was not exported by segpipe")
    for what, shape, want in (("bands", inputs[0].shape, len(spec.band_names)),
                              ("classes", outputs[0].shape, len(spec.classes))):
        if len(shape) != 4 or (isinstance(shape[1], int) and shape[1] != want):
            raise ModelPackageError(f"{path} takes shape {shape} where its {SPEC_FILE} has {want} {what}: "
                                    "model.json and model.onnx come from different models")


# --- export ---------------------------------------------------------------------------------


def _fixed_size(net: nn.Module) -> bool:
    """Whether the network pools adaptively to more than one cell (exportable for one input size only)."""
    from torch import nn

    pools = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
    for module in net.modules():
        if isinstance(module, pools):
            size = module.output_size
            cells = size if isinstance(size, tuple) else (size, size)
            if any(c != 1 for c in cells):
                return True
    return False


def _exportable(net: nn.Module) -> nn.Module:
    """The network with every random forest swapped for :class:`_ForestGraph` (in a copy of an ensemble)."""
    from segpipe.models.ensemble import EnsembleNet
    from segpipe.models.forest import ForestNet

    if isinstance(net, ForestNet):
        return _forest_graph(net)
    if isinstance(net, EnsembleNet):
        # A new ensemble over the same (shared, unchanged) members: the package's stays as it is.
        return EnsembleNet([_exportable(m) for m in net.members], net.weights)
    return net


def _window(spec: ModelSpec) -> int:
    """The tile ``segpipe predict`` uses for a package by default (stages.predict.driver.window_settings)."""
    stride = spec.output_stride
    return max(256, -(-spec.chip_size // stride) * stride)


def _trace(module: nn.Module, sample: torch.Tensor, out: Path, opset: int, dynamic: bool) -> None:
    """Write the traced ONNX graph of ``module`` run on ``sample``."""
    import torch

    axes = {0: "batch", 2: "height", 3: "width"} if dynamic else {0: "batch"}
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of the dynamo one (which
        # needs onnxscript), and tracing warns about every shape read; neither matters here.
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (sample,), str(out), dynamo=False, opset_version=opset,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: axes})


def _describe_graph(path: Path, spec: ModelSpec) -> None:
    """Check the file with onnx's checker and record the package's description in its metadata."""
    import onnx

    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    onnx.helper.set_model_props(model, {"segpipe:model": json.dumps(spec.to_json()),
                                        "segpipe:classes": json.dumps([c.name for c in spec.classes])})
    onnx.save(model, str(path))


def _verify(net: nn.Module, path: Path, spec: ModelSpec, probe: torch.Tensor) -> float:
    """Largest difference between onnxruntime's and torch's logits on ``probe``.

    Raises:
        ModelPackageError: They differ by more than float rounding explains.
    """
    import torch

    with torch.inference_mode():
        ref = net(probe).float().numpy()
    got = load_onnx(path, spec)(probe.numpy())
    diff = float(np.abs(got - ref).max()) if got.shape == ref.shape else float("inf")
    if not diff <= _VERIFY_TOLERANCE * max(1.0, float(np.abs(ref).max())):
        raise ModelPackageError(
            f"the ONNX export of {spec.arch} gives logits {got.shape} up to {diff:.3g} away from torch's "
            f"{ref.shape} on a {tuple(probe.shape)} input: this network does not export faithfully"
        )
    return diff


def export_onnx(
    model_dir: str | Path,
    out_path: str | Path,
    opset: int = DEFAULT_OPSET,
    *,
    package: str | Path | None = None,
    window: int | None = None,
) -> OnnxExport:
    """Export a torch model package's network to ONNX, checked against torch before it is kept.

    Args:
        model_dir: The torch package (``model.json`` + ``weights.safetensors``).
        out_path: The ONNX file to write (replaced atomically).
        opset: The ONNX opset.
        package: Also write an ONNX package folder here: ``model.json`` (weights format
            ``onnx``), ``model.onnx`` and the STAC MLM description ``mlm.json``.
        window: Window edge for a network that takes one size only (PSPNet); default the
            tile ``segpipe predict`` uses for the package. Ignored by the others.

    Returns:
        What was written, with the measured difference to torch.

    Raises:
        ModelPackageError: The package is invalid or already ONNX, the window is not a
            multiple of the network's stride, or the export does not match torch.
    """
    import torch

    if package is not None:
        _refuse_torch_folder(Path(package))  # before the export's minutes, not after
    net, spec = load_model(model_dir)
    module = _exportable(net).eval()
    stride, bands = spec.output_stride, len(spec.band_names)
    fixed = _fixed_size(module)
    size = (window or _window(spec)) if fixed else 2 * max(stride, 32)
    if size <= 0 or size % stride:
        raise ModelPackageError(f"window {size} is not a positive multiple of {stride}, the network's stride")
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(2, bands, size, size, generator=gen)
    # Checked on another batch size and, where dynamic, another (non-square) window.
    probe = torch.randn(3, bands, size if fixed else size + stride, size, generator=gen)
    out = Path(out_path)
    if out.is_dir():
        raise ModelPackageError(f"--onnx {out} is a folder: name the .onnx file to write")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)  # what killed exports to ``out`` left (each as big as the model)
    tmp = temporary_name(out, ".onnx")
    try:
        _trace(module, sample, tmp, opset, dynamic=not fixed)
        _describe_graph(tmp, spec)
        diff = _verify(net, tmp, spec, probe)
        give_default_mode(tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    edge = size if fixed else None
    written = write_onnx_package(package, spec, out, edge) if package is not None else None
    return OnnxExport(out, written, edge, diff, opset)


def _refuse_torch_folder(folder: Path) -> None:
    """Refuse to write an ONNX package over a torch package (whose weights it would orphan)."""
    if (folder / WEIGHTS_FILE).exists():
        raise ModelPackageError(f"{folder} holds a torch model package ({WEIGHTS_FILE}): write the ONNX "
                                "package into a new or empty folder")


def write_onnx_package(
    package: str | Path, spec: ModelSpec, onnx_file: str | Path, window: int | None = None
) -> Path:
    """Write an ONNX package folder: ``model.onnx``, ``model.json`` (format ``onnx``) and ``mlm.json``.

    The ONNX file and the description are replaced as one
    (:func:`segpipe.models.files.replace_package_files`), so a folder whose ``model.json``
    names ONNX weights always holds them, and a kill leaves an earlier package whole.

    Args:
        package: The folder (created if needed).
        spec: The torch package's description.
        onnx_file: The exported network.
        window: The one window edge the network takes, or None (for ``mlm.json``).

    Returns:
        The package folder.

    Raises:
        ModelPackageError: The folder holds a torch package (its weights are never replaced).
    """
    from segpipe.models.mlm import write_mlm

    folder = Path(package)
    _refuse_torch_folder(folder)
    folder.mkdir(parents=True, exist_ok=True)
    source, dest = Path(onnx_file), folder / ONNX_FILE
    onnx_spec = replace(spec, weights_format="onnx")
    description = (json.dumps(onnx_spec.to_json(), indent=2) + "\n").encode()
    if source.resolve() != dest.resolve():  # a kill leaves the earlier package or this one whole
        replace_package_files(folder, ONNX_FILE, source.read_bytes(), description)
    else:
        atomic_write(folder / SPEC_FILE, description)
    write_mlm(folder, onnx_spec, window)
    return folder


def _forest_graph(forest: Any) -> nn.Module:
    """A random forest's forward pass with a fixed number of descent steps, for tracing.

    :class:`segpipe.models.forest.ForestNet` stops descending once every pixel of a
    chunk sits on a leaf and cuts pixels into chunks, both decided by the data: a trace
    would freeze them for the sample input. Here every tree descends ``depth`` steps
    (leaves point to themselves, so the extra steps change nothing) over all pixels at
    once, all trees side by side, giving the same log-probabilities.
    """
    import torch
    from torch import nn

    from segpipe.models.forest import _TINY, context_features

    class ForestGraph(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.forest = forest

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            f = self.forest
            n, _, h, w = x.shape
            feats = context_features(x, f.context).permute(0, 2, 3, 1).reshape(-1, f.n_features)
            trees, nodes = f.n_trees, f.max_nodes
            offset = (torch.arange(trees) * nodes).unsqueeze(0)  # tree t's nodes start at t * nodes
            feature, threshold = f.feature.reshape(-1).long(), f.threshold.reshape(-1)
            child = f.child.reshape(-1).long()  # (left, right) of global node g at 2g, 2g + 1
            node = torch.zeros(feats.shape[0], trees, dtype=torch.long)
            for _ in range(f.depth):
                g = node + offset
                v = torch.gather(feats, 1, feature[g])
                node = child[g * 2 + (v > threshold[g]).long()]
            value = f.value.reshape(trees * nodes, -1)
            total = value[node[:, 0]]
            for t in range(1, trees):  # tree by tree: (pixels, trees, classes) at once would take GBs
                total = total + value[node[:, t] + t * nodes]
            logp = (total / trees).clamp_min(_TINY).log()
            out: torch.Tensor = logp.reshape(n, h, w, -1).permute(0, 3, 1, 2)
            return out

    return ForestGraph()
