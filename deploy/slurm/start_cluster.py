"""Start a dask-jobqueue SLURM cluster for segpipe, secured with TLS, and keep it running.

Reads ``jobqueue.slurm`` from the Dask configuration (see deploy/slurm/jobqueue.yaml);
needs ``pip install dask-jobqueue`` on the login node. The scheduler and every worker
job use the certificates given here (or in Dask's ``distributed.comm.tls`` settings,
e.g. DASK_DISTRIBUTED__COMM__TLS__CA_FILE) and refuse unencrypted connections; the
address printed is ``tls://``. See deploy/README.md, sections 5 and 6.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any


def cluster_security(args: argparse.Namespace) -> Any:
    """The cluster's ``distributed.Security``, or None with ``--insecure``.

    One certificate serves the scheduler and the workers; missing options fall back to
    Dask's configuration.

    Raises:
        SystemExit: No CA, certificate or key was given (a scheduler without TLS runs
            whatever code anyone who reaches it sends).
    """
    if args.insecure:
        return None
    from distributed import Security

    files = {
        "tls_ca_file": args.tls_ca_file,
        "tls_scheduler_cert": args.tls_cert,
        "tls_scheduler_key": args.tls_key,
        "tls_worker_cert": args.tls_cert,
        "tls_worker_key": args.tls_key,
    }
    # Only what was given: an explicit None would hide the value of Dask's configuration.
    security = Security(require_encryption=True, **{k: v for k, v in files.items() if v})
    given = security.get_tls_config_for_role("scheduler")
    missing = [
        option
        for option, key in (("--tls-ca-file", "ca_file"), ("--tls-cert", "cert"), ("--tls-key", "key"))
        if not given.get(key)
    ]
    if missing:
        raise SystemExit(
            f"error: {', '.join(missing)} missing: give the cluster's CA, certificate and key "
            "(deploy/README.md, section 6), or --insecure for a plain-TCP cluster on a machine of your own"
        )
    return security


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=2, help="SLURM jobs (GPU nodes) to start")
    parser.add_argument("--tls-ca-file", help="CA certificate (PEM) that signed every certificate")
    parser.add_argument("--tls-cert", help="certificate (PEM) of the scheduler and workers")
    parser.add_argument("--tls-key", help="private key (PEM) of that certificate")
    parser.add_argument(
        "--insecure", action="store_true", help="no TLS: plain TCP (a machine of your own only)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Start the cluster, print its address, and wait until interrupted."""
    args = parse_args(argv)
    security = cluster_security(args)
    from dask_jobqueue import SLURMCluster

    cluster = SLURMCluster(security=security) if security is not None else SLURMCluster()
    cluster.scale(jobs=args.jobs)
    print(f"export SEGPIPE_SCHEDULER={cluster.scheduler_address}")
    if security is not None:
        print(
            "# and, for segpipe's client, a certificate signed by the same CA:\n"
            f"export DASK_DISTRIBUTED__COMM__TLS__CA_FILE={args.tls_ca_file or 'PATH/ca.pem'}\n"
            "export DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT=PATH/client.pem\n"
            "export DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY=PATH/client-key.pem\n"
            "export DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION=True"
        )
    print(f"dashboard: {cluster.dashboard_link} (on this node: ssh -L 8787:127.0.0.1:8787 {_host()})")
    sys.stdout.flush()
    try:
        while True:
            time.sleep(60)
    except KeyboardInterrupt:
        cluster.close()


def _host() -> str:
    import socket

    return socket.gethostname()


if __name__ == "__main__":
    main()
