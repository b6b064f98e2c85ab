"""Out-of-core evaluation of a prediction against reference rasters and polygons."""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import rioxarray  # noqa: F401  (registers the .rio accessor)
import shapely
import xarray as xr
import zarr
from affine import Affine
from PIL import Image
from rasterio.features import rasterize
from rasterio.warp import transform as transform_points
from rasterio.warp import transform_bounds

import segpipe.stages.evaluate.assess as ev
from segpipe.errors import InputError, LabelsError, MissingInputError, MissingLayerError
from segpipe.grid.box import Box, iter_boxes
from segpipe.io.labels import labels_window, open_labels
from segpipe.io.store import create_layer, read_region_info, write_block
from segpipe.plots import plot_loss_curve
from segpipe.stages.evaluate.assess import EVAL_WINDOW, evaluate
from segpipe.stages.evaluate.metrics import confusion_from_histogram, joint_histogram, json_ready, scores
from segpipe.stages.evaluate.points import strata_counts
from segpipe.stages.evaluate.prediction import PredictionSource, open_prediction, preview_rgb, read_prediction
from segpipe.stages.evaluate.report import decimate
from segpipe.stages.export.cog import write_cog
from segpipe.types import ClassInfo, Grid, classes_to_json

CLASSES = (
    ClassInfo(1, "forest", "#1f7a1f"),
    ClassInfo(3, "water", "#1f77b4"),
    ClassInfo(7, "urban", "#d62728"),
)
UTM = "EPSG:32617"
TRANSFORM = Affine(30.0, 0.0, 500000.0, 0.0, -30.0, 4000000.0)
H, W = 1500, 1300


def make_store(
    path: Path, height: int, width: int, block: int = 512, bands: tuple[str, ...] = ("b1",)
) -> None:
    """A region store with store.py's layout and a random image."""
    ys = TRANSFORM.f + TRANSFORM.e * (np.arange(height) + 0.5)
    xs = TRANSFORM.c + TRANSFORM.a * (np.arange(width) + 0.5)
    image = xr.DataArray(
        np.random.default_rng(0).integers(0, 4000, (len(bands), height, width), dtype=np.uint16),
        dims=("band", "y", "x"),
        coords={"band": list(range(1, len(bands) + 1)), "y": ys, "x": xs},
        name="image",
        attrs={"long_name": list(bands)},
    )
    image = image.rio.write_crs(UTM).rio.write_transform(TRANSFORM)
    inner = min(256, block)
    n = len(bands)
    encoding = {"image": {"chunks": (n, inner, inner), "shards": (n, block, block), "_FillValue": 0}}
    image.to_dataset().to_zarr(path, mode="w", zarr_format=3, consolidated=False, encoding=encoding)
    group = zarr.open_group(str(path), mode="r+")
    group.attrs["segpipe"] = {"schema": 1, "block_size": block, "classes": classes_to_json(CLASSES)}


def fill_classes(store: Path, data: np.ndarray) -> None:
    info = read_region_info(store)
    array = create_layer(store, "classes", "uint8", 255, overwrite=True)
    b = info.block_size
    for y0 in range(0, info.height, b):
        for x0 in range(0, info.width, b):
            write_block(array, y0, x0, data[y0 : y0 + b, x0 : x0 + b], b)


def write_tif(path: Path, data: np.ndarray, crs: str, transform: Affine, nodata: int | None = None) -> None:
    h, w = data.shape
    profile = {"driver": "GTiff", "height": h, "width": w, "count": 1, "dtype": str(data.dtype)}
    with rasterio.open(path, "w", **profile, nodata=nodata, crs=crs, transform=transform) as dst:
        dst.write(data, 1)


def blocky(rng: np.random.Generator, shape: tuple[int, int], values: list[int], cell: int) -> np.ndarray:
    small = rng.choice(np.array(values, np.uint8), size=(shape[0] // cell + 1, shape[1] // cell + 1))
    return small.repeat(cell, 0).repeat(cell, 1)[: shape[0], : shape[1]]


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path | np.ndarray]:
    """A store with a prediction, a reference raster in EPSG:4326 and polygons in EPSG:4326.

    The reference rasters share blocky structure with the prediction (so scores are
    neither 0 nor 1), cover only part of the grid, and hold class 5, which the
    model does not know.
    """
    root = tmp_path_factory.mktemp("evaluate")
    rng = np.random.default_rng(3)
    store = root / "region.zarr"
    make_store(store, H, W)
    pred = blocky(rng, (H, W), [1, 3, 7], 24)
    pred[rng.random((H, W)) < 0.05] = 2  # a value outside the known classes: "other"
    pred[:, :64] = 255  # no image data in the western strip
    fill_classes(store, pred)

    # Reference raster in geographic coordinates, over the grid's west 80 %.
    west, south, east, north = transform_bounds(
        UTM, "EPSG:4326", 500000 - 900, 4000000 - 30 * H - 900, 500000 + 30 * W * 0.8, 4000000 + 900
    )
    res = 0.0003
    rh, rw = int((north - south) / res), int((east - west) / res)
    ref = blocky(rng, (rh, rw), [0, 1, 3, 5, 7], 6)
    ref_tif = root / "reference.tif"
    write_tif(ref_tif, ref, "EPSG:4326", Affine(res, 0, west, 0, -res, north), nodata=0)

    # Polygons drawn in UTM, stored in EPSG:4326.
    boxes, cls = [], []
    for _ in range(40):
        x0 = 500000 + rng.uniform(-3000, 30 * W)
        y0 = 4000000 - rng.uniform(0, 30 * H + 3000)
        boxes.append(shapely.box(x0, y0 - rng.uniform(300, 9000), x0 + rng.uniform(300, 9000), y0))
        cls.append(int(rng.choice([1, 3, 5, 7])))
    names = {1: "forest", 3: "water", 5: "wetland", 7: "urban"}
    gdf = gpd.GeoDataFrame({"class": cls, "name": [names[c] for c in cls]}, geometry=boxes, crs=UTM)
    gpkg = root / "reference.gpkg"
    gdf.to_crs("EPSG:4326").to_file(gpkg, driver="GPKG")
    return {"root": root, "store": store, "pred": pred, "ref_tif": ref_tif, "gpkg": gpkg, "utm_polygons": gdf}


def grid() -> Grid:
    from rasterio.crs import CRS

    return Grid(CRS.from_string(UTM).to_wkt(), tuple(TRANSFORM)[:6], H, W)


def reference_on_grid(path: Path, window: int = EVAL_WINDOW) -> np.ndarray:
    """The reference as evaluate sees it: labels_window over the same windows."""
    src = open_labels(path)
    out = np.zeros((H, W), np.uint8)
    for y0 in range(0, H, window):
        for x0 in range(0, W, window):
            h, w = min(window, H - y0), min(window, W - x0)
            out[y0 : y0 + h, x0 : x0 + w] = labels_window(src, grid(), y0, x0, h, w)
    return out


def direct_metrics(pred: np.ndarray, ref: np.ndarray, values: list[int]) -> tuple[np.ndarray, list[int]]:
    """Confusion matrix and "other" counts by plain boolean masks over whole arrays."""
    cm = np.array([[np.count_nonzero((ref == r) & (pred == p)) for p in values] for r in values])
    outside = ~np.isin(pred, values) & (pred != 255)
    return cm, [int(np.count_nonzero((ref == r) & outside)) for r in values]


def check_against_direct(metrics: dict, pred: np.ndarray, ref: np.ndarray, names: dict[int, str]) -> None:
    values = [1, 3, 5, 7]
    assert [c["value"] for c in metrics["classes"]] == values
    assert [c["name"] for c in metrics["classes"]] == [names[v] for v in values]
    cm, other = direct_metrics(pred, ref, values)
    assert metrics["confusion_matrix"] == cm.tolist()
    assert metrics["other_predictions"] == other
    evaluated = (ref != 0) & (pred != 255)
    assert metrics["pixel_counts"] == {
        "grid": H * W,
        "reference_labelled": int(np.count_nonzero(ref)),
        "evaluated": int(np.count_nonzero(evaluated)),
        "labelled_without_prediction": int(np.count_nonzero((ref != 0) & (pred == 255))),
        "other_predictions": sum(other),
    }
    correct = np.count_nonzero(evaluated & (ref == pred))
    assert metrics["overall_accuracy"] == correct / np.count_nonzero(evaluated)
    water_hits = np.count_nonzero((ref == 3) & (pred == 3))
    assert metrics["per_class"][1]["recall"] == water_hits / np.count_nonzero((ref == 3) & (pred != 255))
    wetland = metrics["per_class"][2]  # class 5: in the reference only
    assert wetland["recall"] == 0.0 and wetland["precision"] is None
    full = np.concatenate([cm, np.array(other)[:, None]], axis=1)
    expected = json_ready(scores(full, values, [names[v] for v in values]))
    for key in ("overall_accuracy", "kappa", "miou", "per_class", "pixels", "correct"):
        assert metrics[key] == expected[key], key


def test_store_against_raster_in_other_crs(scene: dict, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    metrics = evaluate(scene["store"], scene["ref_tif"], out)
    ref = reference_on_grid(scene["ref_tif"])
    # the warp itself is right: nearest source pixel of each pixel centre, checked point by point
    rows, cols = np.mgrid[0:H:7, 0:W:7]
    xs, ys = (TRANSFORM @ Affine.translation(0.5, 0.5)) @ (cols.ravel() + 0.0, rows.ravel() + 0.0)
    lon, lat = transform_points(UTM, "EPSG:4326", xs, ys)
    with rasterio.open(scene["ref_tif"]) as src:
        data = src.read(1)
        c, r = ~src.transform @ (np.asarray(lon), np.asarray(lat))
    r, c = np.floor(r).astype(int), np.floor(c).astype(int)
    inside = (r >= 0) & (r < data.shape[0]) & (c >= 0) & (c < data.shape[1])
    expected = np.where(inside, data[np.clip(r, 0, data.shape[0] - 1), np.clip(c, 0, data.shape[1] - 1)], 0)
    assert np.mean(ref[::7, ::7].ravel() == expected) > 0.99
    assert (ref[:, int(W * 0.85) :] == 0).all()  # east of the reference: unlabelled
    names = {1: "forest", 3: "water", 5: "class 5", 7: "urban"}
    check_against_direct(metrics, scene["pred"], ref, names)
    assert json.loads((out / "metrics.json").read_text()) == metrics
    for png in ("confusion_matrix.png", "preview.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_store_against_polygons(scene: dict, tmp_path: Path) -> None:
    metrics = evaluate(scene["store"], scene["gpkg"], tmp_path, reference_field="class", window=512)
    ref = reference_on_grid(scene["gpkg"], window=512)
    gdf = scene["utm_polygons"]
    shapes = zip(gdf.geometry, gdf["class"], strict=True)
    burnt = rasterize(shapes, out_shape=(H, W), transform=TRANSFORM, dtype="uint8")
    assert np.mean(ref == burnt) > 0.995  # reprojected to 4326 and back: edges may move a pixel
    check_against_direct(metrics, scene["pred"], ref, {1: "forest", 3: "water", 5: "wetland", 7: "urban"})
    assert (tmp_path / "confusion_matrix.png").stat().st_size > 1000


def test_cog_prediction_gives_the_same_metrics(scene: dict, tmp_path: Path) -> None:
    cog = write_cog(scene["store"], tmp_path / "classes.tif")
    from_cog = evaluate(cog, scene["ref_tif"], tmp_path / "a", preview=False)
    from_store = evaluate(scene["store"], scene["ref_tif"], tmp_path / "b", preview=False)
    assert from_cog["classes"] == from_store["classes"]  # names from the COG's band tags
    for key in ("confusion_matrix", "other_predictions", "per_class", "kappa", "miou", "pixel_counts"):
        assert from_cog[key] == from_store[key]
    assert not (tmp_path / "a" / "preview.png").exists()


def test_plain_geotiff_prediction_without_tags(scene: dict, tmp_path: Path) -> None:
    pred = np.where(scene["pred"] == 255, 0, scene["pred"]).astype(np.int16)  # nodata 0, other dtype
    path = tmp_path / "pred.tif"
    write_tif(path, pred, UTM, TRANSFORM, nodata=0)
    metrics = evaluate(path, scene["ref_tif"], tmp_path / "e", window=700, preview=False)
    # without tags the prediction's values are the classes: 2 is a class now, not "other"
    assert [c["value"] for c in metrics["classes"]] == [1, 2, 3, 5, 7]
    assert metrics["other_predictions"] == [0] * 5
    ref = reference_on_grid(scene["ref_tif"], window=700)
    assert metrics["pixel_counts"]["evaluated"] == np.count_nonzero((ref != 0) & (pred != 0))


def test_errors(scene: dict, tmp_path: Path) -> None:
    with pytest.raises(MissingInputError):
        evaluate(tmp_path / "none.zarr", scene["ref_tif"], tmp_path)
    with pytest.raises(MissingInputError):
        evaluate(scene["store"], tmp_path / "none.tif", tmp_path)
    empty = tmp_path / "empty.zarr"
    make_store(empty, 64, 64, block=64)
    with pytest.raises(MissingInputError, match="segpipe predict"):
        evaluate(empty, scene["ref_tif"], tmp_path)
    far = tmp_path / "far.tif"
    write_tif(far, np.ones((10, 10), np.uint8), "EPSG:4326", Affine(0.01, 0, 10.0, 0, -0.01, 50.0))
    with pytest.raises(LabelsError, match="overlap"):
        evaluate(scene["store"], far, tmp_path)
    blank = tmp_path / "blank.tif"
    write_tif(blank, np.zeros((H, W), np.uint8), UTM, TRANSFORM)
    with pytest.raises(LabelsError, match="no labelled pixel"):
        evaluate(scene["store"], blank, tmp_path)
    west = tmp_path / "west.tif"
    write_tif(west, np.ones((H, 64), np.uint8), UTM, TRANSFORM)  # labels only where no prediction
    with pytest.raises(LabelsError, match="no data"):
        evaluate(scene["store"], west, tmp_path)
    assert not (tmp_path / "metrics.json").exists()


def test_preview_shows_the_image_of_an_rgb_store(tmp_path: Path) -> None:
    import matplotlib.image

    store = tmp_path / "rgb.zarr"
    make_store(store, 200, 300, block=128, bands=("Blue", "Green", "Red", "NIR"))
    assert read_region_info(store).nodata == 0
    pred = np.full((200, 300), 3, np.uint8)
    fill_classes(store, pred)
    labels = tmp_path / "labels.tif"
    halves = np.where(np.arange(300) < 150, 3, 1).astype(np.uint8)
    write_tif(labels, np.repeat(halves[None], 200, axis=0), UTM, TRANSFORM)
    metrics = evaluate(store, labels, tmp_path / "out")
    assert metrics["overall_accuracy"] == 0.5
    assert metrics["per_class"][0]["recall"] == 0.0 and metrics["per_class"][1]["recall"] == 1.0
    three_panels = matplotlib.image.imread(tmp_path / "out" / "preview.png")
    make_store(store, 200, 300, block=128)  # bands without colour names: no image panel
    fill_classes(store, pred)
    evaluate(store, labels, tmp_path / "out")
    two_panels = matplotlib.image.imread(tmp_path / "out" / "preview.png")
    assert three_panels.shape[1] > two_panels.shape[1] * 1.15  # image, prediction, reference, disagreement


def test_loss_curve_plot(tmp_path: Path) -> None:
    history = [
        {"epoch": 1, "train_loss": 1.2, "valid_loss": 1.1, "valid_miou": 0.2},
        {"epoch": 2, "train_loss": 0.8, "valid_loss": None, "valid_miou": float("nan")},
        {"epoch": 3, "train_loss": 0.5, "valid_loss": 0.7, "valid_miou": 0.5},
    ]
    path = plot_loss_curve(history, tmp_path / "loss.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
    # The kept epoch is marked: the same curves with epoch 3 kept draw something more.
    marked = plot_loss_curve(history, tmp_path / "kept.png", kept_epoch=3)
    assert marked.read_bytes() != path.read_bytes()


def test_distributed_cluster_gives_the_same_metrics(scene: dict, tmp_path: Path) -> None:
    from distributed import Client, LocalCluster

    local = evaluate(scene["store"], scene["gpkg"], tmp_path / "local", preview=False)
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    with cluster, Client(cluster):
        remote = evaluate(scene["store"], scene["gpkg"], tmp_path / "remote", preview=False, window=512)
    assert remote == local


def read_points(path: Path) -> np.ndarray:
    return np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2)


@pytest.mark.parametrize("sampling", ["stratified", "equalized", "random"])
def test_points_confusion_equals_numpy_on_the_same_points(scene: dict, tmp_path: Path, sampling: str) -> None:
    out = tmp_path / sampling
    metrics = evaluate(
        scene["store"], scene["ref_tif"], out, points=3000, sampling=sampling, seed=7, window=512
    )
    ref = reference_on_grid(scene["ref_tif"], window=512)
    pred = scene["pred"]
    pts = read_points(out / "points.csv")
    rows, cols = pts[:, 0].astype(int), pts[:, 1].astype(int)
    assert len(pts) == 3000 == metrics["assessment"]["points"]
    assert len(set(zip(rows.tolist(), cols.tolist(), strict=True))) == 3000  # without replacement
    np.testing.assert_array_equal(pts[:, 4], ref[rows, cols])  # the values at the coordinates
    np.testing.assert_array_equal(pts[:, 5], pred[rows, cols])
    assert ((ref[rows, cols] != 0) & (pred[rows, cols] != 255)).all()  # only evaluable pixels
    xs, ys = (TRANSFORM * Affine.translation(0.5, 0.5)) * (cols + 0.0, rows + 0.0)
    np.testing.assert_allclose(pts[:, 2], xs) and np.testing.assert_allclose(pts[:, 3], ys)
    values = [1, 3, 5, 7]
    cm, other = direct_metrics(pred[rows, cols], ref[rows, cols], values)
    assert metrics["confusion_matrix"] == cm.tolist() and metrics["other_predictions"] == other
    assert metrics["pixels"] == 3000
    assert metrics["overall_accuracy"] == np.count_nonzero(pred[rows, cols] == ref[rows, cols]) / 3000
    per = {s["value"]: s["points"] for s in metrics["assessment"]["per_stratum"]}
    evaluable = (ref != 0) & (pred != 255)
    strata = {v: int(np.count_nonzero(evaluable & (pred == v))) for v in (1, 2, 3, 7)}
    drawn = {v: int(np.count_nonzero(pred[rows, cols] == v)) for v in (1, 2, 3, 7)}
    if sampling == "random":
        assert per == {None: 3000}
    else:
        assert per == drawn
    if sampling == "stratified":
        total = sum(strata.values())
        assert all(abs(drawn[v] - 3000 * strata[v] / total) < 1 for v in strata)
    if sampling == "equalized":
        assert drawn == {1: 750, 2: 750, 3: 750, 7: 750}
        # the area-weighted estimate re-weights strata by their share of the evaluable pixels
        acc = {v: np.mean(ref[rows, cols][pred[rows, cols] == v] == v) for v in strata}
        weighted = sum(strata[v] / sum(strata.values()) * acc[v] for v in strata)
        assert metrics["assessment"]["overall_accuracy_area_weighted"] == pytest.approx(weighted, rel=1e-12)
    # deterministic given the seed, different with another seed
    again = evaluate(
        scene["store"],
        scene["ref_tif"],
        tmp_path / "again",
        points=3000,
        sampling=sampling,
        seed=7,
        window=512,
        preview=False,
    )
    assert again == {**metrics, "prediction": again["prediction"]}
    np.testing.assert_array_equal(read_points(tmp_path / "again" / "points.csv"), pts)
    evaluate(
        scene["store"],
        scene["ref_tif"],
        tmp_path / "other",
        points=3000,
        sampling=sampling,
        seed=8,
        window=512,
        preview=False,
    )
    assert not np.array_equal(read_points(tmp_path / "other" / "points.csv"), pts)
    report = (out / "report.md").read_text()
    assert f"**3,000 points** (3,000 requested), **{sampling}** random sampling, seed 7" in report


def test_points_on_a_distributed_cluster_are_the_same(scene: dict, tmp_path: Path) -> None:
    from distributed import Client, LocalCluster

    local = evaluate(scene["store"], scene["gpkg"], tmp_path / "l", points=500, seed=3, preview=False)
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    with cluster, Client(cluster):
        remote = evaluate(scene["store"], scene["gpkg"], tmp_path / "r", points=500, seed=3, preview=False)
    assert remote == local
    assert (tmp_path / "l" / "points.csv").read_text() == (tmp_path / "r" / "points.csv").read_text()


def test_bad_points_arguments(scene: dict, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="sampling"):
        evaluate(scene["store"], scene["ref_tif"], tmp_path, points=10, sampling="systematic")
    with pytest.raises(InputError, match="points"):
        evaluate(scene["store"], scene["ref_tif"], tmp_path, points=0)
    many = evaluate(scene["store"], scene["ref_tif"], tmp_path / "all", points=10_000_000, preview=False)
    assert many["assessment"]["points"] == many["pixel_counts"]["evaluated"]  # capped: every evaluable pixel
    assert (
        many["confusion_matrix"]
        == evaluate(scene["store"], scene["ref_tif"], tmp_path / "d")["confusion_matrix"]
    )


def test_preview_is_the_whole_region_decimated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib.image

    import segpipe.plots
    import segpipe.stages.evaluate.assess as ev

    store = tmp_path / "wide.zarr"
    make_store(store, 300, 2100, block=256, bands=("Red", "Green", "Blue"))
    pred = blocky(np.random.default_rng(1), (300, 2100), [1, 3], 40)
    pred[:, :100] = 255
    fill_classes(store, pred)
    labels = tmp_path / "labels.tif"
    ref = pred.copy()
    ref[:, 1500:] = np.where(pred[:, 1500:] == 1, 3, 1)  # the east disagrees everywhere
    ref[ref == 255] = 0
    write_tif(labels, ref, UTM, TRANSFORM)
    seen = {}
    real = segpipe.plots.plot_preview

    def spy(rgb, prediction, reference, classes, path, **kw):  # type: ignore[no-untyped-def]
        seen.update(rgb=rgb, prediction=prediction, reference=reference, **kw)
        return real(rgb, prediction, reference, classes, path, **kw)

    monkeypatch.setattr(ev, "plot_preview", spy)
    monkeypatch.setattr(ev, "preview_step", lambda h, w: 3)  # small region: force decimation
    evaluate(store, labels, tmp_path / "out", window=512)
    np.testing.assert_array_equal(seen["prediction"], pred[::3, ::3])  # whole region, decimated
    np.testing.assert_array_equal(seen["reference"], ref[::3, ::3])
    assert seen["rgb"].shape == (100, 700, 3) and seen["disagreement"] is True
    png = matplotlib.image.imread(tmp_path / "out" / "preview.png")[..., :3]
    magenta = np.all(np.abs(png - np.array([1.0, 0.0, 1.0])) < 0.03, axis=-1).sum()
    assert magenta > 3000  # the disagreement panel shows the east in magenta
    ref_same = np.where(pred == 255, 0, pred).astype(np.uint8)
    write_tif(labels, ref_same, UTM, TRANSFORM)
    evaluate(store, labels, tmp_path / "same", window=512)
    png = matplotlib.image.imread(tmp_path / "same" / "preview.png")[..., :3]
    assert np.all(np.abs(png - np.array([1.0, 0.0, 1.0])) < 0.03, axis=-1).sum() < 500  # legend swatch only
    report = (tmp_path / "same" / "report.md").read_text()
    assert "![confusion matrix](confusion_matrix.png)" in report and "![preview](preview.png)" in report


# ---- the named pieces of an evaluation -----------------------------------------------------


def test_open_prediction_of_a_store_a_raster_and_a_cog(scene: dict, tmp_path: Path) -> None:
    source, grid_, classes, block = open_prediction(scene["store"])
    assert source == PredictionSource(str(scene["store"]), "store", "classes")
    assert (grid_.height, grid_.width, block, classes) == (H, W, 512, list(CLASSES))
    plain = tmp_path / "plain.tif"
    write_tif(plain, np.ones((H, W), np.int16), UTM, TRANSFORM, nodata=0)
    source, grid_, classes, block = open_prediction(plain)
    assert (source.kind, source.nodata, block, classes) == ("raster", 0.0, 1, [])
    assert grid_.transform == tuple(TRANSFORM)[:6]
    cog = write_cog(scene["store"], tmp_path / "classes.tif")
    assert open_prediction(cog)[2] == list(CLASSES)  # names from the COG's band tags
    empty = tmp_path / "empty.zarr"
    make_store(empty, 64, 64, block=64)
    with pytest.raises(MissingLayerError, match=r"no 'classes' layer: run 'segpipe predict' first"):
        open_prediction(empty)
    two = tmp_path / "two.tif"
    profile = {"driver": "GTiff", "height": 4, "width": 4, "count": 2, "dtype": "uint8", "crs": UTM}
    with rasterio.open(two, "w", **profile, transform=TRANSFORM) as dst:
        dst.write(np.ones((2, 4, 4), np.uint8))
    with pytest.raises(InputError, match=r"2 band\(s\) of uint8"):
        open_prediction(two)
    (tmp_path / "notes.txt").write_text("not a raster")
    with pytest.raises(InputError, match="neither a region store nor a raster"):
        open_prediction(tmp_path / "notes.txt")
    with pytest.raises(MissingInputError, match="does not exist"):
        open_prediction(tmp_path / "nothing.tif")


def test_read_prediction_of_a_box(scene: dict, tmp_path: Path) -> None:
    box = Box(1000, 1200, 1500, 1300)
    store_source = open_prediction(scene["store"])[0]
    np.testing.assert_array_equal(read_prediction(store_source, box), scene["pred"][box.slices])
    pred = np.where(scene["pred"] == 255, 0, scene["pred"]).astype(np.int16)
    path = tmp_path / "pred.tif"
    write_tif(path, pred, UTM, TRANSFORM, nodata=0)
    read = read_prediction(open_prediction(path)[0], Box(0, 0, 10, 100))
    np.testing.assert_array_equal(read, np.where(pred[:10, :100] == 0, 255, pred[:10, :100]))  # nodata as 255


def test_preview_rgb_is_decimated_on_the_global_lattice(tmp_path: Path) -> None:
    store = tmp_path / "rgb.zarr"
    make_store(store, 100, 90, block=64, bands=("Blue", "Green", "Red"))
    fill_classes(store, np.ones((100, 90), np.uint8))
    source = open_prediction(store)[0]
    image = np.asarray(zarr.open_array(str(store / "image"))[:])
    rgb = preview_rgb(source, Box(10, 20, 50, 90), 3)
    assert rgb is not None and rgb.shape == (13, 23, 3)
    expected = image[[2, 1, 0]][:, 12:50:3, 21:90:3].transpose(1, 2, 0).astype(float)
    np.testing.assert_array_equal(rgb, np.where(expected == 0, np.nan, expected))
    make_store(store, 100, 90, block=64)  # no colour names: no image
    fill_classes(store, np.ones((100, 90), np.uint8))
    assert preview_rgb(source, Box(0, 0, 10, 10), 1) is None


def test_check_request_refuses_before_the_long_pass(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="is a file"):
        ev._check_request(tmp_path / "file", None)
    with pytest.raises(InputError, match="sampling"):
        ev._check_request(tmp_path, ev.PointRequest(10, "systematic", 0))
    with pytest.raises(InputError, match="points"):
        ev._check_request(tmp_path, ev.PointRequest(0, "random", 0))
    ev._check_request(tmp_path / "new", ev.PointRequest(10, "equalized", 0))


def test_window_pass_and_full_pass(scene: dict) -> None:
    pred_source, grid_ = open_prediction(scene["store"])[:2]
    labels = open_labels(scene["ref_tif"])
    boxes = list(iter_boxes(H, W, 1024))
    ref = reference_on_grid(scene["ref_tif"])
    hist, counts, pieces = ev._window_pass(pred_source, labels, grid_, boxes[1], 0)
    expected = joint_histogram(scene["pred"][boxes[1].slices], ref[boxes[1].slices])
    np.testing.assert_array_equal(hist, expected)
    np.testing.assert_array_equal(counts[0], strata_counts(expected))
    assert pieces == [None]  # no preview
    hist, counts, pieces = ev._full_pass(pred_source, labels, grid_, boxes, 5)
    np.testing.assert_array_equal(hist, joint_histogram(scene["pred"], ref))
    assert len(counts) == len(pieces) == 4
    assert [(p[0], p[1]) for p in pieces if p is not None] == [(b.y0, b.x0) for b in boxes]  # window order
    last = pieces[3]
    assert last is not None
    np.testing.assert_array_equal(last[2], decimate(scene["pred"][boxes[3].slices], 1024, 1024, 5))


def test_evaluability_checks() -> None:
    hist = np.zeros((256, 256), np.int64)
    with pytest.raises(LabelsError, match="no labelled pixel"):
        ev._check_labelled(hist, "p", "r")
    hist[3, 255] = 10  # labelled, but nothing predicted there
    ev._check_labelled(hist, "p", "r")
    classes = [ClassInfo(3, "water", "#1f77b4")]
    with pytest.raises(LabelsError, match="no data"):
        ev._check_predicted(hist, classes, "p", "r")
    hist[3, 3] = 1
    ev._check_predicted(hist, classes, "p", "r")


def test_pixel_counts_and_metrics() -> None:
    hist = np.zeros((256, 256), np.int64)
    hist[0, 1] = 100  # unlabelled
    hist[1, 1], hist[1, 2], hist[1, 9], hist[1, 255] = 5, 2, 1, 4
    hist[2, 2] = 3
    assert ev._pixel_counts(hist, [1, 2]) == {
        "grid": 115,
        "reference_labelled": 15,
        "evaluated": 11,
        "labelled_without_prediction": 4,
        "other_predictions": 1,
    }
    classes = [ClassInfo(1, "forest", "#1f7a1f"), ClassInfo(2, "water", "#1f77b4")]
    cm = confusion_from_histogram(hist, [1, 2])
    metrics = ev._metrics("p.zarr", "r.tif", hist, cm, classes, {"mode": "pixels"})
    assert list(metrics)[:2] == ["prediction", "reference"]
    assert list(metrics)[-2:] == ["assessment", "pixel_counts"]
    assert metrics["classes"][1] == {"value": 2, "name": "water", "colour": "#1f77b4"}
    assert metrics["overall_accuracy"] == 8 / 11 and metrics["other_predictions"] == [1, 0]
    assert metrics["per_class"][1]["precision"] == 0.6


def test_points_file_and_summary(tmp_path: Path) -> None:
    points = np.array([[0, 0, 1, 1], [2, 3, 3, 1]], np.int64)
    ev._write_points(tmp_path / "points.csv", points, grid())
    assert (tmp_path / "points.csv").read_text().splitlines() == [
        "row,col,x,y,reference,prediction",
        "0,0,500015.0,3999985.0,1,1",
        "2,3,500105.0,3999925.0,3,1",
    ]
    totals = np.zeros(257, np.int64)
    totals[1], totals[256] = 40, 40
    targets = np.zeros(257, np.int64)
    targets[1] = 2
    classes = [ClassInfo(1, "forest", "#1f7a1f")]
    summary = ev._points_summary(points, targets, totals, classes, ev.PointRequest(5, "stratified", 3))
    assert summary["per_stratum"] == [{"value": 1, "name": "forest", "pixels": 40, "points": 2}]
    assert (summary["requested"], summary["points"], summary["seed"]) == (5, 2, 3)
    assert summary["overall_accuracy_area_weighted"] == 0.5
    targets[256] = 2
    summary = ev._points_summary(points, targets, totals, classes, ev.PointRequest(2, "random", 0))
    everything = {"value": None, "name": "all evaluable pixels", "pixels": 40, "points": 2}
    assert summary["per_stratum"] == [everything]


def test_write_outputs_without_a_preview(tmp_path: Path) -> None:
    hist = np.zeros((256, 256), np.int64)
    hist[1, 1], hist[2, 1] = 5, 2
    classes = [ClassInfo(1, "forest", "#1f7a1f"), ClassInfo(2, "water", "#1f77b4")]
    cm = confusion_from_histogram(hist, [1, 2])
    metrics = ev._metrics("p.zarr", "r.tif", hist, cm, classes, {"mode": "pixels"})
    ev._write_outputs(tmp_path, metrics, cm, classes, None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["confusion_matrix.png", "metrics.json", "report.md"]
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    assert "![preview](preview.png)" not in (tmp_path / "report.md").read_text()


def test_waves_of_one_window_give_the_same_report(
    scene: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Windows are computed a wave at a time (segpipe.waves); the merge keeps window order."""
    import segpipe.waves

    options = {"points": 800, "seed": 5, "window": 512}
    one = evaluate(scene["store"], scene["ref_tif"], tmp_path / "one", **options)
    graphs: list[int] = []
    compute = ev.compute

    def spy(*collections: object) -> tuple[object, ...]:
        graphs.append(sum(len(c.__dask_graph__()) for c in collections))  # type: ignore[attr-defined]
        return compute(*collections)

    monkeypatch.setattr(segpipe.waves, "WAVE_BLOCKS", 1)
    monkeypatch.setattr(ev, "compute", spy)
    waved = evaluate(scene["store"], scene["ref_tif"], tmp_path / "waves", **options)
    assert len(graphs) > 2 and max(graphs) == 1  # one window per graph
    for key in ("confusion_matrix", "other_predictions", "pixels", "overall_accuracy", "assessment"):
        assert waved[key] == one[key], key
    np.testing.assert_array_equal(read_points(tmp_path / "waves" / "points.csv"),
                                  read_points(tmp_path / "one" / "points.csv"))
    previews = [np.asarray(Image.open(tmp_path / run / "preview.png")) for run in ("one", "waves")]
    np.testing.assert_array_equal(*previews)
