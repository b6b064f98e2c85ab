"""ONNX export and prediction from an ONNX package; the STAC MLM description of packages."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from distributed import Client
from predict_support import CLASSES, make_store, stub_package
from stac_schemas import ITEM_SCHEMA, validate_offline

from segpipe.errors import ModelPackageError
from segpipe.io.store import open_layer
from segpipe.models import ModelSpec, build_network, load_model, model_hash, read_spec, save_model
from segpipe.models.combine import make_ensemble
from segpipe.models.loading import validate_package
from segpipe.models.mlm import MLM_EXTENSION, MLM_FILE, mlm_item, write_mlm
from segpipe.models.onnx import INPUT_NAME, OnnxNetwork, export_onnx, load_onnx
from segpipe.models.package import ONNX_FILE
from segpipe.stages.predict.driver import predict

BANDS = ("b1", "b2", "b3")


def _package(path: Path, arch: str, options: dict[str, int] | None = None) -> Path:
    """An untrained, seeded network package whose batch norms hold non-trivial running statistics."""
    torch.manual_seed(1)
    net = build_network(arch, "resnet18", 3, len(CLASSES), options)
    net.train()
    with torch.no_grad():  # a few batches move the running statistics away from 0 / 1
        for _ in range(3):
            net(torch.randn(4, 3, 64, 64) * 2 + 0.5)
    spec = ModelSpec(arch, "resnet18", BANDS, (700.0,) * 3, (300.0,) * 3, CLASSES, 64, options=options or {})
    return save_model(path, spec, net.eval())


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _max_diff(net: torch.nn.Module, session: ort.InferenceSession, shape: tuple[int, ...]) -> float:
    x = torch.randn(*shape)
    with torch.inference_mode():
        ref = net(x).numpy()
    got = session.run(None, {INPUT_NAME: x.numpy()})[0]
    assert got.shape == ref.shape
    return float(np.abs(got - ref).max())


@pytest.mark.parametrize(("arch", "options"), [("unet", {"pixel_head": 8}), ("deeplabv3plus", None)])
def test_export_matches_torch_for_any_batch_and_window(
    tmp_path: Path, arch: str, options: dict[str, int] | None
) -> None:
    pkg = _package(tmp_path / "torch", arch, options)
    result = export_onnx(pkg, tmp_path / "out" / "model.onnx")
    assert result.window is None and result.package is None and result.max_abs_diff < 1e-4
    net, _ = load_model(pkg)
    session = _session(result.path)
    # Dynamic axes: the file says so, and other batch sizes and windows run and agree.
    dims = session.get_inputs()[0].shape
    assert dims[1] == 3 and all(isinstance(d, str) for d in (dims[0], dims[2], dims[3]))
    diffs = {shape: _max_diff(net, session, shape) for shape in [(1, 3, 64, 64), (5, 3, 128, 96)]}
    print(f"{arch}: onnxruntime vs torch max abs difference {diffs}")
    assert max(diffs.values()) < 1e-4
    props = {p.key: p.value for p in _onnx_props(result.path)}
    assert json.loads(props["segpipe:model"])["arch"] == arch


def _onnx_props(path: Path) -> list:  # type: ignore[type-arg]
    import onnx

    return list(onnx.load(str(path)).metadata_props)


def test_pspnet_is_exported_for_one_window(tmp_path: Path) -> None:
    pkg = _package(tmp_path / "torch", "pspnet")
    result = export_onnx(pkg, tmp_path / "psp.onnx", window=96, package=tmp_path / "onnx")
    assert result.window == 96
    spec = read_spec(tmp_path / "onnx")
    net = load_onnx(tmp_path / "onnx" / ONNX_FILE, spec)
    assert net.window == 96
    torch_net, _ = load_model(pkg)
    for batch in (1, 3):
        x = torch.randn(batch, 3, 96, 96)
        with torch.inference_mode():
            ref = torch_net(x).numpy()
        assert np.abs(net(x.numpy()) - ref).max() < 1e-4
    with pytest.raises(ModelPackageError, match="--tile 96"):
        net(np.zeros((1, 3, 64, 64), np.float32))
    spec = read_spec(tmp_path / "onnx")
    shape = mlm_item(tmp_path / "onnx", spec)["properties"]["mlm:input"][0]["input"]["shape"]
    assert shape == [-1, 3, 96, 96]


def test_forest_and_ensemble_export_exactly(tmp_path: Path) -> None:
    forest = stub_package(tmp_path / "forest")
    unet = _package(tmp_path / "unet", "unet")
    ensemble = make_ensemble([forest, unet], tmp_path / "ensemble", weights=[1.0, 2.0])
    for pkg in (forest, ensemble):
        result = export_onnx(pkg, tmp_path / f"{pkg.name}.onnx")
        net, _ = load_model(pkg)
        session = _session(result.path)
        # 2 x 192 x 192 pixels: more than the torch forest's 65536-pixel chunk, and a
        # descent deeper than the trace's sample needed would show here too.
        for shape in [(1, 3, 64, 96), (2, 3, 192, 192)]:
            assert _max_diff(net, session, shape) < 1e-4, (pkg.name, shape)


def test_an_onnx_package_predicts_the_torch_packages_classes(tmp_path: Path, client: Client) -> None:
    pkg = _package(tmp_path / "torch", "unet", {"pixel_head": 8})
    onnx_pkg = tmp_path / "onnx"
    export_onnx(pkg, tmp_path / "model.onnx", package=onnx_pkg)
    assert sorted(p.name for p in onnx_pkg.iterdir()) == [MLM_FILE, "model.json", ONNX_FILE]
    settings = {"tile_size": 64, "overlap": 16, "batch_size": 4, "probabilities": True}
    results = {}
    # The ONNX package runs on dask workers (single-threaded sessions, several streams),
    # the torch one in this process: test_predict shows both give the same for torch.
    for name, model, on in (("torch", pkg, None), ("onnx", onnx_pkg, client)):
        store = make_store(tmp_path / f"{name}.zarr", block=64)
        predict(store, model, client=on, **settings)  # type: ignore[arg-type]
        results[name] = {layer: np.asarray(open_layer(store, layer)[...])
                         for layer in ("classes", "confidence", "probabilities")}
    classes = results["torch"]["classes"]
    assert len(np.unique(classes[classes != 255])) >= 2  # the comparison is not between constant maps
    np.testing.assert_array_equal(results["onnx"]["classes"], classes)
    # Percentages may differ by one where a probability sits on a rounding boundary.
    for layer in ("confidence", "probabilities"):
        diff = np.abs(results["onnx"][layer].astype(int) - results["torch"][layer].astype(int))
        assert diff.max() <= 1, layer


def test_onnx_package_format_and_refusals(tmp_path: Path) -> None:
    pkg = _package(tmp_path / "torch", "unet")
    onnx_pkg = tmp_path / "onnx"
    export_onnx(pkg, tmp_path / "model.onnx", package=onnx_pkg)
    data = json.loads((onnx_pkg / "model.json").read_text())
    assert data["schema"] == 2 and data["weights_format"] == "onnx"
    assert "weights_format" not in json.loads((pkg / "model.json").read_text())  # torch packages unchanged
    spec, digest = validate_package(onnx_pkg)
    assert spec.weights_format == "onnx" and spec.classes == CLASSES and digest == model_hash(onnx_pkg)
    with pytest.raises(ModelPackageError, match="onnxruntime"):
        load_model(onnx_pkg)  # training, combining and selecting need torch weights
    with pytest.raises(ModelPackageError, match="holds its network"):
        export_onnx(onnx_pkg, tmp_path / "again.onnx")
    with pytest.raises(ModelPackageError, match="holds a torch model package"):
        export_onnx(pkg, tmp_path / "again.onnx", package=pkg)  # never over the torch package
    assert (pkg / "weights.safetensors").is_file() and not (tmp_path / "again.onnx").exists()
    # A package whose model.onnx is another model's (other classes) is refused by name.
    other = tmp_path / "other"
    shutil.copytree(onnx_pkg, other)
    fewer = {**data, "classes": data["classes"][:2]}
    (other / "model.json").write_text(json.dumps(fewer))
    with pytest.raises(ModelPackageError, match="different models"):
        validate_package(other)
    (other / ONNX_FILE).write_bytes(b"not onnx")
    (other / "model.json").write_text(json.dumps(data))
    with pytest.raises(ModelPackageError, match="not a readable ONNX model"):
        validate_package(other)
    assert model_hash(other) != model_hash(onnx_pkg)  # the hash covers model.onnx


_CLASS_NAME = re.compile(r"^[0-9A-Za-z_-]+$")
_MLM_NAME = re.compile(r"^[a-zA-Z][a-zA-Z0-9_.\-\s]+[a-zA-Z0-9]$")


def _check_mlm(item: dict, spec: ModelSpec, framework: str, artifact: str, edge: int) -> None:  # type: ignore[type-arg]
    """The official STAC 1.1 and MLM v1.5 schemas (offline), then what segpipe's descriptions must say."""
    assert validate_offline(item) == [ITEM_SCHEMA, MLM_EXTENSION]
    assert item["type"] == "Feature" and item["stac_version"] == "1.1.0"
    props = item["properties"]
    for key in ("mlm:name", "mlm:architecture", "mlm:tasks", "mlm:input", "mlm:output", "datetime"):
        assert key in props, key
    assert _MLM_NAME.match(props["mlm:name"]) and props["mlm:framework"] == framework
    assert props["mlm:tasks"] == ["semantic-segmentation"] and props["mlm:accelerator"] == "amd64"
    (inp,) = props["mlm:input"]
    assert inp["bands"] == list(spec.band_names) == [b["name"] for b in props["bands"]]
    assert inp["input"] == {"shape": [-1, 3, edge, edge], "dim_order": ["batch", "bands", "height", "width"],
                            "data_type": "float32"}
    assert [(v["type"], v["mean"], v["stddev"]) for v in inp["value_scaling"]] == \
        [("z-score", m, s) for m, s in zip(spec.mean, spec.std, strict=True)]
    (out,) = props["mlm:output"]
    assert out["result"]["shape"] == [-1, len(spec.classes), edge, edge]
    classes = out["classification:classes"]
    assert [(c["value"], c["description"], "#" + c["color_hint"].lower()) for c in classes] == \
        [(c.value, c.name, c.colour.lower()) for c in spec.classes]
    assert all(_CLASS_NAME.match(c["name"]) for c in classes)
    models = [a for a in item["assets"].values() if "mlm:model" in a["roles"]]
    assert len(models) == 1 and models[0]["mlm:artifact_type"] == artifact
    assert all("mlm:artifact_type" not in a for a in item["assets"].values() if "mlm:model" not in a["roles"])
    assert not any(k.startswith("mlm:") and k not in _ITEM_FIELDS for k in props)


_ITEM_FIELDS = {"mlm:name", "mlm:architecture", "mlm:tasks", "mlm:framework", "mlm:framework_version",
                "mlm:memory_size", "mlm:total_parameters", "mlm:pretrained", "mlm:pretrained_source",
                "mlm:batch_size_suggestion", "mlm:accelerator", "mlm:accelerator_constrained",
                "mlm:accelerator_summary", "mlm:accelerator_count", "mlm:input", "mlm:output",
                "mlm:hyperparameters"}


def test_mlm_describes_torch_and_onnx_packages(tmp_path: Path) -> None:
    pkg = _package(tmp_path / "unet-landcover", "unet")
    spec = read_spec(pkg)
    item = json.loads((pkg / MLM_FILE).read_text())  # save_model writes it beside every package
    assert write_mlm(pkg, spec) == pkg / MLM_FILE and json.loads((pkg / MLM_FILE).read_text()) == item
    _check_mlm(item, spec, "PyTorch", "safetensors.torch.save_file", -1)
    assert item["properties"]["mlm:name"] == "unet-landcover"
    assert item["assets"]["model"]["href"] == "./weights.safetensors"
    export_onnx(pkg, tmp_path / "model.onnx", package=tmp_path / "onnx")
    onnx_item = json.loads((tmp_path / "onnx" / MLM_FILE).read_text())
    _check_mlm(onnx_item, spec, "ONNX", "onnx", -1)
    assert onnx_item["assets"]["model"]["href"] == f"./{ONNX_FILE}"
    assert (tmp_path / "onnx" / ONNX_FILE).is_file()


def test_onnx_network_is_a_plain_callable(tmp_path: Path) -> None:
    pkg = _package(tmp_path / "torch", "unet")
    export_onnx(pkg, tmp_path / "onnx" / ONNX_FILE, package=tmp_path / "onnx")
    net = load_onnx(tmp_path / "onnx" / ONNX_FILE, read_spec(pkg), threads=1)
    assert isinstance(net, OnnxNetwork) and net.on_cpu and net.window is None
    out = net(np.zeros((2, 3, 32, 64), np.float32))
    assert out.shape == (2, len(CLASSES), 32, 64) and out.dtype == np.float32


def test_the_export_model_command_lists_its_files_and_refuses_in_one_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    pkg = _package(tmp_path / "torch", "unet")
    segpipe = str(Path(sys.executable).parent / "segpipe")
    command = [segpipe, "export-model", str(pkg), "--onnx", str(tmp_path / "m.onnx")]
    done = subprocess.run([*command, "--package", str(tmp_path / "onnx")], capture_output=True, text=True,
                          timeout=600)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    for written in (tmp_path / "m.onnx", *(tmp_path / "onnx").iterdir()):
        assert f"wrote {written}" in out
    assert "any window" in out and "difference to torch" in out
    refused = subprocess.run([*command, "--package", str(pkg)], capture_output=True, text=True, timeout=600)
    errors = [line for line in refused.stderr.splitlines() if line.strip()]
    assert refused.returncode != 0 and len(errors) == 1 and "torch model package" in errors[0], refused.stderr
    assert "Traceback" not in refused.stderr


def test_an_onnx_file_has_the_usual_mode_and_killed_exports_leave_nothing(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    forest = stub_package(tmp_path / "forest")
    out = tmp_path / "forest.onnx"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    left = tmp_path / f".forest.onnx.{dead}-0123abcd.onnx"  # what an export killed mid-write leaves
    left.write_bytes(b"half an onnx file")
    mask = os.umask(0o022)
    try:
        export_onnx(forest, out)
    finally:
        os.umask(mask)
    assert (out.stat().st_mode & 0o777) == 0o644  # mkstemp's 0600 kept other users out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["forest", "forest.onnx"]
    (tmp_path / "folder.onnx").mkdir()
    with pytest.raises(ModelPackageError, match=r"--onnx .*folder\.onnx is a folder"):
        export_onnx(forest, tmp_path / "folder.onnx")
