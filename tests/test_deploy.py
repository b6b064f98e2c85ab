"""Every deployment file parses, and every entrypoint it names imports as a Prefect flow."""

import ast
import os
import shutil
from pathlib import Path

import pytest
import yaml
from script_support import load_script

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"


def load_entrypoint(entrypoint):
    path, name = entrypoint.split(":")
    return getattr(load_script(ROOT / path, f"entry_{Path(path).stem}"), name)


@pytest.mark.parametrize("path", sorted(DEPLOY.rglob("*.yaml")), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_parses(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs


def test_prefect_deployments_import_and_their_parameters_validate():
    config = yaml.safe_load((DEPLOY / "prefect.yaml").read_text())
    names = {d["name"] for d in config["deployments"]}
    assert {
        "process-regions-nightly",
        "process-region",
        "ingest",
        "train",
        "predict",
        "export",
        "evaluate",
    } <= names
    for deployment in config["deployments"]:
        flow = load_entrypoint(deployment["entrypoint"])
        assert hasattr(flow, "fn") and hasattr(flow, "validate_parameters")
        if deployment.get("parameters"):
            flow.validate_parameters(deployment["parameters"])
    nightly = next(d for d in config["deployments"] if d["name"] == "process-regions-nightly")
    assert nightly["schedules"][0]["cron"] == "0 2 * * *"


def test_kubernetes_cluster_has_gpu_and_cpu_workers():
    cluster, cpu_group = yaml.safe_load_all((DEPLOY / "k8s" / "daskcluster.yaml").read_text())
    assert cluster["kind"] == "DaskCluster" and cpu_group["kind"] == "DaskWorkerGroup"
    gpu = cluster["spec"]["worker"]["spec"]["containers"][0]
    assert gpu["args"][:3] == ["dask", "cuda", "worker"] and "GPU=1" in gpu["args"]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert cpu_group["spec"]["worker"]["spec"]["containers"][0]["args"][:2] == ["dask", "worker"]


def test_slurm_and_docker_files_are_well_formed():
    slurm = yaml.safe_load((DEPLOY / "slurm" / "jobqueue.yaml").read_text())["jobqueue"]["slurm"]
    assert "--gres=gpu:1" in slurm["job-extra-directives"]
    ast.parse((DEPLOY / "slurm" / "start_cluster.py").read_text())
    dockerfile = (DEPLOY / "docker" / "Dockerfile").read_text()
    assert dockerfile.startswith("#") and "FROM nvidia/cuda:" in dockerfile
    assert '".[gpu]"' in dockerfile and "constraints.txt" in dockerfile


# --- A secured setup: bound interfaces, TLS, nothing published (issue 13) ----------------

TEXT_FILES = [p for p in sorted(DEPLOY.rglob("*")) if p.is_file() and p.suffix in {".md", ".sh", ".py", ""}]
K8S = sorted((DEPLOY / "k8s").glob("*.yaml"))
TLS_FLAGS = ("--tls-ca-file", "--tls-cert", "--tls-key")
EVERY_INTERFACE = ("", "0.0.0.0", "::", "[::]", "*")


def _shell_lines(text):
    """Shell command lines of a text, backslash continuations joined."""
    return [line.strip() for line in text.replace("\\\n", " ").splitlines()]


def _yaml_commands(node):
    """Containers' command lines in a parsed YAML document (``command`` + ``args``)."""
    if isinstance(node, dict):
        words = [*(node.get("command") or []), *(node.get("args") or [])]
        if words and all(isinstance(w, str) for w in words):
            yield " ".join(words)
        for value in node.values():
            yield from _yaml_commands(value)
    elif isinstance(node, list):
        for value in node:
            yield from _yaml_commands(value)


def _code(path):
    """A file's shell text: for Markdown, its fenced code blocks only."""
    text = path.read_text()
    return "\n".join(text.split("```")[1::2]) if path.suffix == ".md" else text


def dask_commands():
    """Every `dask scheduler` / `dask worker` / `dask cuda worker` command line in deploy/."""
    lines = [line for path in TEXT_FILES for line in _shell_lines(_code(path))]
    for path in [*K8S, DEPLOY / "prefect.yaml"]:
        for doc in yaml.safe_load_all(path.read_text()):
            lines += list(_yaml_commands(doc))
    found = []
    for line in lines:
        line = line.split("#", 1)[0] if not line.startswith("#") else ""
        for program in ("dask scheduler", "dask-scheduler", "dask cuda worker", "dask worker", "dask-worker"):
            if program in line:
                found.append((program.replace("-", " "), line[line.index(program) :].split("&")[0].split()))
                break
    return found


def _option(words, name):
    """The value of ``--name value`` or ``--name=value`` (None when absent)."""
    for i, word in enumerate(words):
        if word == name and i + 1 < len(words):
            return words[i + 1]
        if word.startswith(name + "="):
            return word.split("=", 1)[1]
    return None


def _host_of(address):
    address = address.split("://", 1)[-1]
    return address.rsplit(":", 1)[0] if ":" in address else address


def test_every_dask_scheduler_binds_a_chosen_interface_and_keeps_dashboards_private():
    commands = dask_commands()
    schedulers = [words for program, words in commands if program == "dask scheduler"]
    assert len(schedulers) >= 3  # README sections 2 and 6, the Kubernetes scheduler
    for words in schedulers:
        host, interface = _option(words, "--host"), _option(words, "--interface")
        assert interface or (host and _host_of(host) not in EVERY_INTERFACE), " ".join(words)
    for _program, words in commands:
        dashboard = _option(words, "--dashboard-address")
        if dashboard is not None:
            assert _host_of(dashboard) not in EVERY_INTERFACE, " ".join(words)
        if "--no-dashboard" not in words and dashboard is None:
            # the default (":8787" / ":0") listens on every interface
            assert "--help" in words, " ".join(words)


def test_dask_options_named_in_deploy_exist():
    from distributed.cli import dask_scheduler, dask_worker

    known = {
        "dask scheduler": {o for p in dask_scheduler.main.params for o in p.opts},
        "dask worker": {o for p in dask_worker.main.params for o in p.opts},
    }
    try:
        from dask_cuda.cli import worker as cuda_worker  # only with the gpu extra

        known["dask cuda worker"] = {o for p in cuda_worker.params for o in p.opts}
    except ImportError:
        pass
    for program, words in dask_commands():
        if program in known:
            options = {w.split("=")[0] for w in words if w.startswith("--")}
            assert options <= known[program], (program, options - known[program])


def test_tls_everywhere_a_cluster_spans_machines():
    readme = (DEPLOY / "README.md").read_text()
    for needle in (*TLS_FLAGS, "tls://", "--protocol tls", "require-encryption"):
        assert needle in readme
    for name in ("CA_FILE", "CLIENT__CERT", "CLIENT__KEY"):
        assert f"DASK_DISTRIBUTED__COMM__TLS__{name}" in readme
    assert "DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION=True" in readme
    # The Kubernetes scheduler and both worker groups: TLS with mounted certificates, and
    # plain TCP refused.
    cluster, cpu_group = yaml.safe_load_all((DEPLOY / "k8s" / "daskcluster.yaml").read_text())
    pods = [
        cluster["spec"]["scheduler"]["spec"],
        cluster["spec"]["worker"]["spec"],
        cpu_group["spec"]["worker"]["spec"],
    ]
    for pod in pods:
        secrets = {v["name"] for v in pod["volumes"] if "secret" in v}
        for container in pod["containers"]:
            args = container["args"]
            mounts = [m["mountPath"] for m in container["volumeMounts"] if m["name"] in secrets]
            for flag in TLS_FLAGS:
                assert any(_option(args, flag).startswith(m + "/") for m in mounts), (flag, args)
            env = {e["name"]: e.get("value") for e in container["env"]}
            assert env["DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION"] == "True"
            if "scheduler" in args:
                assert _option(args, "--protocol") == "tls"
            else:
                assert any(a.startswith("tls://") for a in args)
    pools = yaml.safe_load((DEPLOY / "prefect.yaml").read_text())["definitions"]["work_pools"]
    k8s_env = pools["kubernetes"]["job_variables"]["env"]
    assert k8s_env["SEGPIPE_SCHEDULER"].startswith("tls://")
    assert {"DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT", "DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION"} <= set(
        k8s_env
    )


def _walk(node):
    yield node
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else []
    for child in children:
        yield from _walk(child)


def test_kubernetes_services_stay_inside_the_cluster():
    services = []
    for path in K8S:
        for doc in yaml.safe_load_all(path.read_text()):
            nodes = list(_walk(doc))
            assert not [n for n in nodes if n in ("LoadBalancer", "NodePort")], path
            assert not [n for n in nodes if isinstance(n, dict) and {"nodePort", "hostPort"} & n.keys()], path
            if doc.get("kind") == "Service":
                services.append(doc["spec"])
            services += [n["service"] for n in _walk(doc) if isinstance(n, dict) and "service" in n]
    assert services
    assert all(s.get("type", "ClusterIP") == "ClusterIP" for s in services)
    assert all("externalIPs" not in s for s in services)
    policies = [d for p in K8S for d in yaml.safe_load_all(p.read_text()) if d.get("kind") == "NetworkPolicy"]
    assert policies and policies[0]["spec"]["podSelector"]["matchLabels"]["dask.org/component"] == "scheduler"


def test_prefect_server_listens_on_loopback():
    starts = [
        line.split()
        for path in TEXT_FILES
        for line in _shell_lines(_code(path))
        if "prefect server start" in line
    ]
    assert starts
    assert all(_option(words, "--host") == "127.0.0.1" for words in starts), starts


def test_dask_settings_named_in_deploy_are_real_dask_settings():
    import re

    import dask
    import distributed  # noqa: F401  (loads distributed's defaults into dask.config)

    texts = [p.read_text() for p in DEPLOY.rglob("*") if p.is_file()]
    # DASK_DISTRIBUTED__... variables only: DASK_CONFIG and the operator's DASK_WORKER_NAME
    # are no settings.
    variables = {v for t in texts for v in re.findall(r"\bDASK_DISTRIBUTED__[A-Z0-9_]*[A-Z0-9]", t)}
    keys = {k for t in texts for k in re.findall(r"\bdistributed\.comm\.[a-z.-]*[a-z]", t)}
    keys |= {v.removeprefix("DASK_").lower().replace("__", ".") for v in variables}
    assert "distributed.comm.tls.client.cert" in keys and "distributed.comm.require_encryption" in keys
    missing = object()
    unknown = sorted(k for k in keys if dask.config.get(k, default=missing) is missing)
    assert not unknown


def _readme_block(containing):
    readme = (DEPLOY / "README.md").read_text()
    blocks = readme.split("```")[1::2]
    return next(b.split("\n", 1)[1] for b in blocks if containing in b)


@pytest.mark.skipif(not shutil.which("openssl"), reason="openssl is not installed")
def test_readme_certificates_make_a_tls_handshake_dask_accepts(tmp_path):
    import socket
    import subprocess
    import threading

    from distributed import Security

    script = _readme_block("openssl req -x509")
    subprocess.run(
        ["bash", "-euc", script], env={**os.environ, "HOME": str(tmp_path)}, check=True, timeout=120
    )
    certs = tmp_path / ".dask-tls"
    assert (certs / "ca-key.pem").stat().st_mode & 0o077 == 0  # keys private to their owner
    server = Security(
        tls_ca_file=str(certs / "ca.pem"),
        tls_scheduler_cert=str(certs / "cluster.pem"),
        tls_scheduler_key=str(certs / "cluster-key.pem"),
    ).get_listen_args("scheduler")["ssl_context"]
    client = Security(
        tls_ca_file=str(certs / "ca.pem"),
        tls_client_cert=str(certs / "client.pem"),
        tls_client_key=str(certs / "client-key.pem"),
    ).get_connection_args("client")["ssl_context"]
    a, b = socket.socketpair()
    errors = []

    def serve():
        try:
            with server.wrap_socket(a, server_side=True) as tls:
                tls.sendall(tls.recv(5))
        except Exception as exc:  # reported below
            errors.append(exc)

    thread = threading.Thread(target=serve)
    thread.start()
    with client.wrap_socket(b) as tls:
        tls.sendall(b"hello")
        assert tls.recv(5) == b"hello"
    thread.join(10)
    assert not errors


def _start_cluster_module():
    return load_script(DEPLOY / "slurm" / "start_cluster.py", "start_cluster")


def test_slurm_cluster_starts_with_tls_only(monkeypatch, tmp_path, capsys):
    import sys
    import types

    import dask

    started = []

    class FakeSLURMCluster:  # records what dask-jobqueue would get
        def __init__(self, **kwargs):
            started.append(kwargs)
            self.scheduler_address = "tls://10.0.0.1:8786"
            self.dashboard_link = "http://127.0.0.1:8787/status"

        def scale(self, jobs):
            self.jobs = jobs

        def close(self):
            started.append("closed")

    def interrupted(_seconds):
        raise KeyboardInterrupt

    monkeypatch.setitem(sys.modules, "dask_jobqueue", types.SimpleNamespace(SLURMCluster=FakeSLURMCluster))
    module = _start_cluster_module()
    monkeypatch.setattr(module.time, "sleep", interrupted)
    unset = {"distributed.comm.tls.ca-file": None, "distributed.comm.tls.scheduler.cert": None}
    with (
        dask.config.set(unset),
        pytest.raises(SystemExit, match="--tls-ca-file, --tls-cert, --tls-key missing"),
    ):
        module.main(["--jobs", "1"])
    assert not started  # nothing started without certificates

    files = [str(tmp_path / n) for n in ("ca.pem", "cluster.pem", "cluster-key.pem")]
    module.main(["--jobs", "1", "--tls-ca-file", files[0], "--tls-cert", files[1], "--tls-key", files[2]])
    security = started[0]["security"]
    assert security.require_encryption
    worker = security.get_tls_config_for_role("worker")  # what each worker job is started with
    assert {k: worker[k] for k in ("ca_file", "cert", "key")} == {
        "ca_file": files[0],
        "cert": files[1],
        "key": files[2],
    }
    assert started[-1] == "closed"
    assert "DASK_DISTRIBUTED__COMM__TLS__CA_FILE" in capsys.readouterr().out

    slurm = yaml.safe_load((DEPLOY / "slurm" / "jobqueue.yaml").read_text())["jobqueue"]["slurm"]
    assert slurm["scheduler-options"]["interface"]
    assert slurm["scheduler-options"]["dashboard_address"].startswith("127.0.0.1:")
