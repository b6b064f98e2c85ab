"""Checkpoints and resume after a hard kill, data-parallel ranks, training on a dask cluster."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from safetensors.torch import load_file
from train_support import TINY, few_valid_chips, keep_torch_threads, tiny_store  # noqa: F401 (fixtures)

from segpipe.errors import InputError, MissingInputError
from segpipe.models import load_model, read_spec
from segpipe.stages.train import train, train_config
from segpipe.stages.train.checkpoint import checkpoint_path, load_checkpoint

# Two epochs of three steps with a checkpoint after every step; no validation. One thread
# everywhere: CPU kernels sum in an order that depends on the thread count.
RESUMABLE = {
    **TINY,
    "epochs": 2,
    "samples_per_epoch": 6,
    "checkpoint_every": 1,
    "valid_fraction": 0.0,
    "threads": 1,
}

# Runs the training and SIGKILLs itself in the middle of epoch 2: no cleanup, no atexit.
KILLED_RUN = textwrap.dedent(
    """
    import json, os, signal, sys
    from segpipe.stages.train import train, train_config

    def report(p):
        if p.epoch == 2 and p.step == 2:
            os.kill(os.getpid(), signal.SIGKILL)

    train(sys.argv[1], sys.argv[2], train_config(json.loads(sys.argv[3])), progress=report)
    """
)


pytestmark = pytest.mark.usefixtures("few_valid_chips", "keep_torch_threads")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tiny_store(tmp_path_factory.mktemp("resume"))


@pytest.fixture(scope="module")
def unbroken(store, tmp_path_factory):
    """The package of an undisturbed RESUMABLE run (checkpoint frequency changes no result)."""
    out = tmp_path_factory.mktemp("unbroken") / "m"
    return out, train(store, out, train_config(**RESUMABLE))


class KilledError(Exception):
    """Stands for a kill: raised from the progress callback, it ends the run mid-loop."""


def kill_at(epoch, step):
    def report(p):
        if (p.epoch, p.step) == (epoch, step):
            raise KilledError

    return report


def assert_same_package(a_dir, b_dir):
    a = load_file(str(a_dir / "weights.safetensors"))
    b = load_file(str(b_dir / "weights.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)
    history = [json.loads((d / "model.json").read_text())["training"]["history"] for d in (a_dir, b_dir)]
    assert [r["train_loss"] for r in history[0]] == [r["train_loss"] for r in history[1]]


def test_run_killed_mid_epoch_resumes_where_it_stopped(store, unbroken, tmp_path):
    cfg = train_config(**RESUMABLE)
    out = tmp_path / "m"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, str(store), str(out), cfg.model_dump_json()],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert checkpoint_path(out).is_file() and not (out / "model.json").exists()

    with pytest.raises(InputError, match="other training settings") as refused:
        train(store, out, train_config(**{**RESUMABLE, "lr": 0.5}), resume=True)
    # Says what to change back: the rate the checkpoint trained at (chosen, so not "auto").
    assert re.search(r"lr: 0\.\d+ there, 0\.5 now", str(refused.value))

    seen = []
    spec = train(store, out, cfg, progress=lambda p: seen.append((p.epoch, p.step)), resume=True)
    assert spec.training["resumed_from"] == {"epoch": 2, "step": 1}
    assert seen[0] == (2, 2)  # epoch 1 and the first step of epoch 2 were not redone
    assert [r["epoch"] for r in spec.training["history"]] == [1, 2]
    assert not checkpoint_path(out).parent.exists()
    _net, loaded = load_model(out)
    assert loaded == read_spec(out)

    # The resumed run continued the same random streams: it ends where an unbroken run ends.
    whole_dir, whole = unbroken
    a = load_file(str(out / "weights.safetensors"))
    b = load_file(str(whole_dir / "weights.safetensors"))
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)
    assert whole.training["history"][1]["train_loss"] == spec.training["history"][1]["train_loss"]


def test_resume_without_checkpoint_is_refused_and_old_checkpoints_go(store, tmp_path):
    out = tmp_path / "m"
    checkpoint_path(out).parent.mkdir(parents=True)
    checkpoint_path(out).write_bytes(b"stale")
    with pytest.raises(InputError, match=r"cannot read checkpoint .*delete it"):
        train(store, out, train_config(**TINY), resume=True)
    spec = train(store, out, train_config(**TINY))  # resume=False discards it
    assert spec.training["resumed_from"] is None and not checkpoint_path(out).parent.exists()
    # --resume with nothing to resume is a mistake worth naming, not a silent fresh start
    # (a user who believes hours of training are kept would otherwise wait for them again).
    with pytest.raises(MissingInputError, match=r"no checkpoint in .*run without --resume"):
        train(store, tmp_path / "n", train_config(**TINY), resume=True)
    assert not (tmp_path / "n").exists()
    with pytest.raises(MissingInputError, match=r"is complete .*run without --resume"):
        train(store, out, train_config(**TINY), resume=True)


def _with_checkpoint_seconds(settings, seconds, monkeypatch):
    """Settings that checkpoint every ``seconds``."""
    return train_config(**settings, checkpoint_seconds=seconds)


@pytest.mark.parametrize(
    ("every", "seconds", "killed", "saved"),
    [
        # 3 steps per epoch: every 4 steps means global step 4, the first of epoch 2; a count
        # that restarts each epoch would never reach 4.
        pytest.param(4, 0.0, (2, 2), (2, 1), id="global-steps"),
        # No step interval at all: the clock alone checkpoints inside the first epoch.
        pytest.param(0, 1e-6, (1, 2), (1, 1), id="elapsed-time"),
    ],
)
def test_checkpoints_count_global_steps_and_time(
    store, unbroken, tmp_path, monkeypatch, every, seconds, killed, saved
):
    settings = {**RESUMABLE, "checkpoint_every": every}
    cfg = _with_checkpoint_seconds(settings, seconds, monkeypatch)
    out = tmp_path / "pkg"
    with pytest.raises(KilledError):
        train(store, out, cfg, progress=kill_at(*killed))
    # The first checkpoint made the package folder; the write left no temporary file.
    assert [p.name for p in checkpoint_path(out).parent.iterdir()] == ["state.pt"]
    state = load_checkpoint(out, cfg.resume_key())
    assert state is not None and (state.epoch, state.step) == saved

    spec = train(store, out, cfg, resume=True)
    assert spec.training["resumed_from"] == {"epoch": saved[0], "step": saved[1]}
    assert_same_package(out, unbroken[0])


def test_two_data_parallel_processes_write_a_package(store, tmp_path):
    seen = []
    cfg = train_config(**{**TINY, "batch_size": 4, "devices": 2, "threads": 1})  # 2 chips per rank
    spec = train(store, tmp_path / "m", cfg, progress=seen.append)
    assert spec.training["config"]["devices"] == 2
    assert [r["epoch"] for r in spec.training["history"]] == [1]
    assert seen and seen[-1].record is not None  # rank 0's reports reach this process
    net, _ = load_model(tmp_path / "m")
    assert sum(p.numel() for p in net.parameters()) > 0
    assert {"samples.png", "loss_curve.png"} <= {p.name for p in (tmp_path / "m").iterdir()}
    assert not checkpoint_path(tmp_path / "m").parent.exists()


def test_training_on_a_dask_cluster_worker(store, tmp_path):
    from distributed import LocalCluster
    from typer.testing import CliRunner

    from segpipe.cli import app

    with LocalCluster(
        n_workers=1, threads_per_worker=1, processes=False, protocol="tcp", dashboard_address=":0"
    ) as cluster:
        args = ["train", str(store), "--out", str(tmp_path / "m"), "--scheduler", cluster.scheduler_address]
        for key in ("epochs", "samples_per_epoch", "chip_size", "batch_size"):
            args += [f"--{key.replace('_', '-')}", str(TINY[key])]
        result = CliRunner().invoke(app, [*args, "--device", "cpu", "--schedule", "cosine"])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "m" / "model.json").read_text())
    assert data["training"]["config"]["schedule"] == "cosine"
    assert data["training"]["config"]["threads"] == 1  # the worker's thread count, set deliberately


def test_package_alone_predicts_elsewhere(tmp_path):
    from distributed import Client

    from segpipe.io.store import open_layer
    from segpipe.stages.predict.driver import predict

    training_store = tiny_store(tmp_path / "train", seed=1)
    train(training_store, tmp_path / "m", train_config(clip_percentiles=(1, 99), **TINY))
    moved = tmp_path / "elsewhere" / "pkg"
    shutil.copytree(tmp_path / "m", moved)
    shutil.rmtree(tmp_path / "m")
    shutil.rmtree(tmp_path / "train")
    other = tiny_store(tmp_path / "other", seed=5)
    with Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=":0") as client:
        predict(other, moved, client=client, tile_size=64, overlap=16)
    classes = np.asarray(open_layer(other, "classes")[:])
    known = {c.value for c in read_spec(moved).classes} | {255}
    assert set(np.unique(classes)) <= known and (classes != 255).any()


def test_a_checkpoint_of_other_automatic_choices_is_refused_by_name(store, tmp_path):
    # An earlier segpipe wrote its checkpoints without linear_start (then always off); at these
    # 10 m pixels the setting left at auto now starts from the regression, another network.
    import torch

    out = tmp_path / "m"
    with pytest.raises(KilledError):
        train(store, out, train_config(**RESUMABLE, linear_start=False), progress=kill_at(2, 1))
    path = checkpoint_path(out)
    data = torch.load(path, map_location="cpu", weights_only=True)
    config = json.loads(data["config"])
    assert config.pop("linear_start") is False
    del data["chosen"]  # nor the settings as chosen
    torch.save({**data, "config": json.dumps(config, separators=(",", ":"))}, path)
    with pytest.raises(InputError, match="holds a network of other settings than this segpipe chooses"):
        train(store, out, train_config(**RESUMABLE), resume=True)


def test_a_checkpoint_whose_automatic_choices_changed_is_refused_with_them(
    store, unbroken, tmp_path, monkeypatch
):
    # Settings left at auto are chosen anew on resume: on a GPU node where the run began on a
    # CPU, or by a later segpipe, they can differ from those the checkpoint trained with.
    from segpipe.stages.train import adapt

    out = tmp_path / "m"
    with pytest.raises(KilledError):
        train(store, out, train_config(**RESUMABLE), progress=kill_at(2, 1))
    chosen = json.loads(load_checkpoint(out, train_config(**RESUMABLE).resume_key()).chosen)
    monkeypatch.setattr(adapt, "_lr", lambda *_args: (0.05, "another rule"))
    with pytest.raises(InputError, match="other training settings") as refused:
        train(store, out, train_config(**RESUMABLE), resume=True)
    assert f"lr: {chosen['lr']!r} there, 0.05 now" in str(refused.value)
    assert checkpoint_path(out).is_file()  # the refusal keeps the run to resume
    with pytest.raises(InputError, match="seed: 0 there, 5 now"):  # given in both: refused before planning
        train(store, out, train_config(**RESUMABLE, seed=5), resume=True)

    # Given as the checkpoint chose it, the setting resumes the run to the unbroken run's end.
    spec = train(store, out, train_config(**RESUMABLE, lr=chosen["lr"]), resume=True)
    assert spec.training["resumed_from"] == {"epoch": 2, "step": 0}  # the kill came before step 1's save
    a = load_file(str(out / "weights.safetensors"))
    b = load_file(str(unbroken[0] / "weights.safetensors"))
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)
