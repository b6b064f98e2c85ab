"""Defaults that follow the data, and model selection the user can see (issue 18)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from train_support import TINY, tiny_store
from typer.testing import CliRunner

from segpipe import cli
from segpipe.cli import app
from segpipe.stages.train import NetworkConfig
from segpipe.stages.train.adapt import (
    AUTO_SETTINGS,
    CPU_CHIPS,
    FOREGROUND_CPU_CHIPS,
    LINEAR_START_CPU_CHIPS,
    REFIT_MEMBERS,
    REFIT_UNITS,
    Facts,
    resolve,
)
from segpipe.stages.train.config import AutoConfig
from segpipe.stages.train.select import MIN_HELD_OUT, _choose, _small_validation

runner = CliRunner()


def _facts(size: int = 320, counts: tuple[int, ...] = (5000, 4000, 3000), gpu: bool = False, metres=0.5):
    return Facts(size, size, metres, (size, size), np.array(counts), gpu)


def test_auto_settings_follow_the_scene_and_the_device():
    small, chosen = resolve(NetworkConfig(), _facts(320))
    assert set(chosen) == set(AUTO_SETTINGS) and all("rule" in v for v in chosen.values())
    assert (small.chip_size, small.batch_size, small.lr) == (128, 16, 0.001)
    # 320 px of labels is 6.25 chips: twice that, at least 64 chips an epoch, 2048 chips in all.
    assert small.samples_per_epoch == 64 and small.epochs == CPU_CHIPS // 64
    tiny, _ = resolve(NetworkConfig(), _facts(100))
    assert tiny.chip_size == 96  # a scene under the chip: the largest multiple of 32 inside it
    big, _ = resolve(NetworkConfig(), _facts(8000, gpu=True))
    assert (big.chip_size, big.batch_size, big.samples_per_epoch) == (256, 8, 512)
    assert big.lr == pytest.approx(1e-3 * np.sqrt(0.5), rel=1e-3)  # rounded to 6 decimals
    # Coarse pixels get the per-pixel path; fine or unknown ones do not.
    assert resolve(NetworkConfig(), _facts(metres=30.0))[0].pixel_head == 32
    assert resolve(NetworkConfig(), _facts(metres=None))[0].pixel_head == 0


def test_coarse_pixels_start_from_the_per_pixel_model_at_a_fine_tuning_rate():
    fine, chosen = resolve(NetworkConfig(), _facts(metres=0.5))
    assert (fine.linear_start, fine.lr, fine.keep, fine.epochs) == (False, 0.001, "best", CPU_CHIPS // 64)
    assert chosen["linear_start"]["rule"] == "0.5 m pixels (< 10 m)"
    coarse, chosen = resolve(NetworkConfig(), _facts(metres=10.0))
    assert (coarse.linear_start, coarse.lr, coarse.keep) == (True, 0.0003, "last")
    assert coarse.epochs == LINEAR_START_CPU_CHIPS // 64 == 64 and "linear start" in chosen["epochs"]["rule"]
    assert not resolve(NetworkConfig(), _facts(metres=None))[0].linear_start  # unknown: as fine pixels
    # The rate, the epochs and the weights kept follow the start the user asks for, either way.
    asked, _ = resolve(NetworkConfig(linear_start=True), _facts(metres=0.5))
    assert (asked.lr, asked.keep, asked.epochs) == (0.0003, "last", 64)
    refused, chosen = resolve(NetworkConfig(linear_start=False, keep="last"), _facts(metres=30.0))
    assert (refused.lr, refused.keep, refused.epochs) == (0.001, "last", 32)
    assert not {"linear_start", "keep"} & set(chosen)
    # A per-pixel model has no network to start; a GPU keeps its own (larger) chip total.
    assert not resolve(NetworkConfig(arch="linear"), _facts(metres=30.0))[0].linear_start
    assert resolve(NetworkConfig(), _facts(8000, gpu=True, metres=30.0))[0].epochs == 32


def test_few_held_out_cells_add_refitted_networks():
    def members(cfg: NetworkConfig, held: int) -> tuple[int, bool, dict]:
        resolved, chosen = resolve(cfg, dataclasses.replace(_facts(), held_units=held))
        return resolved.members, resolved.refit, chosen

    few = members(NetworkConfig(), 6)
    assert few[:2] == (3, True) and few[2]["members"]["rule"] == "6 held-out cells or patches (1-19)"
    for held in (0, REFIT_UNITS, 2000):  # nothing held out to draw, or a draw of many cells
        assert members(NetworkConfig(), held)[:2] == (1, False)
    # What the user gives wins; a given member count keeps its members on the split.
    assert members(NetworkConfig(members=1), 6)[:2] == (1, False)
    assert members(NetworkConfig(members=3), 6)[:2] == (3, False)
    assert members(NetworkConfig(refit=False), 6)[:2] == (1, False)
    assert members(NetworkConfig(refit=True), 2000)[:2] == (3, True)
    assert members(NetworkConfig(arch="linear"), 6)[:2] == (1, False)  # a per-pixel model
    # --arch auto compares one network with the forest: never several.
    network, _ = AutoConfig().families()
    assert (network.members, network.refit) == (1, False)


def test_members_help_names_the_rule_adapt_applies():
    # The CLI spells the numbers out (importing adapt there would load numpy for every command).
    members, refit = (opt.__metadata__[0].help for opt in (cli._Members, cli._Refit))
    assert f"auto: {REFIT_MEMBERS} with --refit" in members and f"under {REFIT_UNITS} cells" in members
    assert f"auto --members {REFIT_MEMBERS}" in refit


def test_rare_classes_get_a_loss_and_sampling_that_learn_them():
    balanced, _ = resolve(NetworkConfig(), _facts())
    assert not balanced.class_balancing and not balanced.balanced_sampling and balanced.dice_weight == 0
    foreground, chosen = resolve(NetworkConfig(), _facts(counts=(96_000, 4_000)))  # buildings: 4 %
    assert foreground.balanced_sampling and foreground.dice_weight == 0.5
    # Its objects pasted into half the chips, at twice the rate, the last epoch kept.
    assert (foreground.copy_paste, foreground.lr, foreground.keep) == (0.5, 0.002, "last")
    assert chosen["keep"]["rule"] == "a rare foreground" and "foreground" in chosen["lr"]["rule"]
    assert balanced.copy_paste == 0 and (balanced.lr, balanced.keep) == (0.001, "best")
    # At 10 m a linear start sets the rate (a fine-tuning's); the objects are pasted still.
    coarse, _ = resolve(NetworkConfig(), _facts(counts=(96_000, 4_000), metres=10.0))
    assert (coarse.copy_paste, coarse.lr, coarse.keep) == (0.5, 0.0003, "last")
    # A foreground is learnt late: 4,096 chips (64 epochs of 64); land cover 2,048 (below).
    assert foreground.epochs == FOREGROUND_CPU_CHIPS // 64 == 64 and "foreground" in chosen["epochs"]["rule"]
    assert not foreground.class_balancing  # on top of balanced chips, loss weights over-correct
    assert "4.0%" in chosen["dice_weight"]["rule"]
    many, many_rules = resolve(NetworkConfig(), _facts(counts=(40_000, 30_000, 20_000, 9_000, 200)))
    assert not many.balanced_sampling and not many.class_balancing and many.dice_weight == 0.3
    assert many.copy_paste == 0 and (many.lr, many.keep) == (0.001, "best")
    assert many.epochs == CPU_CHIPS // 64 == 32  # a rare class among many is not a foreground task
    assert "foreground" not in many_rules["epochs"]["rule"]
    # On a GPU (512 chips an epoch at 8000 px) land cover's 16,384 chips are 32 epochs, a
    # foreground's 65,536 reach the 64-epoch cap.
    assert resolve(NetworkConfig(), _facts(8000, gpu=True))[0].epochs == 32
    assert resolve(NetworkConfig(), _facts(8000, counts=(96_000, 4_000), gpu=True))[0].epochs == 64
    # What the user gives is never changed, and is not reported as chosen.
    given = NetworkConfig(chip_size=64, balanced_sampling=False, dice_weight=0.1, copy_paste=0.0)
    kept, chosen = resolve(given, _facts(counts=(96_000, 4_000)))
    assert (kept.chip_size, kept.balanced_sampling, kept.dice_weight, kept.copy_paste) == (64, False, 0.1, 0)
    assert not {"chip_size", "balanced_sampling", "dice_weight", "copy_paste"} & set(chosen)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_store(tmp_path_factory.mktemp("select"))


def _options(settings: dict[str, object]) -> list[str]:
    return [part for k, v in settings.items() for part in (f"--{k.replace('_', '-')}", str(v))]


@pytest.fixture(scope="module")
def dense_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Dense labels: enough held-out pixels (MIN_HELD_OUT) for auto to train and compare a network.
    return tiny_store(tmp_path_factory.mktemp("select_dense"), dense=True)


def test_arch_auto_with_few_held_out_pixels_keeps_the_forest_without_training_a_network(store, tmp_path):
    out = tmp_path / "auto"
    settings = {**TINY, "epochs": 2, "samples_per_epoch": 8, "chip_size": 64, "trees": 8, "threads": 1,
                "valid_fraction": 0.3}
    command = ["train", str(store), "--out", str(out), "--arch", "auto", *_options(settings)]
    result = runner.invoke(app, command)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "no network: only" in text and "so the forest is kept" in text
    selection = json.loads((out / "model.json").read_text())["training"]["selection"]
    assert selection["kept"] == "random_forest" and set(selection["models"]) == {"random_forest"}
    assert selection["models"]["random_forest"]["valid_pixels"] < MIN_HELD_OUT
    assert selection["warning"].startswith("only ")


def test_arch_auto_trains_both_compares_them_on_the_same_pixels_and_keeps_the_best(dense_store, tmp_path):
    store = dense_store
    out = tmp_path / "auto"
    # What a SIGKILLed selection left (its process is gone) goes; a running one's stays.
    killed = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                            text=True, check=True)
    dead, running = tmp_path / f".auto.auto-{killed.stdout.strip()}", tmp_path / f".auto.auto-{os.getppid()}"
    for folder in (dead, running):
        (folder / "unet").mkdir(parents=True)
    settings = {**TINY, "epochs": 2, "samples_per_epoch": 8, "chip_size": 64, "trees": 8, "threads": 1,
                "valid_fraction": 0.3}
    command = ["train", str(store), "--out", str(out), "--arch", "auto", *_options(settings)]
    result = runner.invoke(app, command)
    assert result.exit_code == 0, result.output
    assert "valid mIoU" in result.output and "<- kept" in result.output
    selection = json.loads((out / "model.json").read_text())["training"]["selection"]
    models = selection["models"]
    assert set(models) == {"random_forest", "unet", "ensemble"}
    assert all(0 <= m["valid_miou"] <= 1 for m in models.values())
    best_single = max(("random_forest", "unet"), key=lambda k: models[k]["valid_miou"])
    lead = models[best_single]["valid_miou"] - models["ensemble"]["valid_miou"]
    expected = best_single if lead >= 0.02 else "ensemble"
    if max(m["valid_pixels"] for m in models.values()) < MIN_HELD_OUT:
        expected = "random_forest"
    assert selection["kept"] == expected and f"kept {expected}" in " ".join(result.output.split())
    assert {"random_forest", "unet"} <= {p.name for p in (out / "candidates").iterdir()}
    kept = json.loads((out / "model.json").read_text())
    assert kept["arch"] == expected
    # The two candidates were trained on the same split, so their cells are the same.
    forest = json.loads((out / "candidates" / "random_forest" / "model.json").read_text())["training"]
    network = json.loads((out / "candidates" / "unet" / "model.json").read_text())["training"]
    assert forest["split"]["cell"] == network["split"]["cell"] == TINY["valid_cell"]
    assert list(tmp_path.glob(".auto.auto-*")) == [running]  # no staging of this run or a killed one


def test_arch_auto_refuses_resume_and_bad_settings_in_one_line(store, tmp_path):
    segpipe = str(Path(sys.executable).parent / "segpipe")
    out = tmp_path / "m"
    for extra, needle in (
        (["--resume"], "--arch auto"),
        (["--chip-size", "100"], "--chip-size 100"),
        (["--budget", "0"], "--budget-minutes 0.0: Input should be greater than 0"),
    ):
        command = [segpipe, "train", str(store), "--out", str(out), "--arch", "auto", *extra]
        refused = subprocess.run(command, capture_output=True, text=True, timeout=300)
        errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
        assert refused.returncode != 0 and len(errors) == 1 and needle in errors[0], refused.stderr
        assert "Traceback" not in refused.stderr and not out.exists()


def test_held_out_scores_are_one_definition_for_every_family(store, tmp_path):
    from segpipe.models import load_model
    from segpipe.stages.train import train, train_config
    from segpipe.stages.train.heldout import held_out_pixels, held_out_scores
    from segpipe.stages.train.loop import plan_training

    cfg = train_config(**{**TINY, "threads": 1, "valid_fraction": 0.3})
    train(store, tmp_path / "n", cfg)
    train(store, tmp_path / "f", train_config(arch="random_forest", trees=8, valid_cell=32, threads=1,
                                             valid_fraction=0.3))
    plan = plan_training(store, cfg)
    held = held_out_pixels(plan)
    assert held.keys.size == np.unique(held.keys).size > 0
    nets = {"n": load_model(tmp_path / "n")[0], "f": load_model(tmp_path / "f")[0]}
    scores = held_out_scores(plan, nets, {"self": ["f", "f"]})
    assert all(s["pixels"] == held.keys.size for s in scores.values())
    assert scores["self"]["miou"] == scores["f"]["miou"]  # the mean of one model with itself is itself
    # The forest per pixel equals the forest over whole chips at those pixels.
    forest_net = nets["f"]
    from segpipe.stages.train.heldout import probabilities

    per_pixel = probabilities(forest_net, plan, held)
    assert np.allclose(per_pixel.sum(axis=1), 1.0, atol=1e-5)
    # --arch auto trains from this same plan, with the epochs that fit its budget on record.
    from segpipe.stages.train.select import _fitted

    fitted = _fitted(plan, plan.cfg.epochs + 3, "3 more fit")
    assert fitted.cfg.epochs == plan.cfg.epochs + 3 and fitted.requested == plan.requested
    entry = fitted.auto["epochs"]
    assert entry["value"] == fitted.cfg.epochs and "3 more fit" in entry["rule"]
    assert _fitted(plan, plan.cfg.epochs, "same") == plan
    # Past its deadline, a run starts no further epoch and keeps the best weights so far.
    import time

    late = _fitted(plan, 3, "three", deadline=time.time())
    spec = train(store, tmp_path / "late", plan=late)
    history = spec.training["history"]
    assert len(history) == 1 and history[-1]["stopped_by"] == "time budget"
    assert (tmp_path / "late" / "model.json").exists()


def test_the_python_api_selects_too(dense_store, tmp_path):
    store = dense_store
    import segpipe

    settings = {**TINY, "epochs": 2, "samples_per_epoch": 8, "chip_size": 64, "trees": 8, "threads": 1}
    settings["valid_fraction"] = 0.3
    result = segpipe.train(store, tmp_path / "m", arch="auto", budget_minutes=2, **settings)
    assert result.selection is not None and result.selection["kept"] == result.arch  # "ensemble" is one
    assert set(result.selection["models"]) == {"random_forest", "unet", "ensemble"}
    with pytest.raises(segpipe.InputError, match="arch='auto'"):
        segpipe.train(store, tmp_path / "n", arch="auto", resume=True)


def test_a_failed_selection_leaves_nothing_behind(store, tmp_path):
    from segpipe.errors import MissingInputError
    from segpipe.stages.train import AutoConfig
    from segpipe.stages.train.select import train_auto

    out = tmp_path / "m"
    # The forest trains, then the network's pretrained file is missing: its candidates go too.
    settings = {**TINY, "trees": 4, "threads": 1, "pretrained": str(tmp_path / "absent.pth")}
    with pytest.raises(MissingInputError):
        train_auto(store, out, AutoConfig(**settings, budget_minutes=1))
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_the_ensemble_is_kept_unless_a_single_model_clearly_wins_or_too_little_is_held_out():
    def table(forest: float, unet: float, ensemble: float, pixels: int = 5000) -> dict:
        return {name: {"valid_miou": v, "valid_pixels": pixels}
                for name, v in (("random_forest", forest), ("unet", unet), ("ensemble", ensemble))}

    assert _choose(table(0.30, 0.29, 0.295)) == "ensemble"  # close: the hedge
    assert _choose(table(0.376, 0.216, 0.358)) == "ensemble"  # the forest leads by 0.018 only
    assert _choose(table(0.21, 0.08, 0.18)) == "random_forest"  # by 0.03
    assert _choose(table(0.47, 0.57, 0.47)) == "unet"  # the buildings scene
    assert _choose(table(0.23, 0.33, 0.43, pixels=212)) == "random_forest"  # 4 polygons held out
    assert _small_validation(table(0.23, 0.33, 0.43, pixels=212)).startswith("only 212 labelled pixels")
    assert _small_validation(table(0.23, 0.33, 0.43)) is None
    assert _choose({"random_forest": {"seconds": 1.0}}) == "random_forest"  # nothing held out
