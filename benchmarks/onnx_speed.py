"""onnxruntime against torch on the same exported network, side by side, on this machine's CPU.

Builds a seeded, untrained segpipe U-Net package (ResNet-34, 6 bands, 5 classes), exports it
with :func:`segpipe.models.onnx.export_onnx` (which checks it against torch), then times
both runtimes on the same batches of normalised windows, one thread each, and prints the
ratio and the largest difference of their logits. Results go to
``benchmarks/results/onnx_speed.json``.

Run:

    .venv/bin/python benchmarks/onnx_speed.py [--window 256] [--batch 4] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from segpipe.models import ModelSpec, build_network, load_model, save_model
from segpipe.models.onnx import export_onnx, load_onnx
from segpipe.types import ClassInfo, default_colour

RESULTS = Path(__file__).resolve().parent / "results" / "onnx_speed.json"
BANDS = ("b1", "b2", "b3", "b4", "b5", "b6")


def _package(folder: Path) -> Path:
    torch.manual_seed(0)
    classes = tuple(ClassInfo(v, f"class {v}", default_colour(v)) for v in range(1, 6))
    spec = ModelSpec("unet", "resnet34", BANDS, (0.0,) * 6, (1.0,) * 6, classes, 256)
    return save_model(folder, spec, build_network("unet", "resnet34", len(BANDS), len(classes)).eval())


def _best(run: object, repeats: int) -> float:
    """The fastest of ``repeats`` timed calls after one warm-up (the least disturbed by other work)."""
    assert callable(run)
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    """Time both runtimes and write the JSON."""
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        package = _package(Path(tmp) / "torch")
        start = time.perf_counter()
        done = export_onnx(package, Path(tmp) / "m.onnx")
        export_s = time.perf_counter() - start
        net, spec = load_model(package)
        net.eval()
        session = load_onnx(done.path, spec, threads=1)
        x = np.random.default_rng(0).standard_normal((args.batch, len(BANDS), args.window, args.window))
        x = x.astype(np.float32)
        with torch.inference_mode():
            torch_s = _best(lambda: net(torch.from_numpy(x)), args.repeats)
            reference = net(torch.from_numpy(x)).numpy()
        onnx_s = _best(lambda: session(x), args.repeats)
        diff = float(np.abs(session(x) - reference).max())
    row = {"window": args.window, "batch": args.batch, "torch_s": round(torch_s, 3),
           "onnxruntime_s": round(onnx_s, 3), "speedup": round(torch_s / onnx_s, 2), "max_abs_diff": diff,
           "export_s": round(export_s, 1)}
    print(f"{args.batch} x {args.window}²: torch {torch_s:.2f} s, onnxruntime {onnx_s:.2f} s "
          f"({row['speedup']}x); largest difference {diff:.1e}; export {export_s:.1f} s")
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "loadavg": [round(v, 2) for v in os.getloadavg()], "results": [row]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
