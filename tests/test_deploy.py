"""Deployment files parse and point at flows that import."""

import importlib.util
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_prefect_yaml_entrypoints_import():
    config = yaml.safe_load((ROOT / "deploy" / "prefect.yaml").read_text())
    assert config["deployments"]
    for deployment in config["deployments"]:
        path, name = deployment["entrypoint"].split(":")
        spec = importlib.util.spec_from_file_location("entry", ROOT / path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        flow = getattr(module, name)
        assert hasattr(flow, "fn")  # a Prefect flow
        # the example parameters validate against the flow's parameter model
        flow_params = deployment.get("parameters", {})
        if "run" in flow_params:
            from flows.process_region import RegionRun

            RegionRun(**flow_params["run"])
