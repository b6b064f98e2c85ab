"""Task planning without a cluster: iter_jobs, BlockJob's dask token, the output layer names."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from dask.base import tokenize
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from segpipe.errors import InputError
from segpipe.grid.box import Box
from segpipe.stages.predict.jobs import BlockJob, ClusterLayout, JobSettings, blocks_box, iter_jobs
from segpipe.stages.predict.outputs import DEFAULT_LAYERS, OutputLayers, legacy_progress, output_layers

SETTINGS = JobSettings(store="/s.zarr", model_dir="/m", model_hash="h", tile=64, overlap=16, batch_size=4)
LAYOUT = ClusterLayout(4, False, (("a", 8, 2), ("b", 4, 2)))
Plan = tuple[np.ndarray, tuple[int, int], int, tuple[int, int]]


def _plan(pending: np.ndarray, raster: tuple[int, int], block: int, task: tuple[int, int]) -> list[BlockJob]:
    return list(iter_jobs(pending, raster=raster, block_size=block, task_blocks=task, layout=LAYOUT,
                          settings=SETTINGS))


@st.composite
def plans(draw: st.DrawFn) -> Plan:
    """(pending mask, raster, block size, blocks per task)."""
    block = draw(st.integers(1, 64))
    height, width = draw(st.integers(1, 10 * block)), draw(st.integers(1, 10 * block))
    shape = (-(-height // block), -(-width // block))
    pending = draw(arrays(np.bool_, shape))
    task = (draw(st.integers(1, shape[0] + 1)), draw(st.integers(1, shape[1] + 1)))
    return pending, (height, width), block, task


@settings(max_examples=200, deadline=None)
@given(plans())
def test_every_pending_block_lands_in_exactly_one_job(plan: Plan) -> None:
    pending, raster, block, task = plan
    jobs = _plan(pending, raster, block, task)
    planned = [b for job in jobs for b in job.blocks]
    # Each pending block exactly once, no finished block at all.
    assert sorted(planned) == sorted(zip(*np.nonzero(pending), strict=True))
    assert len(planned) == len(set(planned))
    for job in jobs:
        assert job.blocks and job.settings is SETTINGS
        # A job's box holds its blocks, lies on block borders inside the raster, spans at
        # most one task's blocks, and its blocks come from one task's group.
        for by, bx in job.blocks:
            b = blocks_box(((by, bx),), block, raster)
            assert job.box.y0 <= b.y0 and b.y1 <= job.box.y1 and job.box.x0 <= b.x0 and b.x1 <= job.box.x1
        assert job.box.y0 % block == 0 and job.box.x0 % block == 0
        assert job.box.y1 <= raster[0] and job.box.x1 <= raster[1]
        assert len({(by // task[0], bx // task[1]) for by, bx in job.blocks}) == 1
        assert job.threads == LAYOUT.threads(len(jobs))
    groups = [(j.blocks[0][0] // task[0], j.blocks[0][1] // task[1]) for j in jobs]
    assert groups == sorted(groups)  # groups row-major


def test_plan_jobs_examples_and_refusals() -> None:
    pending = np.array([[True, False, True], [False, False, True]])
    jobs = _plan(pending, (100, 130), 50, (2, 2))
    assert [(j.blocks, j.box) for j in jobs] == [
        (((0, 0),), Box(0, 0, 50, 50)),  # the group's only pending block: its box only
        (((0, 2), (1, 2)), Box(0, 100, 100, 130)),  # cut at the raster's edge
    ]
    assert not _plan(np.zeros((2, 3), bool), (100, 130), 50, (1, 1))
    with pytest.raises(ValueError, match="pending markers"):
        _plan(pending, (100, 200), 50, (1, 1))
    with pytest.raises(ValueError, match="blocks per task"):
        _plan(pending, (100, 130), 50, (0, 1))


def test_cluster_layout_shares_host_cores_among_the_tasks() -> None:
    # 2 tasks on 4 slots: one per host, each with all of its host's cores.
    assert LAYOUT.threads(2) == (("a", 8), ("b", 4))
    # 8 tasks: 2 at once per host, sharing its cores.
    assert LAYOUT.threads(8) == (("a", 4), ("b", 2))
    assert ClusterLayout(1, True).threads(5) == ()


def test_block_jobs_are_keyword_only_and_tokenize_by_their_fields() -> None:
    job = BlockJob(settings=SETTINGS, box=Box(0, 0, 64, 64), blocks=((0, 0),), threads=(("a", 2),))
    with pytest.raises(TypeError):
        BlockJob(SETTINGS, Box(0, 0, 64, 64))  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        job.box = Box(0, 0, 1, 1)  # type: ignore[misc]
    # Equal jobs, built separately, tokenize equal (and hash equal), in any order of building.
    twin = BlockJob(settings=dataclasses.replace(SETTINGS), box=Box(0, 0, 64, 64), blocks=((0, 0),),
                    threads=(("a", 2),))
    assert twin == job and hash(twin) == hash(job) and tokenize(twin) == tokenize(job)
    # Any differing field, of the job or of its settings, gives another token.
    others = [
        dataclasses.replace(job, box=Box(0, 64, 64, 128)),
        dataclasses.replace(job, blocks=((0, 1),)),
        dataclasses.replace(job, threads=(("a", 1),)),
        dataclasses.replace(job, settings=dataclasses.replace(SETTINGS, overlap=8)),
        dataclasses.replace(job, settings=dataclasses.replace(SETTINGS, layers=DEFAULT_LAYERS.staged())),
        dataclasses.replace(job, settings=dataclasses.replace(SETTINGS, model_hash="other")),
    ]
    tokens = {tokenize(j) for j in others}
    assert len(tokens) == len(others) and tokenize(job) not in tokens
    assert job.__dask_tokenize__() == ("BlockJob", SETTINGS, Box(0, 0, 64, 64), ((0, 0),), (("a", 2),))


def test_output_layer_names() -> None:
    assert output_layers() == DEFAULT_LAYERS == OutputLayers("classes", "confidence", "probabilities",
                                                            "_progress/predict")
    assert DEFAULT_LAYERS.publishable and DEFAULT_LAYERS.staged().classes == "_predict/classes"
    rf = output_layers("classes_rf")
    assert rf == ("classes_rf", "confidence_rf", "probabilities_rf", "_progress/predict_rf")
    assert legacy_progress(rf) == "progress_predict_rf"
    assert legacy_progress(DEFAULT_LAYERS) == "progress_predict"
    assert not rf.publishable
    assert rf.data(False) == {"classes": "classes_rf", "confidence": "confidence_rf"}
    assert rf.data(True)["probabilities"] == "probabilities_rf"
    for bad in ("image", "labels", "confidence", "classes_", "classes_a/b", "_predict/classes", "rf", ""):
        with pytest.raises(InputError, match="must be 'classes' or 'classes_<name>'"):
            output_layers(bad)
