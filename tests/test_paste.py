"""Copy-paste: objects of a rare foreground cut from the training part and pasted into chips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin
from scipy import ndimage
from train_support import keep_torch_threads  # noqa: F401 (fixture)

import segpipe.stages.train.loop as loop
from segpipe.stages.ingest.driver import ingest
from segpipe.stages.train import train, train_config
from segpipe.stages.train.config import NetworkConfig
from segpipe.stages.train.paste import RING, ObjectBank, rarest_class
from segpipe.stages.train.progress import TrainProgress
from segpipe.types import ClassInfo

SIZE = 192
# Nine 6 x 6 px "buildings" (value 2, bright) on background (value 1): 2.9 % of the pixels.
CORNERS = [(y, x) for y in (20, 90, 160) for x in (20, 90, 160)]
TINY = {"members": 1, "epochs": 1, "samples_per_epoch": 8, "chip_size": 32, "batch_size": 4, "valid_cell": 32,
        "device": "cpu", "threads": 1}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("paste")
    rng = np.random.default_rng(0)
    image = rng.normal(100, 5, (1, SIZE, SIZE)).astype(np.float32)
    labels = np.ones((SIZE, SIZE), np.uint8)
    for y, x in CORNERS:
        image[0, y : y + 6, x : x + 6] += 50
        labels[y : y + 6, x : x + 6] = 2
    profile = {"driver": "GTiff", "height": SIZE, "width": SIZE, "crs": "EPSG:32617",
               "transform": from_origin(500000, 4000000, 0.5, 0.5)}
    with rasterio.open(root / "image.tif", "w", count=1, dtype="float32", **profile) as dst:
        dst.write(image)
    with rasterio.open(root / "labels.tif", "w", count=1, dtype="uint8", **profile) as dst:
        dst.write(labels, 1)
    classes = [ClassInfo(1, "ground", "#999999"), ClassInfo(2, "building", "#ff0000")]
    ingest([root / "image.tif"], root / "s.zarr", labels=root / "labels.tif", classes=classes, block_size=64)
    return root / "s.zarr"


def _bank(store: Path, share: float = 1.0) -> tuple[loop.TrainPlan, ObjectBank]:
    plan = loop.plan_training(store, NetworkConfig(**TINY, copy_paste=share))
    target = rarest_class(plan.train, plan.lut)
    assert target == int(plan.lut[2])  # the building class, the rarest
    rng = np.random.default_rng(0)
    return plan, ObjectBank.cut(loop.plan_sampler(plan, "train"), plan.train, plan.lut, target, plan.spec,
                                share, rng)


def test_each_training_object_of_the_rarest_class_is_cut_once(store: Path) -> None:
    plan, bank = _bank(store)
    building = int(plan.lut[2])
    # Every building whose pixels are all in training cells, and none of the held-out ones.
    held_out = {(y, x) for y, x in CORNERS if (y // 32, x // 32) in plan.valid_cells}
    assert len(bank.objects) == len(CORNERS) - len(held_out) > 0
    for obj in bank.objects:
        # The 6 x 6 footprint grown by the ring: its outline and a strip of ground come along.
        assert obj.mask.shape == (6 + 2 * RING, 6 + 2 * RING) and obj.mask.sum() > 36
        assert (obj.labels[obj.mask] == building).sum() == 36
        assert obj.image[0][obj.labels == building].min() > obj.image[0][obj.labels != building].max()
    again = _bank(store)[1]  # the same seed cuts the same bank
    assert all(np.array_equal(a.image, b.image) for a, b in zip(bank.objects, again.objects, strict=True))


def test_pasted_objects_keep_their_pixels_and_labels(store: Path) -> None:
    plan, bank = _bank(store, share=1.0)
    building = int(plan.lut[2])
    image = np.zeros((1, 32, 32), np.float32)
    labels = np.full((32, 32), int(plan.lut[1]), np.uint8)
    pasted_image, pasted = bank.maybe_paste(image, labels, np.random.default_rng(3))
    assert (labels != building).all() and (image == 0).all()  # the inputs are left as they were
    # One to three whole 6 x 6 footprints (a 12 px object fits a 32 px chip; two may overlap).
    assert 36 <= (pasted == building).sum() <= 3 * 36 and ndimage.label(pasted == building)[1] in (1, 2, 3)
    assert (pasted_image[0][pasted == building] > 1.0).all()  # bright roofs, normalised
    off = ObjectBank(bank.objects, share=0.0)
    unchanged = off.maybe_paste(image, labels, np.random.default_rng(3))
    assert unchanged[0] is image and unchanged[1] is labels


def test_training_with_and_without_pasting(store: Path, tmp_path: Path) -> None:
    plain = train(store, tmp_path / "n", train_config(**TINY, copy_paste=0.0))
    off = NetworkConfig(**TINY, copy_paste=0.0)
    assert loop._object_bank(loop.plan_training(store, off), None) is None  # type: ignore[arg-type]
    pasted = train(store, tmp_path / "p", train_config(**TINY))  # a rare foreground: pasted by default
    assert pasted.training["auto"]["copy_paste"]["value"] == 0.5
    assert pasted.training["history"][0]["train_loss"] != plain.training["history"][0]["train_loss"]


def test_a_bank_keeps_a_random_draw_of_its_most_objects(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import segpipe.stages.train.paste as paste

    _plan, whole = _bank(store)
    monkeypatch.setattr(paste, "_MAX_OBJECTS", 3)
    monkeypatch.setattr(paste, "_TRIES_PER_OBJECT", 1000)  # every position still visited
    _plan, kept = _bank(store)
    assert len(kept.objects) == 3 < len(whole.objects)
    found = [o.image.tobytes() for o in whole.objects]
    assert all(o.image.tobytes() in found for o in kept.objects)


def test_a_run_that_pastes_resumes_to_the_unbroken_runs_weights(store: Path, tmp_path: Path) -> None:
    # The bank is cut again on resume from a stream of its own; the pasting draws come from
    # the rank's generator, which the checkpoint restores.
    from safetensors.torch import load_file

    settings = {**TINY, "epochs": 2, "checkpoint_every": 1, "valid_fraction": 0.0, "copy_paste": 1.0}

    class KilledError(Exception):
        pass

    def kill(p: TrainProgress) -> None:
        if (p.epoch, p.step) == (2, 1):
            raise KilledError

    train(store, tmp_path / "whole", train_config(**settings))
    with pytest.raises(KilledError):
        train(store, tmp_path / "cut", train_config(**settings), progress=kill)
    spec = train(store, tmp_path / "cut", train_config(**settings), resume=True)
    assert spec.training["resumed_from"] is not None
    a, b = (load_file(str(tmp_path / d / "weights.safetensors")) for d in ("whole", "cut"))
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)
