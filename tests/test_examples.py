"""examples/region.yaml and examples/manifest.yaml: read by the real readers, and run.

The example region's first stage runs on a tiny synthetic scene in every test run; the
whole flow (Prefect's engine, training, a local cluster) runs under ``pytest -m slow``.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.manifest import Manifest, read_manifest, read_region
from flows.process_region import RegionRun

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture
def examples(tmp_path):
    """The example files in a fresh folder, as a user would copy them."""
    for name in ("region.yaml", "manifest.yaml"):
        shutil.copy(EXAMPLES / name, tmp_path / name)
    return tmp_path


def synth(folder: Path, seed: int = 0, size: int = 128) -> None:
    from segpipe.synth import synthesize

    synthesize(folder, size=size, bands=4, tiles=1, seed=seed)


def test_example_region_shows_every_setting_and_reads(examples):
    text = (examples / "region.yaml").read_text()
    assert set(yaml.safe_load(text)) == set(RegionRun.model_fields)
    lines = text.splitlines()
    for i, line in enumerate(lines):  # every top-level setting has a comment just above it
        if line and not line.startswith((" ", "#", "-")):
            assert lines[i - 1].startswith("#"), f"no comment above {line!r}"
    run = read_region(examples / "region.yaml")
    assert run.images == [str(examples / "synthetic" / "image.vrt")]
    assert run.store == str(examples / "out" / "example.zarr")
    assert run.train is not None and run.train.valid_fraction == 0.15


def test_example_manifest_reads(examples):
    data = yaml.safe_load((examples / "manifest.yaml").read_text())
    assert set(data) == set(Manifest.model_fields)
    plan = read_manifest(examples / "manifest.yaml")
    assert [r.name for r in plan.regions] == ["west", "east"]
    assert plan.regions[1].images == [str(examples / "synthetic-b" / "image.vrt")]
    assert len({r.store for r in plan.regions}) == 2


def test_example_region_ingests_a_tiny_synthetic_scene(examples):
    from segpipe.io.store import read_region_info
    from segpipe.stages.ingest.driver import ingest

    synth(examples / "synthetic")
    run = read_region(examples / "region.yaml")
    for path in (*run.images, run.labels, run.classes, run.reference):
        assert path is not None and Path(path).is_file(), path
    info = ingest(
        run.images,
        run.store,
        labels=run.labels,
        label_field=run.label_field,
        classes=run.classes,
        block_size=run.block_size,
    )
    assert (info.width, info.height) == (128, 128)
    assert read_region_info(run.store).classes


@pytest.mark.slow
def test_example_region_runs_end_to_end(examples):
    synth(examples / "synthetic", size=256)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(examples / ".prefect")
    result = subprocess.run(
        [str(Path(sys.executable).parent / "segpipe"), "run", str(examples / "region.yaml")],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (examples / "out" / "example-cog" / "classes.tif").is_file()
    assert (examples / "out" / "example-report" / "metrics.json").is_file()


def test_region_training_settings_validate_as_train_config(examples):
    from segpipe.errors import InputError
    from segpipe.stages.train import AutoConfig, ForestConfig, NetworkConfig, train_config

    common = {"images": ["a.tif"], "store": "s", "model": "m", "export_dir": "e"}
    assert RegionRun(**common).train == NetworkConfig()
    forest = RegionRun(**common, train={"arch": "random_forest", "trees": 3}).train
    assert isinstance(forest, ForestConfig) and forest == train_config(arch="random_forest", trees=3)
    assert RegionRun(**common, train=train_config(epochs=2)).train == NetworkConfig(epochs=2)
    auto = RegionRun(**common, train={"arch": "auto", "budget_minutes": 2, "trees": 7, "chip_size": 64}).train
    assert isinstance(auto, AutoConfig) and auto.budget_minutes == 2
    network, forest_of_auto = auto.families()
    assert (network.arch, network.chip_size, forest_of_auto.trees) == ("unet", 64, 7)
    plan = read_manifest(examples / "manifest.yaml")
    assert isinstance(plan.regions[1].train, ForestConfig) and plan.regions[1].train.trees == 50
    path = examples / "bad.yaml"
    for train, needle in (
        ("{trees: 5}", "train.trees: --arch unet does not use trees=5"),
        ("{arch: random_forest, chip_size: 64}", "train.chip_size: --arch random_forest does not use"),
        ("{arch: segformer}", "train.arch: unknown architecture: choose one of unet"),
        ("{budget_minutes: 3}", "train.budget_minutes: --arch unet does not use budget_minutes=3"),
        ("{arch: auto, budget_minutes: 0}", "train.budget_minutes: Input should be greater than 0"),
        ("{arch: auto, forest_context: 2}", "train.forest_context: must be an odd window edge"),
        ("{epochs: 0}", "train.epochs: Input should be greater than or equal to 1 (got 0)"),
        ("3", "train: must be a mapping of training settings"),
    ):
        path.write_text(yaml.safe_dump(common) + f"train: {train}\n")
        with pytest.raises(InputError) as refused:
            read_region(path)
        assert str(refused.value).startswith(f"{path}: ") and needle in str(refused.value), str(refused.value)


def test_example_train_settings_read_as_the_train_command_reads_them():
    from segpipe.stages.train import NetworkConfig, train_config
    from segpipe.stages.train.config_file import read_mapping

    data = read_mapping(EXAMPLES / "train.yaml")
    cfg = train_config(data)
    assert isinstance(cfg, NetworkConfig) and (cfg.epochs, cfg.dice_weight) == (8, 0.3)
    assert set(data) <= set(NetworkConfig.model_fields)
