"""What test-time augmentation (``segpipe predict --tta``) adds, on packages already trained.

``benchmarks/accuracy.py --work W`` keeps each trained package as ``W/<data set>/model_<config>_s<seed>``.
This script predicts each of them twice through the CLI, as trained and with ``--tta`` (the mean
of the 8 flips and rotations of every window), scores the test part of the data set the same
way ``accuracy.py`` does, and prints one row per package: test mIoU, foreground IoU and
predict's wall seconds, both ways, side by side in one run. Results go to a JSON file.

Example::

    .venv/bin/python benchmarks/tta.py --work /tmp/acc --dataset spacenet4-atlanta \\
        --config default --seeds 0 1 2 3 4 --results benchmarks/results/tta.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import accuracy  # the benchmark beside this one


def parse_args() -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", type=Path, required=True, help="accuracy.py's kept work folder")
    parser.add_argument("--dataset", required=True, choices=sorted(accuracy.DATASETS))
    parser.add_argument("--config", default="default", help="the config whose packages to rescore")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per CLI call")
    parser.add_argument("--results", type=Path, required=True, help="JSON file to write")
    return parser.parse_args()


def rescore(prep: accuracy.Prepared, config: str, seed: int, timeout: float) -> dict[str, Any]:
    """One package predicted plainly and with ``--tta``: both scores."""
    model = prep.work / f"model_{config}_s{seed}"
    if not (model / "model.json").exists():
        raise SystemExit(f"no package at {model}: run accuracy.py --work first")
    row: dict[str, Any] = {"dataset": prep.name, "config": config, "seed": seed}
    for name, extra in (("plain", []), ("tta", ["--tta"])):
        accuracy.log(f"{prep.name}: predict {config} seed {seed} ({name})")
        row[name] = accuracy.score_package(prep, model, f"{config}_s{seed}_{name}", timeout, extra)
    return row


def _fg(name: str, scores: dict[str, Any]) -> str:
    """The data set's foreground class's IoU (accuracy.py's), else '-'."""
    iou = scores["test_iou"].get(accuracy._foreground(name) or "")
    return "-" if iou is None else f"{iou:.3f}"


def main() -> None:
    """Rescore every requested package; print the table; write the JSON."""
    args = parse_args()
    prep = accuracy.prepare(args.dataset, args.work, args.timeout)
    rows = [rescore(prep, args.config, seed, args.timeout) for seed in args.seeds]
    print("| seed | test mIoU | with --tta | foreground IoU | with --tta | predict wall s | with --tta |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        p, t = r["plain"], r["tta"]
        fg = _fg(args.dataset, p), _fg(args.dataset, t)
        print(
            f"| {r['seed']} | {p['test_miou']:.3f} | {t['test_miou']:.3f} | {fg[0]} | {fg[1]} "
            f"| {p['predict_wall_s']:.0f} | {t['predict_wall_s']:.0f} |"
        )
    args.results.write_text(json.dumps({"provenance": accuracy.provenance(), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
