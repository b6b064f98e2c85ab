"""The demo: a synthetic region through ``process_region``, with a summary table.

Trains from the sparse labels only and scores against the dense truth, beside a
per-pixel random forest trained on the same labels.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from flows.engine import use_local_engine
from flows.process_region import RegionRun, process_region
from flows.tasks import baseline_stage, evaluate_stage
from segpipe.stages.train import NetworkConfig
from segpipe.synth import SynthRegion, synthesize

__all__ = ["announce_stages", "run_demo"]

_LABELS = {"baseline": "random forest baseline", "evaluate": "evaluate"}


def _label(task: Any) -> str:
    """``evaluate classes``: the task's name and, for evaluate, the layer it scores."""
    from prefect.context import TaskRunContext

    label = _LABELS.get(task.name, task.name)
    ctx = TaskRunContext.get()
    layer = ctx.parameters.get("layer") if ctx is not None and ctx.parameters else None
    return f"{label} {layer}" if layer else label


class _DropHookLogs(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "_announce_" not in record.getMessage()


@contextlib.contextmanager
def announce_stages(con: Console, *tasks: Any) -> Iterator[None]:
    """Print a line when each of ``tasks`` starts and ends, for the duration.

    The forest baseline (minutes) and the evaluations log nothing while they work: on
    a terminal or in a log file the demo looked stuck. Prefect's state hooks of the
    stage tasks print the lines; they are removed again at the end.
    """
    started: dict[Any, float] = {}

    def _announce_start(task: Any, task_run: Any, state: Any) -> None:
        started[task_run.id] = time.perf_counter()
        con.print(f"  {_label(task)}: started", highlight=False)

    def _announce_end(task: Any, task_run: Any, state: Any) -> None:
        seconds = time.perf_counter() - started.pop(task_run.id, time.perf_counter())
        verb = "finished" if state.is_completed() else "failed"
        con.print(f"  {_label(task)}: {verb} in {seconds:.1f} s", highlight=False)

    hooks = [(t.on_running_hooks, _announce_start) for t in tasks]
    hooks += [(t.on_completion_hooks, _announce_end) for t in tasks]
    hooks += [(t.on_failure_hooks, _announce_end) for t in tasks]
    for hook_list, hook in hooks:
        hook_list.append(hook)
    # Prefect logs every hook call ("Running hook ..."): two lines of noise per line printed.
    quiet = _DropHookLogs()
    task_log = logging.getLogger("prefect.task_runs")
    task_log.addFilter(quiet)
    try:
        yield
    finally:
        task_log.removeFilter(quiet)
        for hook_list, hook in hooks:
            hook_list.remove(hook)


def run_demo(
    out: Path, size: int = 2048, epochs: int = 8, seed: int = 0, console: Console | None = None
) -> dict[str, Any]:
    """Generate a synthetic region and process it end to end.

    Args:
        out: Output folder.
        size: Scene edge in pixels.
        epochs: Training epochs.
        seed: Seed of the scene and the training.
        console: Where progress and the summary are printed.

    Returns:
        The summary also written to ``out/summary.json``.
    """
    con = console or Console(stderr=True)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    use_local_engine(out / ".prefect")
    started = time.perf_counter()
    con.print(f"[bold]segpipe demo[/bold]: {size} x {size} px synthetic region in {out}")
    with con.status("generating the synthetic region"):
        region = synthesize(out / "region", size=size, bands=4, tiles=2, seed=seed)
    synth_s, megapixels = time.perf_counter() - started, size * size / 1e6
    con.print(
        f"  synthetic region: {len(region.tiles)} GeoTIFF tiles + VRT, "
        f"{region.labelled_fraction:.1%} of pixels labelled ({synth_s:.1f} s)"
    )
    run = _demo_region(out, region, epochs, seed)
    with announce_stages(con, baseline_stage, evaluate_stage):
        result = process_region(run)
    synth = {
        "stage": "synth",
        "seconds": synth_s,
        "megapixels": megapixels,
        "mpx_per_s": megapixels / synth_s,
        "output": str(region.image),
    }
    stages = [synth, *result["stages"]]
    summary = _summary(out, size, run, result, stages, region.labelled_fraction)
    summary["total_seconds"] = time.perf_counter() - started
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _print_summary(con, summary, out)
    return summary


def _demo_region(out: Path, region: SynthRegion, epochs: int, seed: int) -> RegionRun:
    """The demo's region: the synthetic scene, trained from its sparse labels, scored on its truth."""
    return RegionRun(
        images=[str(region.image)],
        store=str(out / "region.zarr"),
        labels=str(region.labels_vector),
        classes=str(region.classes),
        model=str(out / "model"),
        # 96 px chips: enough context for the scene's textures at half the cost of 128 px.
        # The per-pixel head, the linear start and the Dice share are pinned off, as when the
        # demo's targets were measured (the synthetic 10 m pixels would switch the first two
        # on); what the automatic choices do on real scenes is measured by benchmarks/accuracy.py.
        train=NetworkConfig(
            epochs=epochs, chip_size=96, seed=seed, pixel_head=0, dice_weight=0.0, linear_start=False
        ),
        export_dir=str(out / "cog"),
        reference=str(region.truth),
        report_dir=str(out / "report"),
        baseline=True,
    )


def _summary(
    out: Path,
    size: int,
    run: RegionRun,
    result: dict[str, Any],
    stages: list[dict[str, Any]],
    labelled_fraction: float,
) -> dict[str, Any]:
    """The demo's summary: both mIoUs and the gain, the stages' records, the outputs."""
    miou, baseline = result["miou"], result["baseline_miou"]
    return {
        "size": size,
        "miou": miou,
        "baseline_miou": baseline,
        "miou_gain_over_baseline": miou - baseline if miou is not None and baseline is not None else None,
        "labelled_fraction": labelled_fraction,
        "total_seconds": None,  # set by the caller once everything is done
        "stages": stages,
        "outputs": {
            "store": run.store,
            "model": run.model,
            "cog_classes": str(out / "cog" / "classes.tif"),
            "cog_confidence": str(out / "cog" / "confidence.tif"),
            "report": str(out / "report"),
        },
    }


def _print_summary(con: Console, summary: dict[str, Any], out: Path) -> None:
    """The stages as a table, then both mIoUs and where the summary is."""
    table = Table(title="segpipe demo summary")
    for col in ("stage", "seconds", "Mpx/s", "output"):
        table.add_column(col, justify="right" if col in ("seconds", "Mpx/s") else "left")
    for s in summary["stages"]:
        rate = s.get("mpx_per_s")
        table.add_row(
            s["stage"], f"{s['seconds']:.1f}", "" if rate is None else f"{rate:.2f}", str(s["output"])
        )
    con.print(table)
    con.print(
        f"mIoU against the dense truth: network [bold]{summary['miou']:.3f}[/bold], "
        f"per-pixel random forest {summary['baseline_miou']:.3f} "
        f"(trained on the same sparse labels); total {summary['total_seconds']:.0f} s"
    )
    con.print(f"summary: {out / 'summary.json'}")
