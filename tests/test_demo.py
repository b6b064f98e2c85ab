"""The README's demo at full size: slow, run with `pytest -m slow`."""

import json

import pytest


@pytest.mark.slow
def test_demo_reaches_its_accuracy_targets(tmp_path, monkeypatch):
    from flows.demo import run_demo

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    summary = run_demo(tmp_path / "demo")
    assert summary["miou"] >= 0.85
    assert summary["miou"] - summary["baseline_miou"] >= 0.15
    saved = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert saved["miou"] == summary["miou"]
