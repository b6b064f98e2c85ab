"""benchmarks/spy_profile.py: py-spy's raw stacks sorted into the steps of prediction, per process role."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from spy_profile import classify_stack, summarise

DRIVER = 'process 10:"python scale.py --stage predict"'
# A spawned worker's command line holds a ';', which must not split the stack there.
WORKER = 'process 11:"python -c from multiprocessing.spawn import spawn_main; spawn_main(tracker_fd=3)"'
TASK = ("run_block (segpipe/stages/predict/worker.py:283);"
        "_predict_blocks (segpipe/stages/predict/worker.py:253)")


@pytest.mark.parametrize(
    ("frames", "step"),
    [
        ([TASK, "BatchQueue._call (segpipe/stages/predict/blend.py:255)",
          "ForestNet.forward (segpipe/models/forest.py:190)"], "forward"),
        ([TASK, "RowAccumulator.add (segpipe/stages/predict/blend.py:340)"], "blend"),
        ([TASK, "_BlockWriter.add (segpipe/stages/predict/worker.py:220)",
          "encode_probabilities (segpipe/stages/predict/pixels.py:65)"], "argmax and encode"),
        (["_WorkItem.run (concurrent/futures/thread.py:58)",
          "ZstdCodec._decode_sync (zarr/codecs/zstd.py:79)"], "read: zarr decode"),
        ([TASK, "ForestNet.forward (segpipe/models/forest.py:190)",
          "_find_and_load (<frozen importlib._bootstrap>:1176)"], "imports"),
        (["_run_task (distributed/worker.py:2785)"], "dask scheduling and comms"),
        (["Thread.run (threading.py:982)", "EpollSelector.select (selectors.py:468)"], "idle"),
        ([], "native (no Python frame)"),
    ],
)
def test_each_stack_goes_to_its_step(frames: list[str], step: str) -> None:
    assert classify_stack(frames) == step


def test_shares_are_of_each_roles_busy_samples(tmp_path: Path) -> None:
    raw = tmp_path / "spy.txt"
    raw.write_text("\n".join([
        f"{DRIVER};_run_task (distributed/worker.py:2785) 4",
        f"{DRIVER};Thread.run (threading.py:982);EpollSelector.select (selectors.py:468) 50",
        f"{DRIVER};{WORKER};{TASK};ForestNet.forward (segpipe/models/forest.py:190) 30",
        f"{DRIVER};{WORKER};{TASK};RowAccumulator.add (segpipe/stages/predict/blend.py:340) 10",
        f"{DRIVER};{WORKER} 10",
        f"{DRIVER};{WORKER};Thread.run (threading.py:982);Condition.wait (threading.py:320) 7",
        "",
    ]))
    out = summarise(raw)
    assert out["samples"] == {"driver_busy": 4, "driver_idle": 50, "workers_busy": 50, "workers_idle": 7}
    assert out["driver"] == {"dask scheduling and comms": 1.0}
    assert out["workers"] == {"forward": 0.6, "blend": 0.2, "native (no Python frame)": 0.2}
    assert list(out["workers"]) == ["forward", "blend", "native (no Python frame)"]
