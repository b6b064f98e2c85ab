"""Start a dask-jobqueue SLURM cluster for segpipe and keep it running.

Reads ``jobqueue.slurm`` from the Dask configuration (see deploy/slurm/jobqueue.yaml);
needs ``pip install dask-jobqueue`` on the login node.
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    """Start the cluster, print its address, and wait until interrupted."""
    from dask_jobqueue import SLURMCluster

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=2, help="SLURM jobs (GPU nodes) to start")
    args = parser.parse_args()
    cluster = SLURMCluster()
    cluster.scale(jobs=args.jobs)
    print(f"export SEGPIPE_SCHEDULER={cluster.scheduler_address}")
    print(f"dashboard: {cluster.dashboard_link}")
    try:
        while True:
            time.sleep(60)
    except KeyboardInterrupt:
        cluster.close()


if __name__ == "__main__":
    main()
