"""How many CPU cores this process may use.

A container on a cluster (Kubernetes, Slurm with cgroups, ``docker --cpus``) usually sees
every core of its host while its CPU quota allows a few: sizing thread pools, torch's
threads or a local cluster's workers by the visible count oversubscribes the quota many
times over, and every step then waits on the others. Both limits count here: the affinity
mask (``taskset``, cpusets) and the cgroup quota.
"""

from __future__ import annotations

__all__ = ["usable_cores"]


def usable_cores() -> int:
    """Cores this process may run on: the smaller of its affinity mask and its cgroup CPU quota."""
    from dask.system import cpu_count  # reads the affinity mask and cgroup v1/v2 quotas

    return max(1, int(cpu_count()))
