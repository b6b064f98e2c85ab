"""Cores counted as a container's CPU quota allows, not as many as its host shows."""

import dask.system
import pytest
import torch


@pytest.fixture
def one_core_quota(monkeypatch):
    # A cgroup v2 "cpu.max" of "100000 100000": one core's worth of time per period,
    # whatever the affinity mask shows.
    monkeypatch.setattr(dask.system, "_try_extract_cgroup_cpu_quota", lambda: (100000, 100000))
    monkeypatch.setattr(dask.system, "psutil", None)


def test_a_cpu_quota_caps_the_usable_cores(one_core_quota):
    from segpipe.cores import usable_cores

    assert usable_cores() == 1


def test_a_fractional_quota_rounds_up(monkeypatch):
    from segpipe.cores import usable_cores

    monkeypatch.setattr(dask.system, "_try_extract_cgroup_cpu_quota", lambda: (50000, 100000))
    assert usable_cores() == 1  # half a core still runs one thread


def test_training_threads_fit_the_quota(one_core_quota):
    from segpipe.stages.train.loop import _use_threads

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # torch's own default: every visible core
        _use_threads(torch.device("cpu"), threads=0, world=1)
        assert torch.get_num_threads() == 1
        _use_threads(torch.device("cpu"), threads=2, world=1)  # asked for: kept
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_each_test_process_gets_its_own_share_of_the_usable_cores():
    from pin_support import process_cores

    assert [process_cores([0, 1], n, 2, 2) for n in (0, 1)] == [[0], [1]]
    # 16 cores shown, a quota of 4: two each, none shared.
    assert [process_cores(list(range(16)), n, 2, 4) for n in (0, 1)] == [[0, 1], [2, 3]]
    assert [process_cores([0, 1, 2], n, 2, 3) for n in (0, 1)] == [[0], [1]]
    assert process_cores([0], 0, 2, 1) is None  # fewer cores than processes: left alone


def test_this_process_runs_on_its_share_under_xdist():
    import os

    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    visible = os.cpu_count() or 1
    if not (worker and count and hasattr(os, "sched_getaffinity")) or visible < int(count):
        pytest.skip("not a test process of an xdist run with a core for each process")
    # Unpinned, a process of two on two cores would run on both.
    assert len(os.sched_getaffinity(0)) <= max(1, visible // int(count))
