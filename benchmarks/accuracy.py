"""Accuracy table on every real labelled scene, through the segpipe CLI as a user runs it.

Run (one default network run of a scene took about 23 minutes on 2 shared cores, so the whole
table, 4 data sets x 5 seeds x 3 configs, is a night's run; one data set and seed is a smoke run):

    .venv/bin/python benchmarks/accuracy.py
    .venv/bin/python benchmarks/accuracy.py --datasets spacenet4-atlanta --configs default,forest --quick

For each data set (tests/data/<folder>, with the split its README agrees), seed and
configuration, it runs ``segpipe ingest`` (once per data set), ``segpipe train --seed S``
with the configuration's options, ``segpipe predict`` and ``segpipe evaluate`` as
subprocesses. Training labels are the data set's labels with the test part set to 0; the
reference is the test part of the data set's reference. Beside them, a plain scikit-learn
``RandomForestClassifier(n_estimators=100, n_jobs=-1, random_state=seed)`` is fitted on the
band values of the same training pixels and scored on the same test pixels.

Every score uses one mIoU: the mean IoU over the classes present in the reference's test
part (0 excluded), computed here from segpipe's per-class counts (``metrics.json``) or from
the baseline's confusion matrix. CPU seconds of ``segpipe train`` are the child process's
user + system time (``resource.getrusage(RUSAGE_CHILDREN)``), of the baseline the fit's
(``RUSAGE_SELF``, its threads included).

Outputs: ``benchmarks/results/accuracy.json`` (every run; runs of other data sets, configs
or seeds already there are kept unless ``--fresh``), the table between
``<!-- accuracy:start -->`` and ``<!-- accuracy:end -->`` in ``docs/benchmarks.md``, and
``docs/img/accuracy_<data set>.png`` (image, reference and each configuration's seed-0
prediction) when seed 0 ran. Progress goes to stderr; each command's output to
``<work>/logs/``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
RESULTS = ROOT / "benchmarks" / "results" / "accuracy.json"
DOC = ROOT / "docs" / "benchmarks.md"
IMG = ROOT / "docs" / "img"
START, END = "<!-- accuracy:start -->", "<!-- accuracy:end -->"
BASELINE = "sklearn_rf"

# A configuration is the options it adds to `segpipe train --store ... --out ... --seed S`.
CONFIGS: dict[str, list[str]] = {
    "default": [],
    "forest": ["--arch", "random_forest"],
    "auto": ["--arch", "auto"],
    # A rare foreground's defaults before session 27 (no pasting, 1e-3, the best epoch kept).
    "no_paste_lr1_best": ["--copy-paste", "0", "--lr", "0.001", "--keep", "best"],
    "auto_no_paste_lr1_best": ["--arch", "auto", "--copy-paste", "0", "--lr", "0.001", "--keep", "best"],
    # Each option given, so that the rows mean the same whichever defaults a later segpipe has.
    "copy_paste": ["--copy-paste", "0.5", "--lr", "0.001", "--keep", "best"],
    "copy_paste_lr2_last": ["--copy-paste", "0.5", "--lr", "0.002", "--keep", "last"],
    "lr2_last": ["--copy-paste", "0", "--lr", "0.002", "--keep", "last"],
    "chips8k": ["--samples-per-epoch", "128", "--epochs", "64"],  # 8,192 chips, twice a foreground's
    "linear": ["--arch", "linear"],
    "members2": ["--members", "2"],
    "balanced": ["--balanced-sampling"],
    "linear_start": ["--linear-start"],
    "linear_start_lr3": ["--linear-start", "--lr", "0.0003"],
    "linear_start_lr3_last": ["--linear-start", "--lr", "0.0003", "--keep", "last"],
    "linear_start_lr5_last": ["--linear-start", "--lr", "0.0005", "--keep", "last"],
    "linear_start_lr5": ["--linear-start", "--lr", "0.0005"],
    "lovasz": ["--overlap-loss", "lovasz"],
    "linear_start_clip1": ["--linear-start", "--clip-grad-norm", "1.0"],
    "linear_start_lr3_last_e48": ["--linear-start", "--lr", "0.0003", "--keep", "last", "--epochs", "48"],
    "linear_start_lr3_last_e64": ["--linear-start", "--lr", "0.0003", "--keep", "last", "--epochs", "64"],
    "all_labels": ["--valid-fraction", "0"],
    "one_view": [],  # the default training, predicted once a window (PREDICT_OPTIONS)
    "auto_one_view": ["--arch", "auto"],
    "linear_start_lr3_last_all": [
        "--linear-start", "--lr", "0.0003", "--keep", "last", "--valid-fraction", "0",
    ],
    "ema99": ["--ema", "0.99"],  # the default with a moving average of the weights kept
    # two networks averaged: one on the split (the package's held-out scores), one on every label
    "refit2": ["--members", "2", "--refit"],
    # the refit pair and one more network on every label (a third training)
    "refit3": ["--members", "3", "--refit"],
    # one network, today's other defaults: the control for other networks on the building scene
    "single": ["--members", "1"],
    "deeplabv3plus_single": ["--arch", "deeplabv3plus", "--members", "1"],
    "resnet34_single": ["--encoder", "resnet34", "--members", "1"],
    "deeplabv3plus": ["--arch", "deeplabv3plus"],  # with the default members (three on small splits)
}
# Options of ``segpipe predict`` by config (none: predict's defaults).
PREDICT_OPTIONS: dict[str, list[str]] = {"one_view": ["--no-tta"], "auto_one_view": ["--no-tta"]}
# ``--arch auto`` against the default network predicted alike: (auto's config, the network's, how).
AUTO_PAIRS = (("auto", "default", "predict's default"), ("auto_one_view", "one_view", "`--no-tta`"))
# ``--arch auto`` keeps its candidates in ``<model>/candidates/<name>``: each is also
# predicted and scored, as config ``auto/<name>``, so one run shows what auto chose from.
CANDIDATES = "candidates"
ENSEMBLE = "ensemble"


@dataclass(frozen=True)
class Dataset:
    """A labelled scene and how it is split (the split column comes from its README)."""

    folder: str
    train_labels: str  # label raster of the folder the training part is cut from
    reference: str  # label raster of the folder the test part is cut from
    classes: tuple[tuple[int, str, str], ...]  # (value, name, colour)
    rgb: tuple[int, ...]  # 1-based bands shown in the figure (one band: grey)
    foreground: int | None = None  # a rare class reported on its own


_NC_CLASSES = (
    (1, "developed", "#e60000"),
    (2, "agriculture", "#ffd200"),
    (3, "herbaceous", "#bee66e"),
    (4, "shrubland", "#966e28"),
    (5, "forest", "#146e1e"),
    (6, "water", "#285adc"),
    (7, "sediment", "#c8c8c8"),
)
DATASETS: dict[str, Dataset] = {
    "nc-landsat7-dense": Dataset("nc-landsat7", "labels.tif", "labels.tif", _NC_CLASSES, (3, 2, 1)),
    "nc-landsat7-polygons": Dataset(
        "nc-landsat7", "labels_polygons_sparse.tif", "labels.tif", _NC_CLASSES, (3, 2, 1)
    ),
    "spacenet4-atlanta": Dataset(
        "spacenet4-atlanta",
        "labels.tif",
        "labels.tif",
        ((1, "background", "#d9d9d9"), (2, "building", "#e31a1c")),
        (1,),
        foreground=2,
    ),
    "s2-brandenburg": Dataset(
        "s2-brandenburg",
        "labels.tif",
        "labels.tif",
        (
            (1, "farm", "#ffd92f"),
            (2, "meadow", "#a6d854"),
            (3, "grass", "#66c2a5"),
            (4, "scrub", "#b15928"),
            (5, "forest", "#1b7837"),
            (6, "wetland", "#8da0cb"),
            (7, "water", "#1f78b4"),
            (8, "residential", "#e41a1c"),
        ),
        (4, 3, 2),
    ),
}


def log(message: str) -> None:
    """A progress line on stderr."""
    print(f"[accuracy {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def split_x(folder: Path) -> int:
    """The agreed split column, as the data set's README states it."""
    found = re.search(r"Train on image columns `x < (\d+)`", (folder / "README.md").read_text())
    if not found:
        raise SystemExit(f"{folder}/README.md states no split ('Train on image columns `x < N`')")
    return int(found.group(1))


def read_band(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """The first band of a raster and its profile."""
    with rasterio.open(path) as ds:
        return ds.read(1), dict(ds.profile)


def masked_copy(src: Path, dst: Path, x: int, keep: str) -> np.ndarray:
    """Write ``src`` with the columns outside ``keep`` ("train": x < split, "test") set to 0."""
    data, profile = read_band(src)
    if keep == "train":
        data[:, x:] = 0
    else:
        data[:, :x] = 0
    profile.update(driver="GTiff", nodata=0, count=1)
    with rasterio.open(dst, "w", **profile) as out:
        out.write(data, 1)
    return data


# ---- one data set: inputs, segpipe runs, the baseline -----------------------------------------


@dataclass
class Prepared:
    """A data set's files in the work folder and the arrays the baseline and figure need."""

    name: str
    dataset: Dataset
    work: Path
    store: Path
    reference: Path
    train: np.ndarray  # training labels (test part 0)
    test: np.ndarray  # reference test part (training part 0)
    split: int


def segpipe_exe() -> str:
    """The segpipe entry point beside this interpreter (the project's virtualenv), else on PATH."""
    beside = Path(sys.executable).with_name("segpipe")
    return str(beside) if beside.exists() else shutil.which("segpipe") or "segpipe"


def run_cli(args: list[str], log_file: Path, timeout: float) -> tuple[float, float]:
    """Run ``segpipe <args>``; return (CPU s, wall s) of the child; raise with its output's tail."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with log_file.open("w") as out:
        done = subprocess.run(
            [segpipe_exe(), *args], stdout=out, stderr=subprocess.STDOUT, timeout=timeout, check=False
        )
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if done.returncode != 0:
        tail = log_file.read_text()[-1500:]
        raise RuntimeError(f"segpipe {args[0]} exited {done.returncode}:\n{tail}")
    return cpu, wall


def prepare(name: str, work_root: Path, timeout: float) -> Prepared:
    """Cut the training labels and test reference, write classes.json and ingest the store once."""
    ds = DATASETS[name]
    folder = DATA / ds.folder
    work = work_root / name
    (work / "logs").mkdir(parents=True, exist_ok=True)
    x = split_x(folder)
    train = masked_copy(folder / ds.train_labels, work / "labels_train.tif", x, "train")
    test = masked_copy(folder / ds.reference, work / "reference_test.tif", x, "test")
    classes = [{"value": v, "name": n, "colour": c} for v, n, c in ds.classes]
    (work / "classes.json").write_text(json.dumps(classes))
    store = work / "store.zarr"
    log(f"{name}: ingest ({int((train > 0).sum()):,} training, {int((test > 0).sum()):,} test pixels)")
    run_cli(
        [
            "ingest",
            str(folder / "image.tif"),
            "--out",
            str(store),
            "--labels",
            str(work / "labels_train.tif"),
            "--classes",
            str(work / "classes.json"),
            "--overwrite",
        ],
        work / "logs" / "ingest.log",
        timeout,
    )
    return Prepared(name, ds, work, store, work / "reference_test.tif", train, test, x)


def scores_from_counts(per_class: list[dict[str, Any]]) -> tuple[float, dict[str, float], float]:
    """(mIoU, IoU by class name, overall accuracy) over the classes the reference holds (support > 0)."""
    present = [c for c in per_class if c["support"] > 0]
    ious = {
        c["name"]: c["true_positive"] / (c["support"] + c["predicted"] - c["true_positive"]) for c in present
    }
    total = sum(c["support"] for c in present)
    correct = sum(c["true_positive"] for c in present)
    miou = float(np.mean(list(ious.values()))) if ious else float("nan")
    return miou, ious, correct / total if total else float("nan")


def counts(
    pred: np.ndarray, ref: np.ndarray, classes: tuple[tuple[int, str, str], ...]
) -> list[dict[str, Any]]:
    """Per-class support, predicted and true positives over the labelled reference pixels."""
    where = ref > 0
    p, r = pred[where], ref[where]
    return [
        {
            "name": name,
            "support": int((r == value).sum()),
            "predicted": int((p == value).sum()),
            "true_positive": int(((r == value) & (p == value)).sum()),
        }
        for value, name, _ in classes
    ]


def run_segpipe(
    prep: Prepared, config: str, seed: int, timeout: float
) -> tuple[list[dict[str, Any]], np.ndarray | None]:
    """Train, predict and evaluate one configuration and seed.

    Returns:
        The config's row (then one ``auto/<name>`` row per candidate of ``--arch auto``),
        each without the run's identity, and the kept model's predicted classes.
    """
    tag = f"{config}_s{seed}"
    model, logs = prep.work / f"model_{tag}", prep.work / "logs"
    shutil.rmtree(model, ignore_errors=True)
    log(f"{prep.name}: train {config} seed {seed}")
    train_cpu, train_wall = run_cli(
        ["train", str(prep.store), "--out", str(model), "--seed", str(seed), *CONFIGS[config]],
        logs / f"train_{tag}.log",
        timeout,
    )
    log(
        f"{prep.name}: predict {config} seed {seed} (trained: {train_wall:.0f} s wall, {train_cpu:.0f} s CPU)"
    )
    selection = json.loads((model / "model.json").read_text()).get("training", {}).get("selection", {})
    rows = []
    for name, package in _candidates(model):
        row = score_package(prep, package, f"{tag}_{name}", timeout)
        compared = selection.get("models", {}).get(name, {})
        rows.append(
            {"config": f"{config}/{name}", "train_cpu_s": None, "train_wall_s": compared.get("seconds")}
            | {"valid_miou": compared.get("valid_miou"), "kept": name == selection.get("kept")}
            | row
        )
    # last: the store's classes layer is the kept model's
    row = score_package(prep, model, tag, timeout, PREDICT_OPTIONS.get(config, []))
    first = {"train_cpu_s": train_cpu, "train_wall_s": train_wall, "kept": selection.get("kept")}
    return [first | row, *rows], read_classes_layer(prep.store)


def _candidates(model: Path) -> list[tuple[str, Path]]:
    """The candidate packages ``--arch auto`` kept beside its choice (none for other configs).

    Auto writes the forest and network's ensemble only when it keeps it; the ensemble is
    made here otherwise (``candidates/ensemble``, as auto would have made it), so every
    seed shows all three on the test part and selection rules can be judged afterwards.
    """
    folder = model / CANDIDATES
    if not folder.is_dir():
        return []
    found = [p for p in sorted(folder.iterdir()) if (p / "model.json").exists()]
    if len(found) == 2 and ENSEMBLE not in {p.name for p in found}:
        from segpipe.models.combine import make_ensemble

        found.append(make_ensemble(found, folder / ENSEMBLE))
    return [(p.name, p) for p in sorted(found)]


def score_package(
    prep: Prepared, model: Path, tag: str, timeout: float, predict_args: Sequence[str] = ()
) -> dict[str, Any]:
    """Predict the store with ``model`` (and ``predict_args``) and score its test part.

    Returns:
        mIoU, IoU by class, overall accuracy, segpipe's own mIoU and predict's wall seconds.
    """
    report, logs = prep.work / f"report_{tag}", prep.work / "logs"
    shutil.rmtree(report, ignore_errors=True)
    _, predict_wall = run_cli(
        ["predict", str(prep.store), "--model", str(model), "--force", *predict_args],
        logs / f"predict_{tag}.log",
        timeout,
    )
    run_cli(
        ["evaluate", str(prep.store), "--reference", str(prep.reference), "--out", str(report)],
        logs / f"evaluate_{tag}.log",
        timeout,
    )
    metrics = json.loads((report / "metrics.json").read_text())
    miou, ious, accuracy = scores_from_counts(metrics["per_class"])
    return {
        "test_miou": miou,
        "test_iou": ious,
        "overall_accuracy": accuracy,
        "segpipe_miou": metrics.get("miou"),
        "predict_wall_s": predict_wall,
    }


def read_classes_layer(store: Path) -> np.ndarray | None:
    """The store's predicted ``classes`` layer (None where it cannot be read)."""
    import zarr

    try:
        layer = zarr.open_group(str(store), mode="r")["classes"]
        if not isinstance(layer, zarr.Array):
            return None
        return np.asarray(layer[...]).squeeze()
    except (KeyError, FileNotFoundError, ValueError):
        return None


def image_pixels(prep: Prepared) -> tuple[np.ndarray, np.ndarray]:
    """(bands, y, x) image and its valid mask, as segpipe reads it (a pixel with any band nodata is out)."""
    from segpipe.io.store import valid_mask

    with rasterio.open(DATA / prep.dataset.folder / "image.tif") as ds:
        image = ds.read()
        return image, valid_mask(image, ds.nodata)


def run_baseline(prep: Prepared, seed: int) -> tuple[dict[str, Any], np.ndarray]:
    """The plain scikit-learn forest on the band values of the same training and test pixels."""
    from sklearn.ensemble import RandomForestClassifier

    image, valid = image_pixels(prep)
    fit_at = (prep.train > 0) & valid
    forest = RandomForestClassifier(n_estimators=100, n_jobs=-1, random_state=seed)
    log(f"{prep.name}: {BASELINE} seed {seed} on {int(fit_at.sum()):,} pixels")
    before = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    forest.fit(image[:, fit_at].T, prep.train[fit_at])
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF)
    pred = np.zeros(valid.shape, dtype=np.uint8)
    pred[valid] = forest.predict(image[:, valid].T)
    test = np.where(valid, prep.test, 0)  # segpipe's evaluate skips its nodata pixels alike
    miou, ious, accuracy = scores_from_counts(counts(pred, test, prep.dataset.classes))
    row = {
        "test_miou": miou,
        "test_iou": ious,
        "overall_accuracy": accuracy,
        "train_cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
        "train_wall_s": wall,
    }
    return row, pred


# ---- provenance, results file, table, figure ------------------------------------------------


def provenance() -> dict[str, Any]:
    """segpipe version and commit, the machine and the library versions every row carries."""
    import sklearn
    import torch

    from segpipe import __version__

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
        return done.stdout.strip()

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "segpipe_version": __version__,
        "commit": git("rev-parse", "--short", "HEAD")
        + ("+dirty" if git("status", "--porcelain", "-uno") else ""),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{memory:.0f} GiB, {gpu}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "sklearn": sklearn.__version__,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
    }


def merge_rows(new: list[dict[str, Any]], path: Path, fresh: bool) -> list[dict[str, Any]]:
    """Rows of ``path`` not redone by this run (none with ``fresh``), then this run's, in table order."""
    old = [] if fresh or not path.exists() else json.loads(path.read_text())["runs"]
    redone = {(r["dataset"], r["config"], r["seed"]) for r in new}
    rows = [r for r in old if (r["dataset"], r["config"], r["seed"]) not in redone] + new
    order = [*DATASETS], [*CONFIGS, BASELINE]

    def key(r: dict[str, Any]) -> tuple[int, int, str, int]:
        d = order[0].index(r["dataset"]) if r["dataset"] in order[0] else len(order[0])
        parent, _, candidate = r["config"].partition("/")  # auto/<name> right after auto
        c = order[1].index(parent) if parent in order[1] else len(order[1])
        return d, c, candidate, int(r["seed"])

    return sorted(rows, key=key)


def _mean(values: list[float | None]) -> float | None:
    """The mean, or None when a value is missing (an auto candidate's CPU seconds are not its own)."""
    known = [v for v in values if v is not None]
    return None if len(known) < len(values) else float(np.mean(known))


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None or value != value else f"{value:.{digits}f}"


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: per data set x config, test mIoU mean and min-max over seeds, foreground IoU, costs."""
    lines = [
        "| data set | config | seeds | test mIoU mean | min-max | foreground IoU | overall accuracy "
        "| train CPU s / seed | train wall s / seed |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["config"]), []).append(r)
    lines += [_table_row(name, config, group) for (name, config), group in groups.items()]
    return "\n".join(lines)


def auto_summary(rows: list[dict[str, Any]]) -> str:
    """Markdown: per data set, ``auto`` against the better of the forest and the default network.

    The issue's bar: ``--arch auto`` within 0.02 test mIoU of the better of the two. Means
    over each config's seeds; the worst seed compares seeds that ran both sides.
    """
    lines = [
        "| data set | predicted with | auto seeds | auto mean | min-max | forest mean | default network mean "
        "| auto - better | worst seed |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in dict.fromkeys(r["dataset"] for r in rows):
        for auto_config, network, how in AUTO_PAIRS:
            line = _auto_line(rows, name, auto_config, network)
            if line:
                lines.append(f"| {name} | {how} | {line} |")
    return "\n".join(lines)


def _auto_line(rows: list[dict[str, Any]], name: str, auto_config: str, network: str) -> str | None:
    """One data set's auto row: seeds, means, and auto less the better of forest and network."""
    by = {c: _by_seed(rows, name, c) for c in (auto_config, "forest", network)}
    if not by[auto_config] or not (by["forest"] or by[network]):
        return None
    means = {c: float(np.mean(list(v.values()))) if v else None for c, v in by.items()}
    better = max(m for c, m in means.items() if c != auto_config and m is not None)
    gaps = [
        v - max(by[c][seed] for c in ("forest", network) if seed in by[c])
        for seed, v in by[auto_config].items()
        if any(seed in by[c] for c in ("forest", network))
    ]
    auto = list(by[auto_config].values())
    lead = float(np.mean(auto)) - better
    return (
        f"{','.join(map(str, by[auto_config]))} | {_fmt(means[auto_config])} "
        f"| {_fmt(min(auto))}-{_fmt(max(auto))} | {_fmt(means['forest'])} | {_fmt(means[network])} "
        f"| {_signed(lead)} | {_signed(min(gaps))}"
    )


# Selection rules judged on auto's candidates: (name, the rule's pick from valid mIoU by candidate).
RULES: tuple[tuple[str, Any], ...] = (
    ("always the forest", lambda v: "random_forest"),
    ("always the network", lambda v: next(k for k in v if k not in ("random_forest", ENSEMBLE))),
    ("always the ensemble", lambda v: ENSEMBLE),
    ("best single; ensemble if +0.01 (auto's earlier rule)", lambda v: _pick(v, ensemble_margin=0.01)),
    # segpipe.stages.train.select.SINGLE_MARGIN: the rule --arch auto applies now.
    ("ensemble unless a single is +0.02 (auto)", lambda v: _pick(v, ensemble_margin=-0.02)),
    ("... or the other single is 0.1 behind", lambda v: _pick(v, ensemble_margin=-0.02, dominant=0.1)),
)


def _pick(valid: dict[str, float], ensemble_margin: float, dominant: float | None = None) -> str:
    """The best single candidate by validation mIoU, or the ensemble when it is within the margin.

    With ``dominant``, a single model that leads the other by that much is kept alone.
    """
    singles = {k: v for k, v in valid.items() if k != ENSEMBLE}
    best = max(singles, key=lambda k: singles[k])
    lead = singles[best] - min(singles.values())
    if dominant is not None and lead >= dominant:
        return best
    return ENSEMBLE if valid[ENSEMBLE] >= singles[best] + ensemble_margin else best


def rules_summary(rows: list[dict[str, Any]]) -> str:
    """Markdown: per data set and selection rule, the test mIoU of what the rule picks from auto's candidates.

    Uses the seeds whose three candidates (forest, network, ensemble) were all scored;
    the rule sees only their validation mIoU, as ``--arch auto`` does.
    """
    lines = [
        "| data set | predicted with | seeds | rule | test mIoU mean | min-max |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name in dict.fromkeys(r["dataset"] for r in rows):
        for auto_config, _, how in AUTO_PAIRS:
            seeds = _candidate_seeds(rows, name, auto_config)
            for label, rule in RULES if seeds else ():
                picked = [seeds[s][rule({k: v[0] for k, v in seeds[s].items()})][1] for s in sorted(seeds)]
                lines.append(
                    f"| {name} | {how} | {','.join(map(str, sorted(seeds)))} | {label} "
                    f"| {_fmt(float(np.mean(picked)))} | {_fmt(min(picked))}-{_fmt(max(picked))} |"
                )
    return "\n".join(lines)


def _candidate_seeds(
    rows: list[dict[str, Any]], name: str, auto_config: str = "auto"
) -> dict[int, dict[str, tuple[float, float]]]:
    """Per seed, each auto candidate's (validation mIoU, test mIoU), where all three were scored."""
    found: dict[int, dict[str, tuple[float, float]]] = {}
    for r in rows:
        parent, _, candidate = r["config"].partition("/")
        if r["dataset"] == name and parent == auto_config and candidate and r.get("valid_miou") is not None:
            found.setdefault(int(r["seed"]), {})[candidate] = (float(r["valid_miou"]), float(r["test_miou"]))
    return {s: c for s, c in found.items() if len(c) == 3 and ENSEMBLE in c and "random_forest" in c}


def _by_seed(rows: list[dict[str, Any]], name: str, config: str) -> dict[int, float]:
    """Test mIoU by seed of one data set and config (scored runs only)."""
    return {
        int(r["seed"]): float(r["test_miou"])
        for r in rows
        if r["dataset"] == name and r["config"] == config and r.get("status") == "ok"
    }


def _signed(value: float) -> str:
    return f"{value:+.3f}"


def _foreground(name: str) -> str | None:
    """The name of a data set's foreground class, if it has one."""
    ds = DATASETS.get(name)
    return next((n for v, n, _ in ds.classes if v == ds.foreground), None) if ds else None


def _table_row(name: str, config: str, group: list[dict[str, Any]]) -> str:
    """One table line: a data set and config over its seeds (failed seeds counted, not scored)."""
    ok = [r for r in group if r.get("status") == "ok"]
    seeds = ",".join(str(r["seed"]) for r in group)
    if not ok:
        return f"| {name} | {config} | {seeds} | failed | | | | | |"
    if len(ok) < len(group):
        seeds += f" ({len(group) - len(ok)} failed)"
    miou = [r["test_miou"] for r in ok]
    fg = _foreground(name)
    fg_text = f"{fg} {_fmt(float(np.mean([r['test_iou'].get(fg, 0.0) for r in ok])))}" if fg else "-"
    mean = {k: _mean([r.get(k) for r in ok]) for k in ("overall_accuracy", "train_cpu_s", "train_wall_s")}
    return (
        f"| {name} | {config} | {seeds} | {_fmt(float(np.mean(miou)))} | {_fmt(min(miou))}-{_fmt(max(miou))} "
        f"| {fg_text} | {_fmt(mean['overall_accuracy'])} | {_fmt(mean['train_cpu_s'], 0)} "
        f"| {_fmt(mean['train_wall_s'], 0)} |"
    )


def _options(config: str) -> str:
    """A config's options as the table's header states them: train's, then predict's."""
    train, predict = CONFIGS[config], PREDICT_OPTIONS.get(config, [])
    text = f"`{' '.join(train)}`" if train else "no option"
    return f"{text}, predicted with `{' '.join(predict)}`" if predict else text


def section(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The marked section of docs/benchmarks.md: how it was made, then the table."""
    configs = "; ".join(f"`{k}` = {_options(k)}" for k in CONFIGS)
    how = (
        "Written by `benchmarks/accuracy.py` (do not edit by hand). Each data set goes through the CLI "
        "(`segpipe ingest`, `segpipe train --seed S` plus the config's options, `predict` with its "
        "defaults unless the config says otherwise, `evaluate`) "
        "with the left/right split of its README; `sklearn_rf` is a plain `RandomForestClassifier("
        "n_estimators=100, n_jobs=-1, random_state=seed)` on the band values of the same training pixels. "
        "mIoU: mean IoU over the classes present in the reference's test part (0 excluded). Configs: "
        f"{configs}. CPU s: user + system seconds of the `segpipe train` process (of the fit for "
        "`sklearn_rf`); wall s depend on what else the machine ran (load average in the JSON)."
    )
    when = (
        f"Last run {meta['date']} on {meta['machine']}; segpipe {meta['segpipe_version']}, "
        f"commits {', '.join(sorted({r['commit'] for r in rows}))}; every run in "
        "`benchmarks/results/accuracy.json`, figures in `docs/img/accuracy_<data set>.png`."
    )
    heading = "## Accuracy on the real data sets (`benchmarks/accuracy.py`)"
    wrap = textwrap.TextWrapper(width=92, break_on_hyphens=False, break_long_words=False)
    versus = (
        "`--arch auto` against the better of the forest (`--arch random_forest`) and the default "
        "network predicted alike, per data set (the issue's bar: within 0.02); `auto/<name>` and "
        "`auto_one_view/<name>` rows above score each candidate auto trained and compared, on the test part."
    )
    body = [wrap.fill(how), "", wrap.fill(when), "", table(rows)]
    rules = (
        "What `--arch auto` could keep, judged on the test part: each selection rule sees the "
        "candidates' validation mIoU only (as auto does), on the seeds where the forest, the network "
        "and their ensemble were all scored."
    )
    body += ["", wrap.fill(versus), "", auto_summary(rows), "", wrap.fill(rules), "", rules_summary(rows)]
    return "\n".join([START, heading, "", *body, END])


def write_section(text: str, path: Path) -> None:
    """Replace the marked section of ``path`` (appended at the end when the markers are absent)."""
    doc = path.read_text() if path.exists() else ""
    if START in doc and END in doc:
        head, rest = doc.split(START, 1)
        doc = head + text + rest.split(END, 1)[1]
    else:
        doc = doc.rstrip("\n") + "\n\n" + text + "\n"
    path.write_text(doc)


def _show_image(prep: Prepared) -> np.ndarray:
    """The image bands of the figure, each stretched to its 2-98 % range."""
    with rasterio.open(DATA / prep.dataset.folder / "image.tif") as ds:
        bands = ds.read(list(prep.dataset.rgb)).astype(np.float32)
    lo, hi = np.percentile(bands, [2, 98], axis=(1, 2), keepdims=True)
    shown = np.clip((bands - lo) / np.maximum(hi - lo, 1e-6), 0, 1)
    return shown[0] if len(shown) == 1 else np.moveaxis(shown, 0, -1)


def plot(prep: Prepared, predictions: dict[str, np.ndarray], path: Path) -> None:
    """Image, full reference and each configuration's seed-0 prediction, the split marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    colours = ["#ffffff"] * 256
    for value, _, colour in prep.dataset.classes:
        colours[value] = colour
    cmap = ListedColormap(colours)
    reference, _ = read_band(DATA / prep.dataset.folder / prep.dataset.reference)
    panels = [("image", _show_image(prep)), ("reference", reference), *predictions.items()]
    aspect = reference.shape[0] / reference.shape[1]  # a wide scene gets a low figure
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2 * aspect + 1.2), squeeze=False)
    for ax, (title, data) in zip(axes[0], panels, strict=True):
        if title == "image":
            ax.imshow(data, cmap="gray" if data.ndim == 2 else None)
        else:
            ax.imshow(np.where(data == 255, 0, data), cmap=cmap, vmin=0, vmax=255, interpolation="nearest")
        ax.axvline(prep.split - 0.5, color="black", linewidth=0.8, linestyle="--")
        ax.set_title(title if title in ("image", "reference") else f"{title} (seed 0)", fontsize=9)
        ax.set_axis_off()
    fig.suptitle(f"{prep.name}: train left of the dashed line, test right of it", fontsize=10)
    patches = [Patch(color=c, label=n) for _, n, c in prep.dataset.classes]
    fig.legend(handles=patches, loc="lower center", ncol=len(patches), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---- the run ---------------------------------------------------------------------------------


def run_dataset(
    name: str, args: argparse.Namespace, work: Path, meta: dict[str, Any]
) -> list[dict[str, Any]]:
    """Every configuration and seed of one data set, then its baseline; the figure when seed 0 ran."""
    prep = prepare(name, work, args.timeout)
    rows: list[dict[str, Any]] = []
    shown: dict[str, np.ndarray] = {}
    pred: np.ndarray | None
    for config in [*args.configs, BASELINE]:
        for seed in args.seeds:
            base = {"dataset": name, "config": config, "seed": seed, "split_x": prep.split}
            base |= {k: meta[k] for k in ("segpipe_version", "commit", "machine", "date")}
            try:
                if config == BASELINE:
                    row, pred = run_baseline(prep, seed)
                    found = [row]
                else:
                    found, pred = run_segpipe(prep, config, seed, args.timeout)
            except (RuntimeError, subprocess.TimeoutExpired) as err:
                log(f"{name}: {config} seed {seed} FAILED: {str(err).splitlines()[0]}")
                rows.append(base | {"status": "failed", "error": str(err)[-1500:]})
                continue
            for row in found:
                log(f"{name}: {row.get('config', config)} seed {seed}: test mIoU {row['test_miou']:.3f}")
                rows.append(base | {"status": "ok"} | row)
            if seed == 0 and pred is not None:
                shown[config] = pred
    if shown:
        plot(prep, shown, args.img / f"accuracy_{name}.png")
    return rows


def parse_args() -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--datasets", default=",".join(DATASETS), help=f"comma-separated, of {', '.join(DATASETS)}"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument(
        "--configs", default=",".join(CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}"
    )
    parser.add_argument("--work", type=Path, help="work folder, kept (default: a temporary one, removed)")
    parser.add_argument("--quick", action="store_true", help="seed 0 only: a smoke run")
    parser.add_argument("--fresh", action="store_true", help="drop the runs already in the results file")
    parser.add_argument(
        "--timeout", type=float, default=3 * 3600, help="seconds allowed to one segpipe command"
    )
    parser.add_argument(
        "--report-only", action="store_true", help="run nothing: rewrite the table from the results file"
    )
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--doc", type=Path, default=DOC)
    parser.add_argument("--img", type=Path, default=IMG, help="folder of the figures")
    args = parser.parse_args()
    args.datasets = [d for d in args.datasets.split(",") if d]
    args.configs = [c for c in args.configs.split(",") if c]
    for unknown in sorted(set(args.datasets) - set(DATASETS)) + sorted(set(args.configs) - set(CONFIGS)):
        parser.error(f"unknown data set or config {unknown!r}")
    if args.quick:
        args.seeds = [0]
    return args


def main() -> None:
    """Run the table, then write the results file, the marked section and the figures."""
    args = parse_args()
    if args.report_only:
        saved = json.loads(args.results.read_text())
        write_section(section(saved["runs"], saved["last_run"]), args.doc)
        print(table(saved["runs"]))
        return
    meta = provenance()
    work = args.work or Path(tempfile.mkdtemp(prefix="segpipe-accuracy-"))
    log(f"work folder {work}; {meta['machine']}; segpipe {meta['segpipe_version']} {meta['commit']}")
    rows: list[dict[str, Any]] = []
    try:
        for name in args.datasets:
            rows += run_dataset(name, args, work, meta)
    finally:
        if rows:
            merged = merge_rows(rows, args.results, args.fresh)
            args.results.parent.mkdir(parents=True, exist_ok=True)
            args.results.write_text(json.dumps({"last_run": meta, "runs": merged}, indent=2) + "\n")
            write_section(section(merged, meta), args.doc)
            print(table(merged))
            log(f"wrote {args.results} and the accuracy section of {args.doc}")
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
