"""Blending oracles for blend_windows, and predict end to end on a real dask cluster."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import rioxarray  # noqa: F401  (registers the .rio accessor)
import torch
import zarr
from distributed import Client
from hypothesis import given, settings
from hypothesis import strategies as st
from predict_support import CLASSES, HEIGHT, SETTINGS, WIDTH, block_job, make_store

from segpipe.cluster import SCHEDULER_ENV, describe_cluster, get_client
from segpipe.errors import BandMismatchError, InputError
from segpipe.grid.box import Box
from segpipe.grid.tiling import blend_weights, halo_bounds, window_starts
from segpipe.io.runs import STAGING
from segpipe.io.store import open_layer, open_region, read_region_info, valid_mask
from segpipe.models import load_model, model_hash, normalise, read_spec
from segpipe.stages.predict.blend import blend_windows
from segpipe.stages.predict.driver import PROGRESS_LAYER, choose_batch_size, pending_blocks, predict
from segpipe.stages.predict.results import prepare_layers
from segpipe.stages.predict.worker import run_block
from segpipe.stages.predict.worker import torch_forward as _torch_forward


def _identity(batch: np.ndarray) -> np.ndarray:
    return batch


def _blocked(
    image: np.ndarray,
    forward,  # type: ignore[no-untyped-def]
    tile: int,
    overlap: int,
    block: int,
    valid: np.ndarray | None = None,
    batch_size: int = 3,
) -> np.ndarray:
    """Run blend_windows over every block of a whole in-memory raster, as run_block does."""
    _, height, width = image.shape
    valid = np.ones((height, width), dtype=bool) if valid is None else valid
    out: np.ndarray | None = None
    for y0 in range(0, height, block):
        for x0 in range(0, width, block):
            b = Box.sized(y0, x0, min(block, height - y0), min(block, width - x0))
            box = halo_bounds(b, (height, width), tile, tile - overlap)
            probs, _ = blend_windows(
                image[(slice(None), *box.slices)], valid[box.slices],
                forward, tile, overlap, (box.y0, box.x0), (height, width), b, batch_size, True,
            )
            if out is None:
                out = np.zeros((probs.shape[0], height, width), dtype=np.float32)
            out[(slice(None), *b.slices)] = probs
    assert out is not None
    return out


@pytest.mark.parametrize(
    ("height", "width", "tile", "overlap", "block"),
    [
        (97, 61, 32, 8, 40),  # odd sizes, last windows shifted back
        (20, 45, 64, 16, 16),  # raster smaller than a tile: padded, then cropped
        (64, 64, 64, 0, 64),  # exactly one tile, no overlap
        (130, 75, 32, 31, 33),  # overlap almost the tile: many windows per pixel
        (1, 50, 32, 8, 7),  # a single row
    ],
)
def test_identity_predictor_reproduces_the_input(
    height: int, width: int, tile: int, overlap: int, block: int
) -> None:
    image = np.random.default_rng(height * width).random((3, height, width)).astype(np.float32)
    out = _blocked(image, _identity, tile, overlap, block)
    np.testing.assert_allclose(out, image, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(
    st.integers(1, 90), st.integers(1, 90), st.sampled_from([16, 32]), st.integers(0, 15),
    st.integers(5, 60), st.integers(1, 4),
)
def test_identity_holds_for_any_geometry(
    height: int, width: int, tile: int, overlap: int, block: int, batch: int
) -> None:
    image = np.random.default_rng(7).random((2, height, width)).astype(np.float32)
    out = _blocked(image, _identity, tile, overlap, block, batch_size=batch)
    np.testing.assert_allclose(out, image, atol=1e-5)


def _contextual(batch: np.ndarray) -> np.ndarray:
    """A non-local 'network': each output depends on the whole window it sees."""
    mean = batch.mean(axis=(2, 3), keepdims=True)
    return np.tanh(batch - mean + 0.1 * np.roll(batch, 3, axis=3))


def test_two_blockings_give_bitwise_identical_results() -> None:
    image = np.random.default_rng(3).random((2, 101, 77)).astype(np.float32)
    a = _blocked(image, _contextual, 32, 8, block=17)
    b = _blocked(image, _contextual, 32, 8, block=40)
    c = _blocked(image, _contextual, 32, 8, block=200)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)


def _coordinates(height: int, width: int) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    return np.stack([yy, xx])


def _offset_per_window(batch: np.ndarray) -> np.ndarray:
    """A constant per window, keyed by its global position (read from coordinate bands)."""
    wy, wx = batch[:, 0, 0, 0], batch[:, 1, 0, 0]
    c = np.sin(wy * 12.9898 + wx * 78.233) * 10.0
    return np.broadcast_to(c[:, None, None, None], (batch.shape[0], 1, *batch.shape[2:])).copy()


def test_window_offsets_blend_without_seams() -> None:
    height, width, tile, overlap = 120, 90, 32, 12
    stride = tile - overlap
    out = _blocked(_coordinates(height, width), _offset_per_window, tile, overlap, block=50)[0]
    # Reference: the weighted mean of the window constants, straight from the weights
    # (each window's weights are the outer product of its row and column profiles).
    num = np.zeros((height, width))
    den = np.zeros((height, width))
    for wy in window_starts(height, tile, stride):
        for wx in window_starts(width, tile, stride):
            wt = np.outer(blend_weights(tile, overlap, wy == 0, wy + tile >= height),
                          blend_weights(tile, overlap, wx == 0, wx + tile >= width))
            window = _coordinates(height, width)[None, :, wy : wy + tile, wx : wx + tile]
            c = _offset_per_window(window)[0, 0, 0, 0]
            num[wy : wy + tile, wx : wx + tile] += c * wt
            den[wy : wy + tile, wx : wx + tile] += wt
    np.testing.assert_allclose(out, num / den, atol=1e-4)
    # No seam: neighbours differ by at most what a cosine ramp allows (range * pi / overlap
    # per pixel per axis), far below the jump of overlap-and-discard.
    spread = 20.0
    bound = spread * np.pi / overlap
    assert np.abs(np.diff(out, axis=0)).max() <= bound
    assert np.abs(np.diff(out, axis=1)).max() <= bound
    discard = _blocked(_coordinates(height, width), _offset_per_window, tile, 0, block=50)[0]
    assert np.abs(np.diff(discard, axis=1)).max() > 3 * np.abs(np.diff(out, axis=1)).max()


def test_nodata_windows_are_skipped_and_invalid_pixels_zeroed() -> None:
    height, width, tile, overlap = 80, 80, 32, 8
    image = np.random.default_rng(1).random((2, height, width)).astype(np.float32)
    valid = np.ones((height, width), dtype=bool)
    valid[:, :40] = False  # left half nodata
    image[:, ~valid] = 0
    calls: list[int] = []

    def counting(batch: np.ndarray) -> np.ndarray:
        calls.append(batch.shape[0])
        return batch

    out, _ = blend_windows(image, valid, counting, tile, overlap, (0, 0), (height, width),
                           Box(0, 0, height, width), 4, True)
    np.testing.assert_allclose(out[:, valid], image[:, valid], atol=1e-5)
    assert np.all(out[:, ~valid] == 0)
    # Windows start at 0, 24, 48 on each axis; those at x = 0 see only nodata and are
    # skipped: 6 windows in 2 calls, the last padded so every call has the same shape.
    assert calls == [4, 4]


def test_all_nodata_block_returns_empty_probabilities() -> None:
    image = np.zeros((2, 40, 40), dtype=np.float32)
    valid = np.zeros((40, 40), dtype=bool)
    out, windows = blend_windows(image, valid, _identity, 32, 8, (0, 0), (40, 40), Box(0, 0, 40, 40), 8, True)
    assert out.shape == (0, 40, 40) and windows == 0


def test_blend_windows_rejects_a_short_halo_and_bad_overlap() -> None:
    image = np.zeros((1, 40, 40), dtype=np.float32)
    valid = np.ones((40, 40), dtype=bool)
    with pytest.raises(InputError, match="halo"):
        blend_windows(image, valid, _identity, 32, 8, (40, 40), (200, 200), Box(40, 40, 80, 80), 8, True)
    with pytest.raises(InputError, match="overlap"):
        blend_windows(image, valid, _identity, 32, 32, (0, 0), (40, 40), Box(0, 0, 40, 40), 8, True)


def test_valid_mask_any_band_nodata_or_nan() -> None:
    raw = np.ones((2, 2, 3), dtype=np.float32)
    raw[0, 0, 0] = -9999
    raw[1, 1, 2] = np.nan
    assert valid_mask(raw, -9999.0).tolist() == [[False, True, True], [True, True, False]]
    assert valid_mask(np.zeros((2, 3, 3), dtype=np.int16), None).all()


# --- end to end on a real multi-process cluster ---------------------------------------



def _read(store: Path, name: str) -> np.ndarray:
    return np.asarray(open_layer(store, name)[...])


def test_predict_end_to_end(tmp_path: Path, stub_model_dir: Path, client: Client) -> None:
    store = make_store(tmp_path / "a.zarr", block=64)
    seen: list[tuple[int, int]] = []
    summary = predict(store, stub_model_dir, client=client, progress=lambda d, t: seen.append((d, t)),
                      **SETTINGS)
    assert (summary.blocks_total, summary.blocks_done, summary.blocks_skipped) == (12, 12, 0)
    assert summary.pixels == HEIGHT * WIDTH and summary.windows > 16
    assert seen[0] == (0, 12) and seen[-1] == (12, 12)
    classes, conf = _read(store, "classes"), _read(store, "confidence")
    image = _read(store, "image")
    nodata = (image == 0).any(axis=0)
    assert nodata.sum() == 30 * 25 + 5 * WIDTH
    assert np.all(classes[nodata] == 255) and np.all(conf[nodata] == 255)
    assert set(np.unique(classes[~nodata])) <= {3, 7, 9}
    assert conf[~nodata].min() >= 33 and conf[~nodata].max() <= 100  # max of 3 probabilities
    assert _read(store, PROGRESS_LAYER).all()
    # The store still opens with xarray, and outputs keep the CRS.
    ds = open_region(store)
    assert ds["classes"].rio.crs.to_epsg() == 32617
    assert open_layer(store, "classes").attrs["model_hash"] == open_layer(store, PROGRESS_LAYER).attrs[
        "model_hash"]


def test_block_size_does_not_change_the_result(
    tmp_path: Path, model_dir: Path, client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = make_store(tmp_path / "a.zarr", block=64)
    b = make_store(tmp_path / "b.zarr", block=96)
    predict(a, model_dir, client=client, **SETTINGS)
    # No client given: predict joins the cluster named by SEGPIPE_SCHEDULER.
    monkeypatch.setenv(SCHEDULER_ENV, client.scheduler.address)
    predict(b, model_dir, **SETTINGS)
    np.testing.assert_array_equal(_read(a, "classes"), _read(b, "classes"))
    np.testing.assert_array_equal(_read(a, "confidence"), _read(b, "confidence"))
    assert read_region_info(b).blocks == (3, 2)


def test_tasks_of_many_block_rows_write_what_one_block_tasks_write(
    tmp_path: Path, stub_model_dir: Path, client: Client
) -> None:
    # A task holds one block row of outputs at a time: tasks over several of the 200 x 170
    # raster's block rows (4 rows of 64 px blocks, the last one short) must write every
    # block as tasks of one block do, probabilities included.
    small, whole = make_store(tmp_path / "a.zarr", block=64), make_store(tmp_path / "b.zarr", block=64)
    one = predict(small, stub_model_dir, client=client, probabilities=True, **SETTINGS)
    many = predict(whole, stub_model_dir, client=client, probabilities=True,
                   **{**SETTINGS, "max_task_pixels": 256 * 256})
    assert one.tasks == 12 and many.task_blocks[0] >= 2  # tasks of several block rows
    for layer in ("classes", "confidence", "probabilities"):
        np.testing.assert_array_equal(_read(small, layer), _read(whole, layer))
    assert (_read(whole, "classes") != 255).any()


def test_resume_skips_finished_blocks_and_force_recomputes(
    tmp_path: Path, stub_model_dir: Path, client: Client
) -> None:
    store = make_store(tmp_path / "a.zarr", block=64)
    predict(store, stub_model_dir, client=client, **SETTINGS)
    first = _read(store, "classes")
    again = predict(store, stub_model_dir, client=client, **SETTINGS)
    assert (again.blocks_done, again.blocks_skipped, again.windows) == (0, 12, 0)
    # An interrupted run: one block lost its marker (and holds garbage) -> only it reruns.
    open_layer(store, PROGRESS_LAYER, mode="r+")[1, 2] = 0
    open_layer(store, "classes", mode="r+")[64:128, 128:170] = 0
    resumed = predict(store, stub_model_dir, client=client, **SETTINGS)
    assert (resumed.blocks_done, resumed.blocks_skipped) == (1, 11)
    np.testing.assert_array_equal(_read(store, "classes"), first)
    forced = predict(store, stub_model_dir, client=client, force=True, **SETTINGS)
    assert (forced.blocks_done, forced.blocks_skipped) == (12, 0)
    np.testing.assert_array_equal(_read(store, "classes"), first)
    # Other settings are another result: progress resets.
    other = predict(store, stub_model_dir, client=client, tile_size=64, overlap=8, batch_size=4)
    assert other.blocks_done == 12


def test_cpu_workers_default_to_small_fixed_batches(
    tmp_path: Path, stub_model_dir: Path, client: Client
) -> None:
    store = make_store(tmp_path / "a.zarr", block=64)
    settings = {k: v for k, v in SETTINGS.items() if k != "batch_size"}
    summary = predict(store, stub_model_dir, client=client, **settings)
    assert summary.batch_size == 2
    # Every call has one shape: at most one padded slot per task.
    assert summary.windows <= summary.slots < summary.windows + summary.tasks


@pytest.mark.parametrize(("n", "most", "chosen"), [(25, 8, 5), (25, 2, 2), (121, 8, 4), (3, 8, 3), (25, 1, 1),
                                                   (7, 3, 2)])
def test_batch_size_pads_least_and_avoids_single_windows(n: int, most: int, chosen: int) -> None:
    assert choose_batch_size(n, most) == chosen


def test_wrong_bands_fail_before_any_write(tmp_path: Path, stub_model_dir: Path, client: Client) -> None:
    store = make_store(tmp_path / "a.zarr", block=64, bands=4)
    with pytest.raises(BandMismatchError, match="4 bands"):
        predict(store, stub_model_dir, client=client, **SETTINGS)
    assert set(zarr.open_group(store).keys()) == {"band", "x", "y", "image", "spatial_ref"}


@pytest.mark.parametrize(("tile", "overlap"), [(48, 8), (64, 64), (64, -1)])
def test_bad_settings_are_input_errors(tmp_path: Path, model_dir: Path, tile: int, overlap: int) -> None:
    store = make_store(tmp_path / "a.zarr", block=64)
    with pytest.raises(InputError):
        predict(store, model_dir, tile_size=tile, overlap=overlap)


def test_run_block_in_process_matches_the_cluster(
    tmp_path: Path, stub_model_dir: Path, client: Client
) -> None:
    store = make_store(tmp_path / "a.zarr", block=64)
    predict(store, stub_model_dir, client=client, **SETTINGS)
    expected = _read(store, "classes")[64:128, 64:128]
    open_layer(store, "classes", mode="r+")[64:128, 64:128] = 0
    open_layer(store, PROGRESS_LAYER, mode="r+")[1, 1] = 0  # a finished block is not recomputed
    stats = run_block(block_job(store, stub_model_dir, Box(64, 64, 128, 128)))
    assert stats["pixels"] == 64 * 64 and stats["windows"] == 6  # rows 48, 96 x columns 48, 96, 106
    np.testing.assert_array_equal(_read(store, "classes")[64:128, 64:128], expected)


def test_a_named_output_is_written_in_process_beside_the_default_layers(
    tmp_path: Path, stub_model_dir: Path, client: Client
) -> None:
    store = make_store(tmp_path / "a.zarr", block=64)
    predict(store, stub_model_dir, client=client, **SETTINGS)
    before = {name: _read(store, name) for name in ("classes", "confidence", PROGRESS_LAYER)}
    # dask's local scheduler in this process, no cluster; layers of their own.
    summary = predict(store, stub_model_dir, scheduler="synchronous", output="classes_rf", **SETTINGS)
    assert (summary.blocks_done, summary.pixels) == (12, HEIGHT * WIDTH)
    assert summary.valid_pixels == HEIGHT * WIDTH - (30 * 25 + 5 * WIDTH)
    np.testing.assert_array_equal(_read(store, "classes_rf"), before["classes"])
    np.testing.assert_array_equal(_read(store, "confidence_rf"), before["confidence"])
    assert _read(store, "_progress/predict_rf").all()
    assert open_layer(store, "classes_rf").attrs["model_hash"] == model_hash(stub_model_dir)
    for name, arr in before.items():  # the default result is untouched
        np.testing.assert_array_equal(_read(store, name), arr)
    assert not (store / STAGING / "classes_rf").exists()  # written in place, never staged
    # It resumes in place like any result.
    assert pending_blocks(store, stub_model_dir, 64, 16, output="classes_rf") == (0, 12)
    open_layer(store, "_progress/predict_rf", mode="r+")[1, 2] = 0
    open_layer(store, "classes_rf", mode="r+")[64:128, 128:170] = 0
    assert pending_blocks(store, stub_model_dir, 64, 16, output="classes_rf") == (1, 12)
    resumed = predict(store, stub_model_dir, scheduler="threads", output="classes_rf", **SETTINGS)
    assert (resumed.blocks_done, resumed.blocks_skipped) == (1, 11)
    np.testing.assert_array_equal(_read(store, "classes_rf"), before["classes"])
    with pytest.raises(InputError, match="'classes' or 'classes_<name>'"):
        predict(store, stub_model_dir, scheduler="threads", output="image", **SETTINGS)
    # A failing task fails an in-process run too, and the blocks it did not finish stay unmarked.
    (store / "image" / "c" / "0" / "2" / "2").write_bytes(b"not a shard" * 10)
    with pytest.raises(Exception):  # noqa: B017  (the codec's own error, re-raised)
        predict(store, stub_model_dir, scheduler="synchronous", output="classes_rf", force=True, **SETTINGS)
    assert _read(store, "_progress/predict_rf")[2, 2] == 0


def test_get_client_connects_without_closing_the_cluster(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    address = client.scheduler.address
    monkeypatch.setenv(SCHEDULER_ENV, address)
    with get_client() as c:
        assert c.scheduler.address == address
        assert describe_cluster(c).startswith("2 workers, 2 threads")
    assert client.submit(int, "5").result() == 5  # still alive


def test_get_client_starts_and_closes_a_local_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SCHEDULER_ENV, raising=False)
    monkeypatch.setenv("PATH", os.devnull)  # no nvidia-smi: the CPU cluster
    with get_client(n_workers=1, processes=False) as c:
        assert c.submit(sum, [1, 2]).result() == 3
        cluster = c.cluster
    assert cluster is not None and cluster.status.name == "closed"


def test_a_failing_block_fails_the_run_and_a_rerun_resumes(
    tmp_path: Path, stub_model_dir: Path, client: Client
) -> None:
    store = make_store(tmp_path / "a.zarr", block=64)
    shard = store / "image" / "c" / "0" / "2" / "2"  # band shard 0, block row 2, column 2
    good = shard.read_bytes()
    shard.write_bytes(b"not a shard" * 10)
    with pytest.raises(Exception):  # noqa: B017  (the codec's own error, re-raised)
        predict(store, stub_model_dir, client=client, **SETTINGS)
    # predict raised once its running tasks stopped: none of them writes any more.
    staged = {path: path.stat().st_mtime_ns for path in (store / STAGING).rglob("*")}
    time.sleep(0.5)
    assert {path: path.stat().st_mtime_ns for path in (store / STAGING).rglob("*")} == staged
    # A new result is staged until complete: its markers are in the hidden group.
    assert _read(store, f"{STAGING}/{PROGRESS_LAYER}")[2, 2] == 0
    shard.write_bytes(good)
    resumed = predict(store, stub_model_dir, client=client, **SETTINGS)
    # Blocks that finished (even after the failure was raised) are not redone.
    assert resumed.blocks_done >= 1 and resumed.blocks_done + resumed.blocks_skipped == 12
    assert _read(store, PROGRESS_LAYER).all()
    assert np.all(_read(store, "classes")[128:192, 128:170] != 255)


def test_nan_nodata_never_reaches_the_network(tmp_path: Path, model_dir: Path) -> None:
    ints = make_store(tmp_path / "int.zarr", block=256)
    nans = make_store(tmp_path / "nan.zarr", block=256, nan_nodata=True)
    assert np.isnan(read_region_info(nans).nodata)  # type: ignore[arg-type]
    for store in (ints, nans):
        # The driver's template step, then the worker's task, both in this process.
        prepare_layers(str(store), read_spec(model_dir), (1, 1), {"model_hash": "x"}, force=True)
        run_block(block_job(store, model_dir, Box(0, 0, HEIGHT, WIDTH)))
    np.testing.assert_array_equal(_read(ints, "classes"), _read(nans, "classes"))
    assert np.all(_read(nans, "classes")[:30, :25] == 255)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_forward_agrees_with_cpu(tmp_path: Path, model_dir: Path) -> None:
    store = make_store(tmp_path / "a.zarr", block=256)
    prepare_layers(str(store), read_spec(model_dir), (1, 1), {"model_hash": "x"}, force=True)
    stats = run_block(block_job(store, model_dir, Box(0, 0, HEIGHT, WIDTH)))
    assert stats["windows"] == 16
    gpu = _read(store, "classes")
    net, spec = load_model(model_dir)
    raw = _read(store, "image")
    valid = valid_mask(raw, 0)
    forward = _torch_forward(net, torch.device("cpu"))
    probs, _ = blend_windows(normalise(raw, spec, valid), valid, forward, 64, 16,
                             (0, 0), (HEIGHT, WIDTH), Box(0, 0, HEIGHT, WIDTH), 4, True)
    cpu = np.array([c.value for c in CLASSES], dtype=np.uint8)[probs.argmax(0)]
    assert (gpu[valid] == cpu[valid]).mean() > 0.98
