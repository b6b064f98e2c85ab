"""Tiny stores and settings shared by the training feature tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import segpipe.stages.train.loop as loop
from segpipe.stages.ingest.driver import ingest
from segpipe.synth import synthesize

# Chips of 32 px, two per step, a few steps: enough to exercise every path. One network:
# a tiny store holds out few cells, where members would otherwise be auto's three refitted ones
# (tests/test_members.py tests that rule).
TINY = {
    "members": 1,
    "epochs": 1,
    "samples_per_epoch": 4,
    "chip_size": 32,
    "batch_size": 2,
    "valid_cell": 32,
    "device": "cpu",
}


def tiny_store(root: Path, seed: int = 1, bands: int = 4, dense: bool = False) -> Path:
    """A 128 x 128 px, 4-band labelled region store in 64 px blocks (sparse labels, or the dense truth)."""
    region = synthesize(root / f"region{seed}", size=128, bands=bands, tiles=1, seed=seed)
    out = root / f"r{seed}{'_dense' if dense else ''}.zarr"
    labels = region.truth if dense else region.labels
    ingest([region.image], out, labels=labels, classes=region.classes, block_size=64)
    return out


@pytest.fixture
def few_valid_chips(monkeypatch: pytest.MonkeyPatch) -> None:
    """Four validation chips an epoch: tiny runs validate in a moment (used with autouse below)."""
    monkeypatch.setattr(loop, "_MAX_VALID_CHIPS", 4)


@pytest.fixture
def keep_torch_threads() -> Iterator[None]:
    """The process's torch thread count restored after a run that set ``threads``."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
