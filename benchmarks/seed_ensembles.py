"""Would averaging networks of several seeds narrow the seed spread? Scored through the CLI.

Takes the models that ``benchmarks/accuracy.py`` left in its work folder
(``<work>/<data set>/model_<config>_s<seed>``; ``--config``, ``default`` unless given),
combines each run of ``--size`` consecutive seeds (cyclically: 0+1, 1+2, ..., 4+0) with
``segpipe ensemble``, predicts the data set's store with ``segpipe predict`` and scores the
test part with ``segpipe evaluate``, as ``accuracy.py`` scores every model. Each member
trained on its own seed's split, where ``segpipe train --members`` shares one split among
its members, so this estimates what ``--members`` brings without training anything new.
With several configurations (``--config default all_labels``) the k-th member of a run is
the k-th configuration's model.

Run, for instance (a minute or two per ensemble on 2 cores):

    .venv/bin/python benchmarks/accuracy.py --datasets s2-brandenburg --configs default --work W
    .venv/bin/python benchmarks/seed_ensembles.py --work W --dataset s2-brandenburg --size 3

Prints one line per ensemble and a summary line; writes ``<work>/seed_ensembles_<data set>_<size>.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import scores_from_counts  # the table's one mIoU

SEGPIPE = str(Path(sys.executable).parent / "segpipe")


def _cli(*args: str) -> None:
    subprocess.run([SEGPIPE, *args], check=True, capture_output=True)


def score(
    folder: Path,
    seeds: tuple[int, ...],
    scheduler: str | None = None,
    configs: tuple[str, ...] = ("default",),
) -> dict[str, Any]:
    """Test mIoU and IoU by class of the ensemble of the models of ``seeds`` (the k-th of ``configs``).

    ``scheduler`` is predict's ``--scheduler`` (default: its own, a local cluster).
    """
    names = [f"{configs[k % len(configs)]}_s{seed}" for k, seed in enumerate(seeds)]
    tag = "+".join(names)
    members = [str(folder / f"model_{name}") for name in names]
    model = folder / f"seed_ensemble_{tag}"
    _cli("ensemble", *members, "--out", str(model))
    where = ["--scheduler", scheduler] if scheduler else []
    _cli("predict", str(folder / "store.zarr"), "--model", str(model), "--force", *where)
    report = folder / f"report_seed_ensemble_{tag}"
    _cli("evaluate", str(folder / "store.zarr"), "--reference", str(folder / "reference_test.tif"),
         "--out", str(report))
    per_class = json.loads((report / "metrics.json").read_text())["per_class"]
    miou, ious, _ = scores_from_counts(per_class)
    return {"seeds": list(seeds), "members": names, "test_miou": miou, "test_iou": ious}


def main() -> None:
    """Score every cyclic run of ``--size`` seeds; print and write the results."""
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--work", type=Path, required=True, help="accuracy.py's work folder")
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--size", type=int, default=2, help="members per ensemble (2 or more)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--config", nargs="+", default=["default"],
                        help="accuracy.py's configuration of the models (the k-th member's: the k-th)")
    parser.add_argument("--scheduler", default=None,
                        help="predict's scheduler: an address, or threads (default: a local cluster)")
    args = parser.parse_args()
    folder, seeds = args.work / args.dataset, args.seeds
    rows = []
    for i in range(len(seeds)):
        run = tuple(seeds[(i + k) % len(seeds)] for k in range(args.size))
        row = score(folder, run, args.scheduler, tuple(args.config))
        rows.append(row)
        ious = {k: round(v, 2) for k, v in row["test_iou"].items()}
        print(f"{' + '.join(row['members'])}: test mIoU {row['test_miou']:.3f} {ious}", flush=True)
    values = [r["test_miou"] for r in rows]
    print(f"{args.size} members: mean {sum(values) / len(values):.3f}, {min(values):.3f}-{max(values):.3f}, "
          f"spread {max(values) - min(values):.3f}")
    out = args.work / f"seed_ensembles_{args.dataset}_{'+'.join(args.config)}_{args.size}.json"
    out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
