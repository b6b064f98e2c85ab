"""The model package's versioned schema."""

import json

import pytest

from segpipe.errors import ModelPackageError
from segpipe.models import ModelSpec, read_spec
from segpipe.models.package import MODEL_SCHEMA
from segpipe.types import ClassInfo

CLASSES = (ClassInfo(1, "water", "#0000ff"), ClassInfo(2, "forest", "#00aa00"))


def _spec(**kw):
    return ModelSpec("unet", "resnet18", ("b1", "b2"), (1.0, 2.0), (1.0, 1.0), CLASSES, 64, **kw)


def test_new_packages_record_schema_versions_and_stride(tmp_path):
    data = _spec(clip_low=(0.0, 1.0), clip_high=(9.0, 9.0)).to_json()
    assert data["schema"] == MODEL_SCHEMA == 2 and data["output_stride"] == 32
    assert {"segpipe", "torch", "segmentation-models-pytorch", "numpy", "python"} <= set(data["versions"])
    (tmp_path / "model.json").write_text(json.dumps(data))
    assert read_spec(tmp_path).clip_high == (9.0, 9.0)


def test_schema_1_packages_still_load_and_unknown_ones_are_refused(tmp_path):
    data = _spec().to_json()
    for key in ("clip_low", "clip_high", "output_stride", "versions"):
        data.pop(key)
    (tmp_path / "model.json").write_text(json.dumps({**data, "schema": 1}))
    old = read_spec(tmp_path)
    assert old.clip_low is None and old.output_stride == 32 and old.versions == {}
    (tmp_path / "model.json").write_text(json.dumps({**data, "schema": 3}))
    with pytest.raises(ModelPackageError, match="upgrade segpipe"):
        read_spec(tmp_path)
    (tmp_path / "model.json").write_text(json.dumps({**data, "schema": "x"}))
    with pytest.raises(ModelPackageError, match="not supported"):
        read_spec(tmp_path)


def test_clip_bounds_must_fit_the_bands():
    with pytest.raises(ModelPackageError, match="together"):
        _spec(clip_low=(0.0, 0.0))
    with pytest.raises(ModelPackageError, match="2 bands"):
        _spec(clip_low=(0.0,), clip_high=(1.0,))


def test_pixel_head_option_rebuilds_from_the_package(tmp_path):
    """A network with the per-pixel path saves and loads through spec.options alone."""
    import torch

    from segpipe.models import build_network, load_model, save_model
    from segpipe.models.networks import PixelHead

    torch.manual_seed(0)
    net = build_network("unet", "resnet18", 2, 2, {"pixel_head": 8}).eval()
    assert isinstance(net, PixelHead) and net.encoder is net.network.encoder
    x = torch.randn(1, 2, 64, 64)
    with torch.inference_mode():
        expected = net(x)
        # The per-pixel path really contributes to the logits.
        assert not torch.equal(expected, net.network(x))
    save_model(tmp_path, _spec(options={"pixel_head": 8}), net)
    loaded, spec = load_model(tmp_path)
    assert spec.options == {"pixel_head": 8} and isinstance(loaded, PixelHead)
    with torch.inference_mode():
        assert torch.equal(loaded(x), expected)


def test_model_hash_follows_rewritten_packages(tmp_path):
    """The hash is cached per file identity, and a package saved again gets a new one."""
    import torch

    from segpipe.models import build_network, model_hash, save_model

    torch.manual_seed(0)
    net = build_network("unet", "resnet18", 2, 2)
    save_model(tmp_path, _spec(), net)
    first = model_hash(tmp_path)
    assert model_hash(tmp_path) == first
    with torch.no_grad():
        next(net.parameters()).add_(1.0)
    save_model(tmp_path, _spec(), net)  # same sizes, new content
    assert model_hash(tmp_path) != first
    (tmp_path / "weights.safetensors").unlink()
    with pytest.raises(ModelPackageError, match=r"weights\.safetensors is missing"):
        model_hash(tmp_path)


@pytest.mark.parametrize("cut_at", [1, 2, 3])
def test_a_kill_while_a_package_is_replaced_leaves_one_package_whole(tmp_path, monkeypatch, cut_at):
    # The three renames of a replacement: staged weights, staged description, then the
    # weights in (the commit); a kill after any of them, stood for by an error at the next.
    import os

    import numpy as np
    import torch

    from segpipe.models import build_network, load_model, save_model
    from segpipe.models import files as package_files

    spec = _spec()
    torch.manual_seed(1)
    old_net, new_net = (build_network("unet", "resnet18", 2, 2) for _ in range(2))
    save_model(tmp_path, spec, old_net)
    real, calls = os.replace, []

    def cut(src, dst):
        calls.append(dst)
        if len(calls) > cut_at:
            raise KeyboardInterrupt  # stands for the kill
        return real(src, dst)

    monkeypatch.setattr(package_files.os, "replace", cut)
    with pytest.raises(KeyboardInterrupt):
        save_model(tmp_path, spec, new_net)
    monkeypatch.setattr(package_files.os, "replace", real)
    net, _spec_read = load_model(tmp_path)  # the reader finishes a committed write
    expected = new_net if cut_at == 3 else old_net
    loaded = net.state_dict()
    assert all(np.array_equal(loaded[k].numpy(), v.numpy()) for k, v in expected.state_dict().items())
    if cut_at < 3:  # the write never committed: the next one removes its staged files
        save_model(tmp_path, spec, new_net)
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".staged")]

