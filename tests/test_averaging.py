"""The weight average (``ema``): its arithmetic, what it leaves in the network, resume, the package."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from train_support import TINY, few_valid_chips, keep_torch_threads, tiny_store  # noqa: F401 (fixtures)

import segpipe.stages.train.loop as loop
from segpipe.stages.train import train, train_config
from segpipe.stages.train.averaging import WeightAverage
from segpipe.stages.train.progress import TrainProgress

pytestmark = pytest.mark.usefixtures("few_valid_chips", "keep_torch_threads")


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3))


def _step(net: nn.Module, shift: float) -> None:
    with torch.no_grad():
        for p in net.parameters():
            p.add_(shift)
    net.train()(torch.randn(4, 2, 5, 5))  # BatchNorm's running statistics and counter move


def test_the_average_follows_the_warmed_up_decay_and_copies_counters() -> None:
    net = _net()
    average = WeightAverage(net, decay=0.9)
    expected = {k: v.clone() for k, v in net.state_dict().items()}
    for n in range(1, 30):
        _step(net, 0.1)
        average.update(net)
        d = min(0.9, (1 + n) / (10 + n))
        for k, v in net.state_dict().items():
            expected[k] = d * expected[k] + (1 - d) * v if v.is_floating_point() else v.clone()
    for k, v in average.weights.items():
        assert torch.allclose(v, expected[k], atol=1e-6), k
    assert int(average.weights["1.num_batches_tracked"]) == 29
    # 29 steps of +0.1: the average lags the weights (it is not simply their copy)
    assert not torch.allclose(average.weights["0.weight"], net.state_dict()["0.weight"])


def test_applied_lends_the_average_and_gives_the_own_weights_back_even_on_error() -> None:
    net = _net()
    average = WeightAverage(net, decay=0.5)
    _step(net, 1.0)
    average.update(net)
    own = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(RuntimeError), average.applied(net):
        assert torch.equal(net.state_dict()["0.bias"], average.weights["0.bias"])
        raise RuntimeError
    assert all(torch.equal(v, own[k]) for k, v in net.state_dict().items())


def test_state_and_load_carry_the_average_to_a_new_run() -> None:
    net = _net()
    average = WeightAverage(net, decay=0.8)
    for _ in range(3):
        _step(net, 0.5)
        average.update(net)
    again = WeightAverage(_net(), decay=0.8)
    again.load(average.state())
    assert again.steps == 3
    assert all(torch.equal(v, average.weights[k]) for k, v in again.weights.items())


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_store(tmp_path_factory.mktemp("ema"))


SETTINGS = {**TINY, "epochs": 2, "samples_per_epoch": 8, "checkpoint_every": 1, "linear_start": False,
            "keep": "last"}


def _weights(package: Path) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in load_file(str(package / "weights.safetensors")).items()}


@pytest.mark.parametrize("valid_fraction", [None, 0.0])
def test_the_package_keeps_the_average_scored_or_not(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, valid_fraction: float | None
) -> None:
    made: list[WeightAverage] = []

    class Watched(WeightAverage):
        def __init__(self, net: nn.Module, decay: float) -> None:
            super().__init__(net, decay)
            made.append(self)

    monkeypatch.setattr(loop, "WeightAverage", Watched)
    held = {} if valid_fraction is None else {"valid_fraction": valid_fraction}
    train(store, tmp_path / "ema", train_config(**SETTINGS, **held, ema=0.9))
    (average,) = made
    kept = _weights(tmp_path / "ema")
    assert average.steps == 8 and kept.keys() <= average.weights.keys()
    assert all(np.array_equal(v, average.weights[k].numpy()) for k, v in kept.items())
    train(store, tmp_path / "plain", train_config(**SETTINGS, **held))
    plain = _weights(tmp_path / "plain")
    assert not all(np.array_equal(v, plain[k]) for k, v in kept.items())  # not the last step's


def test_a_run_with_the_average_resumes_to_the_unbroken_runs_weights(store: Path, tmp_path: Path) -> None:
    class KilledError(Exception):
        pass

    def kill(p: TrainProgress) -> None:
        if (p.epoch, p.step) == (2, 2):
            raise KilledError

    train(store, tmp_path / "whole", train_config(**SETTINGS, ema=0.9))
    cut = tmp_path / "cut"
    with pytest.raises(KilledError):
        train(store, cut, train_config(**SETTINGS, ema=0.9), progress=kill)
    spec = train(store, cut, train_config(**SETTINGS, ema=0.9), resume=True)
    assert spec.training["resumed_from"] == {"epoch": 2, "step": 1}
    a, b = _weights(tmp_path / "whole"), _weights(cut)
    assert all(np.array_equal(a[k], b[k]) for k in a)
