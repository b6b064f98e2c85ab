"""Ensemble packages: averaging, the package round trip, refusals, predict and the CLI."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from distributed import Client
from predict_support import CLASSES, SETTINGS, make_store
from typer.testing import CliRunner

from segpipe.cli import app
from segpipe.errors import ModelPackageError
from segpipe.io.store import open_layer
from segpipe.models import ModelSpec, build_network, load_model, read_spec, save_model
from segpipe.models.combine import make_ensemble
from segpipe.models.ensemble import EnsembleNet
from segpipe.stages.predict.driver import predict
from segpipe.types import ClassInfo

SPEC = ModelSpec("pspnet", "resnet18", ("b1", "b2", "b3"), (700.0,) * 3, (300.0,) * 3, CLASSES, 64)


def _package(path: Path, spec: ModelSpec = SPEC, seed: int = 1) -> Path:
    torch.manual_seed(seed)
    net = build_network(spec.arch, spec.encoder, len(spec.band_names), len(spec.classes))
    return save_model(path, spec, net)


def test_the_output_is_the_weighted_mean_of_the_members_probabilities() -> None:
    torch.manual_seed(0)
    a, b = build_network("unet", "resnet18", 3, 3).eval(), build_network("pspnet", "resnet18", 3, 3).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        pa, pb = torch.softmax(a(x), 1), torch.softmax(b(x), 1)
        out = torch.softmax(EnsembleNet([a, b], [1.0, 3.0])(x), 1)
    torch.testing.assert_close(out, 0.25 * pa + 0.75 * pb, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(out, pa, atol=1e-3)  # both members count
    with pytest.raises(ModelPackageError, match="non-negative"):
        EnsembleNet([a, b], [1.0, -1.0])


def test_the_package_alone_rebuilds_every_member(tmp_path: Path, model_dir: Path) -> None:
    other = _package(tmp_path / "psp")
    out = make_ensemble([model_dir, other], tmp_path / "ens")
    net, spec = load_model(out)
    assert spec.arch == "ensemble" and spec.encoder == "unet/resnet18+pspnet/resnet18"
    assert [m["arch"] for m in spec.options["members"]] == ["unet", "pspnet"]
    assert spec.output_stride == 32 and spec.band_names == SPEC.band_names
    described = json.loads((out / "model.json").read_text())["training"]["members"]
    assert [Path(m["package"]) for m in described] == [model_dir.resolve(), other.resolve()]
    x = torch.randn(1, 3, 64, 64)
    members = [load_model(model_dir)[0], load_model(other)[0]]
    with torch.inference_mode():
        expected = (torch.softmax(members[0](x), 1) + torch.softmax(members[1](x), 1)) / 2
        torch.testing.assert_close(torch.softmax(net(x), 1), expected, atol=1e-6, rtol=1e-5)


def test_members_that_do_not_fit_are_refused_by_name(tmp_path: Path, model_dir: Path) -> None:
    other_classes = (*CLASSES[:2], ClassInfo(5, "x", "#000000"))
    classes = _package(tmp_path / "c", dataclasses.replace(SPEC, classes=other_classes))
    with pytest.raises(ModelPackageError, match=r"member .*c does not fit .*: classes \[3, 5, 7\] instead"):
        make_ensemble([model_dir, classes], tmp_path / "e1")
    scaled = _package(tmp_path / "n", dataclasses.replace(SPEC, mean=(10.0,) * 3))
    with pytest.raises(ModelPackageError, match="another normalisation"):
        make_ensemble([model_dir, scaled], tmp_path / "e2")
    bands = _package(tmp_path / "b", dataclasses.replace(SPEC, band_names=("r", "g", "b"), mean=(700.0,) * 3))
    with pytest.raises(ModelPackageError, match="bands"):
        make_ensemble([model_dir, bands], tmp_path / "e3")
    with pytest.raises(ModelPackageError, match="at least two"):
        make_ensemble([model_dir], tmp_path / "e4")
    assert not any((tmp_path / f"e{i}").exists() for i in range(1, 5))  # nothing half-written
    before = {p.name: p.read_bytes() for p in scaled.iterdir()}
    with pytest.raises(ModelPackageError, match=r"--out .*n is one of the members: .*write it elsewhere"):
        make_ensemble([model_dir, scaled], scaled)
    assert {p.name: p.read_bytes() for p in scaled.iterdir()} == before  # the member is untouched


def test_an_ensemble_of_one_model_twice_predicts_like_the_model(
    tmp_path: Path, model_dir: Path, client: Client
) -> None:
    ens = make_ensemble([model_dir, model_dir], tmp_path / "ens", weights=[1.0, 3.0])
    single, double = make_store(tmp_path / "a.zarr", block=64), make_store(tmp_path / "b.zarr", block=64)
    predict(single, model_dir, client=client, **SETTINGS)
    summary = predict(double, ens, client=client, **SETTINGS)
    assert summary.blocks_done == 12
    np.testing.assert_array_equal(np.asarray(open_layer(double, "classes")[...]),
                                  np.asarray(open_layer(single, "classes")[...]))
    conf_a = np.asarray(open_layer(single, "confidence")[...]).astype(int)
    conf_b = np.asarray(open_layer(double, "confidence")[...]).astype(int)
    assert np.abs(conf_a - conf_b).max() <= 1  # the same probabilities, up to float rounding


def test_cli_writes_an_ensemble_and_exits_2_on_a_misfit(tmp_path: Path, model_dir: Path) -> None:
    other = _package(tmp_path / "psp")
    runner = CliRunner()
    ok = runner.invoke(app, ["ensemble", str(model_dir), str(other), "--out", str(tmp_path / "e")])
    assert ok.exit_code == 0, ok.output
    assert read_spec(tmp_path / "e").arch == "ensemble"
    (tmp_path / "e" / "loss_curve.png").write_bytes(b"a plot of an earlier package there")
    again = runner.invoke(app, ["ensemble", str(model_dir), str(other), "--out", str(tmp_path / "e")])
    assert again.exit_code == 0 and not (tmp_path / "e" / "loss_curve.png").exists()
    misfit = _package(tmp_path / "m", dataclasses.replace(SPEC, mean=(1.0,) * 3))
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "segpipe.cli", "ensemble", str(model_dir), str(misfit),
                          "--out", str(tmp_path / "bad")], capture_output=True, text=True, check=False)
    assert run.returncode == 2 and "another normalisation" in run.stdout + run.stderr
