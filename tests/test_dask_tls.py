"""A Dask cluster secured with TLS, as deploy/README.md sets it up, on loopback.

A real ``dask scheduler`` and ``dask worker`` (the venv's CLI, separate processes) run
with certificates signed by a CA made here; segpipe's client reaches them over
``tls://`` with the certificates given through the DASK_DISTRIBUTED__COMM__TLS__*
variables the README names, and a client without a certificate is turned away.
"""

from __future__ import annotations

import datetime
import os
import socket
import ssl
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

cryptography = pytest.importorskip("cryptography")

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402

DASK = Path(sys.executable).with_name("dask")

# What a user exports before `segpipe predict --scheduler tls://...` (deploy/README.md);
# file names relative to the certificate folder.
CLIENT_ENV = {
    "DASK_DISTRIBUTED__COMM__TLS__CA_FILE": "ca.pem",
    "DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT": "client.pem",
    "DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY": "client-key.pem",
    "DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION": "True",
}

# Runs segpipe's client as a user would: a fresh process whose dask config comes from
# the environment only. Prints the task's result, or the error's type and message.
CLIENT = textwrap.dedent(
    """
    import sys
    from segpipe.cluster import get_client

    def tls_only(x):
        return x * 2

    try:
        with get_client(sys.argv[1]) as client:
            print("result", client.submit(tls_only, 21).result(timeout=20))
    except BaseException as exc:
        print("refused", type(exc).__name__, exc)
    """
)


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def make_certificates(folder: Path) -> None:
    """A CA, and a certificate and key for the cluster and for a client, signed by it."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("segpipe-dask-ca"))
        .issuer_name(_name("segpipe-dask-ca"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    (folder / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for name in ("cluster", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(f"segpipe-{name}"))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        (folder / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key, folder / f"{name}-key.pem")


def _tls_args(folder: Path) -> list[str]:
    return [
        "--tls-ca-file",
        str(folder / "ca.pem"),
        "--tls-cert",
        str(folder / "cluster.pem"),
        "--tls-key",
        str(folder / "cluster-key.pem"),
    ]


def _wait_for(path: Path, proc: subprocess.Popen[bytes], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"dask scheduler did not start (exit {proc.poll()})")
        time.sleep(0.2)


def _clients(runs: list[tuple[str, dict[str, str]]]) -> list[str]:
    """Run segpipe's client once per (address, environment), side by side; their last lines."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CLIENT, address],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for address, env in runs
    ]
    lines = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        lines.append(out.strip().splitlines()[-1] if out.strip() else err)
    return lines


@pytest.fixture
def tls_cluster(tmp_path):
    """A scheduler and one worker speaking TLS on 127.0.0.1 only; yields (address, cert folder)."""
    make_certificates(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_")}
    env["DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION"] = "True"
    scheduler_file = tmp_path / "scheduler.json"
    where = ["--scheduler-file", str(scheduler_file)]
    quiet = ["--no-dashboard", *_tls_args(tmp_path)]  # no dashboard: nothing listens but the TLS port
    processes = [
        subprocess.Popen(
            [
                str(DASK),
                "scheduler",
                "--protocol",
                "tls",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                *where,
                *quiet,
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    ]
    try:
        _wait_for(scheduler_file, processes[0], 60)
        processes.append(
            subprocess.Popen(
                [str(DASK), "worker", *where, "--host", "127.0.0.1", "--nthreads", "1", "--no-nanny", *quiet],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        import json

        yield json.loads(scheduler_file.read_text())["address"], tmp_path
    finally:
        for proc in reversed(processes):
            proc.terminate()
        for proc in reversed(processes):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()


def _handshake_without_certificate(address: str, ca_file: Path) -> object:
    """What a TLS client that trusts the CA but shows no certificate gets from ``address``."""
    host, port = address.removeprefix("tls://").rsplit(":", 1)
    ctx = ssl.create_default_context(cafile=str(ca_file))
    ctx.check_hostname = False  # dask checks the CA signature, not host names
    try:
        with socket.create_connection((host, int(port)), timeout=10) as raw, ctx.wrap_socket(raw) as tls:
            # With TLS 1.3 the server's refusal arrives after the handshake, on the first read.
            return tls.recv(1)
    except (ssl.SSLError, ConnectionError) as exc:
        return exc


def test_segpipe_client_runs_a_task_over_tls_and_clients_without_certificates_are_refused(tls_cluster):
    address, certs = tls_cluster
    assert address.startswith("tls://127.0.0.1:")  # bound to loopback, not every interface
    base = {k: v for k, v in os.environ.items() if not k.startswith("DASK_")}
    # A refused client should say so in seconds, not after the default 30 s of retries.
    base["DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT"] = "5s"
    good = {**base, **{k: v if k.endswith("ENCRYPTION") else str(certs / v) for k, v in CLIENT_ENV.items()}}

    stranger = certs / "stranger"
    stranger.mkdir()
    make_certificates(stranger)
    foreign = {
        **good,  # a certificate and key, but signed by a CA the cluster does not know
        "DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT": str(stranger / "client.pem"),
        "DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY": str(stranger / "client-key.pem"),
    }
    plain = address.replace("tls://", "tcp://")  # no TLS at all, to the TLS port

    results = _clients([(address, good), (address, foreign), (plain, base)])
    assert results[0] == "result 42", results[0]
    for refused in results[1:]:
        assert refused.startswith("refused"), refused

    # The scheduler demands a client certificate: trusting its CA is not enough to get in.
    answer = _handshake_without_certificate(address, certs / "ca.pem")
    assert isinstance(answer, ssl.SSLError), answer
    assert "certificate required" in str(answer) or "handshake failure" in str(answer), answer  # 1.3 / 1.2
