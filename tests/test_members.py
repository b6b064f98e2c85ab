"""``--members N``: networks of one split trained from several seeds and averaged (issue 18)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file
from train_support import TINY, few_valid_chips, keep_torch_threads, tiny_store  # noqa: F401 (fixtures)
from typer.testing import CliRunner

from segpipe.cli import app
from segpipe.errors import InputError, MissingInputError
from segpipe.models import load_model
from segpipe.stages.train import train, train_config
from segpipe.stages.train.checkpoint import checkpoint_path
from segpipe.stages.train.members import MEMBERS, PARTIAL, member_seed

runner = CliRunner()
# One thread: CPU kernels sum in an order that depends on the thread count, and the tests
# compare weights bit for bit. A checkpoint after every step, so a kill leaves one.
SETTINGS = {**TINY, "epochs": 2, "samples_per_epoch": 4, "valid_fraction": 0.3, "threads": 1,
            "checkpoint_every": 1, "seed": 3}


pytestmark = pytest.mark.usefixtures("few_valid_chips", "keep_torch_threads")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_store(tmp_path_factory.mktemp("members"), dense=True)


@pytest.fixture(scope="module")
def single(store, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "m"
    train(store, out, train_config(**SETTINGS))
    return out


@pytest.fixture(scope="module")
def averaged(store, tmp_path_factory) -> tuple[Path, list[str]]:
    out = tmp_path_factory.mktemp("averaged") / "m"
    lines: list[str] = []
    train(store, out, train_config(**{**SETTINGS, "members": 2}), announce=lines.append)
    return out, lines


def _weights(package: Path) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in load_file(str(package / "weights.safetensors")).items()}


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_members_share_the_split_member_zero_is_the_seeds_own_network(single, averaged):
    out, lines = averaged
    spec = json.loads((out / "model.json").read_text())
    assert spec["arch"] == "ensemble" and len(spec["options"]["members"]) == 2
    record = spec["training"]["averaged"]
    assert record["count"] == 2 and record["seeds"] == [3, member_seed(3, 1)] == [3, 1003]
    assert set(record["scores"]) == {"0", "1", "ensemble"}
    # The package's metrics are the ensemble's held-out scores, on the pixels each member had.
    assert spec["metrics"]["miou"] == pytest.approx(record["scores"]["ensemble"]["valid_miou"])
    pixels = {s["valid_pixels"] for s in record["scores"].values()}
    assert len(pixels) == 1 and pixels.pop() > 0
    members = out / MEMBERS
    assert sorted(p.name for p in members.iterdir()) == ["0", "1", "ensemble"]
    # The recorded member packages are where they lie now, not in the folder they were made in.
    recorded = [Path(m["package"]) for m in spec["training"]["members"]]
    assert recorded == [(members / "0").resolve(), (members / "1").resolve()]
    assert not (out / PARTIAL).exists()
    # Member 0 is, bit for bit, the network the seed alone trains; member 1 is another.
    assert _same(_weights(members / "0"), _weights(single))
    assert not _same(_weights(members / "1"), _weights(single))
    member_split = [json.loads((members / n / "model.json").read_text())["training"]["split"] for n in "01"]
    single_split = json.loads((single / "model.json").read_text())["training"]["split"]
    assert member_split[0] == member_split[1] == single_split == spec["training"]["split"]
    assert spec["training"]["config"]["members"] == 2
    asked = train_config(**{**SETTINGS, "members": 2}).model_dump(mode="json")
    assert spec["training"]["requested"] == asked  # what a flow compares to reuse the package
    starts = [line.split(":")[0] for line in lines[:2]]
    assert starts == ["member 1 of 2 (seed 3)", "member 2 of 2 (seed 1003)"]
    assert lines[-1].startswith("held-out mIoU of the members ")
    net, _ = load_model(out)  # predicts as one model: the mean of the members' probabilities
    import torch

    probs = net(torch.zeros(1, 4, 32, 32)).exp().sum(dim=1)
    assert torch.allclose(probs, torch.ones_like(probs), atol=1e-4)


class KilledError(Exception):
    """Stands for a kill: raised from the progress callback, it ends the run mid-member."""


def test_a_run_killed_in_its_second_member_resumes_keeping_the_first(store, averaged, single, tmp_path):
    out = tmp_path / "m"
    shutil.copytree(single, out)  # an earlier complete result in out
    before = (out / "model.json").read_bytes()
    second = []

    def report(p):
        if second and p.step == 2:
            raise KilledError

    def announce(line):
        second.extend(["yes"] if line.startswith("member 2 of 2") else [])

    cfg = train_config(**{**SETTINGS, "members": 2})
    with pytest.raises(KilledError):
        train(store, out, cfg, progress=report, announce=announce)
    assert (out / "model.json").read_bytes() == before  # untouched until the ensemble is whole
    partial = out / PARTIAL
    assert (partial / "0" / "model.json").is_file() and checkpoint_path(partial / "1").is_file()
    finished = (partial / "0" / "model.json").stat().st_mtime_ns

    with pytest.raises(InputError, match="other settings"):
        train(store, out, train_config(**{**SETTINGS, "lr": 0.5, "members": 2}), resume=True)
    lines: list[str] = []
    train(store, out, cfg, resume=True, announce=lines.append)
    assert lines[0].endswith("finished before, kept") and lines[1].endswith("resuming")
    assert (out / MEMBERS / "0" / "model.json").stat().st_mtime_ns == finished
    # The resumed ensemble is the unbroken one, bit for bit.
    assert _same(_weights(out), _weights(averaged[0]))
    assert not partial.exists()


def test_a_run_stopped_before_anything_resumable_leaves_nothing(store, tmp_path):
    def report(p):
        raise KilledError  # at the first step, before the first checkpoint

    out = tmp_path / "m"
    with pytest.raises(KilledError):
        train(store, out, train_config(**{**SETTINGS, "members": 2}), progress=report)
    assert not (out / PARTIAL).exists()


def test_members_are_refused_where_they_mean_nothing(store, tmp_path):
    with pytest.raises(MissingInputError, match="no interrupted --members run"):
        train(store, tmp_path / "none", train_config(**{**SETTINGS, "members": 2}), resume=True)
    base = ["train", str(store), "--out", str(tmp_path / "m"), "--members", "2"]
    for extra, says in ((["--arch", "auto"], "--members 2: --arch auto trains one network beside the "
                         "forest: leave out --members"),
                        (["--arch", "random_forest"], "does not use members=2"),
                        (["--members", "0"], "--members 0: ")):
        result = runner.invoke(app, [*base, *extra])
        assert result.exit_code != 0 and says in f"{result.output} {result.exception}", extra
    linear = train(store, tmp_path / "lin", train_config(**{**SETTINGS, "arch": "linear", "members": 2}))
    assert linear.arch == "linear" and any("members" in w for w in linear.training["warnings"])


def test_the_command_line_names_each_member_and_compares_the_mean_with_the_forest(store, tmp_path):
    out = tmp_path / "m"
    options = [part for k, v in SETTINGS.items() for part in (f"--{k.replace('_', '-')}", str(v))]
    # The last --members wins over SETTINGS' one network.
    result = runner.invoke(app, ["train", str(store), "--out", str(out), *options, "--members", "2"])
    assert result.exit_code == 0, f"{result.output} {result.exception}"
    text = " ".join(result.output.split())
    assert "member 1 of 2 (seed 3): training" in text and "member 2 of 2 (seed 1003): training" in text
    miou = json.loads((out / "model.json").read_text())["metrics"]["miou"]
    assert f"wrote {out} (valid mIoU {miou:.3f})" in text
    assert "scoring the per-pixel forest on the same held-out cells" in text
    if "beat" in text:  # the forest's lead is reported under the ensemble's name
        assert "the per-pixel random forest beat 2 x unet" in text


def test_refit_trains_the_members_after_the_first_on_every_label(store, single, tmp_path):
    out, lines = tmp_path / "m", []
    train(store, out, train_config(**{**SETTINGS, "members": 2, "refit": True}), announce=lines.append)
    spec = json.loads((out / "model.json").read_text())
    record = spec["training"]["averaged"]
    assert record["refit"] and set(record["scores"]) == {"0"}
    # The package reports member 0's held-out scores: the only member that never saw those cells.
    assert spec["metrics"]["miou"] == pytest.approx(record["scores"]["0"]["valid_miou"])
    members = out / MEMBERS
    assert _same(_weights(members / "0"), _weights(single))  # member 0: the seed's own network
    refit = json.loads((members / "1" / "model.json").read_text())["training"]
    first = json.loads((members / "0" / "model.json").read_text())["training"]
    assert refit["config"]["valid_fraction"] == 0.0 and first["config"]["valid_fraction"] == 0.3
    assert refit["config"]["seed"] == member_seed(3, 1) and not refit["config"]["refit"]
    # Same settings as member 0 resolved, on every labelled pixel (no held-out scores of its own).
    same = ("epochs", "samples_per_epoch", "chip_size", "lr", "keep", "linear_start")
    assert all(refit["config"][k] == first["config"][k] for k in same)
    assert "valid_miou" not in refit["history"][-1]
    assert lines[-1].startswith("held-out mIoU of member 1 (trained without the held-out cells)")
    # The forest baseline is compared with that member too, on the same held-out pixels.
    from segpipe.stages.train.select import compare_with_forest

    asked = train_config(**{**SETTINGS, "members": 2, "refit": True})
    table = compare_with_forest(store, out, asked, lines.append)
    assert table is not None and set(table) == {"unet (member 1)", "random_forest"}
    assert table["unet (member 1)"]["valid_miou"] == pytest.approx(record["scores"]["0"]["valid_miou"])


def test_refit_is_refused_without_members_and_for_auto(store, tmp_path):
    base = ["train", str(store), "--out", str(tmp_path / "m"), "--refit"]
    for extra, says in ((["--members", "1"], "give --members 2+"),
                        (["--arch", "auto"], "leave out --refit")):
        result = runner.invoke(app, [*base, *extra])
        assert result.exit_code != 0 and says in f"{result.output} {result.exception}", extra


# SETTINGS with members (and refit) left at auto.
AUTO = {k: v for k, v in SETTINGS.items() if k != "members"}


@pytest.fixture(scope="module")
def auto_members(store, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("auto_members") / "m"
    train(store, out, train_config(**AUTO))
    return out


def test_auto_members_refit_two_more_networks_where_few_cells_are_held_out(store, single, auto_members):
    """Left at auto, a split holding out few cells gets three members; the first is the seed's own."""
    spec = load_model(auto_members)[1]
    held = spec.training["split"]["held_out_units"]
    assert 0 < held < 20 and spec.arch == "ensemble"
    assert spec.training["auto"]["members"]["value"] == 3 and spec.training["auto"]["refit"]["value"] is True
    assert f"{held} held-out cells or patches" in spec.training["auto"]["members"]["rule"]
    assert spec.training["averaged"]["refit"] and spec.training["config"]["members"] == 3
    assert _same(_weights(auto_members / MEMBERS / "0"), _weights(single))
    # The settings as asked keep members at auto: a flow reusing the package compares those.
    assert spec.training["requested"]["members"] is None


def test_auto_members_killed_in_the_second_resume_to_the_unbroken_ensemble(store, auto_members, tmp_path):
    out, second = tmp_path / "m", []

    def report(p):
        if second and p.step == 2:
            raise KilledError

    def announce(line):
        second.extend(["yes"] if line.startswith("member 2 of 3") else [])

    with pytest.raises(KilledError):
        train(store, out, train_config(**AUTO), progress=report, announce=announce)
    assert checkpoint_path(out / PARTIAL / "1").is_file() and not (out / "model.json").exists()
    train(store, out, train_config(**AUTO), resume=True)
    assert _same(_weights(out), _weights(auto_members)) and not (out / PARTIAL).exists()
