"""Every deployment file parses, and every entrypoint it names imports as a Prefect flow."""

import ast
import importlib.util
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"


def load_entrypoint(entrypoint):
    path, name = entrypoint.split(":")
    spec = importlib.util.spec_from_file_location(f"entry_{Path(path).stem}", ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)


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
