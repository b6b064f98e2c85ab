"""How far a from-scratch U-Net gets on the building scene on a CPU, outside the pipeline.

Issue 18 asks for building IoU 0.5 on ``tests/data/spacenet4-atlanta`` on a CPU; segpipe's
defaults reach 0.185. This probe trains smp's ResNet-18 U-Net (segpipe's decoder widths)
directly in torch on the agreed split (train on columns x < 540, score building IoU on
x >= 540), so that training length, working resolution and normalisation can be varied
quickly without the pipeline around them. It prints the building IoU of the whole test part
every fifth of the run, beside the training loss and the CPU seconds so far.

Run, for instance (each takes 5-20 CPU-minutes on 2 cores):

    .venv/bin/python benchmarks/building_probe.py --steps 300 --lr 2e-3
    .venv/bin/python benchmarks/building_probe.py --steps 400 --scale 2 --threads 1

Chips are 128 px, half of them centred on a building pixel (segpipe's balanced chips), each
flipped or rotated at random (``--aug strong`` also jitters gain, offset and noise; ``--zoom Z``
cuts each chip at a random scale within [1/Z, Z] and resizes it to ``--chip``); the loss
is half cross-entropy, half soft Dice (segpipe's foreground rule); AdamW with a one-cycle
schedule. ``--unlabelled N`` adds N chips a step from the part without labels (x >= 540:
its image, never its labels), taught by a mean teacher (an average of the network's own
weights) wherever the teacher is confident (``--tau``): semi-supervised self-training on
the very pixels a user wants mapped. ``--pretext N`` first trains the same network for N
steps to fill in hidden 16-px squares of chips from the whole image (masked inpainting, the
unlabelled part's imagery included) and starts the training from its encoder and decoder:
a network pretrained on the scene itself, where no pretrained weights may be downloaded.
Each report also gives the building IoU when a pixel is called building above other
probabilities than one half (``thresholds``), of the network alone and of the mean of its 8
flips and rotations (``tta``): what a tuned decision rule or test-time augmentation would
add (read on the test part, so an upper bound for either).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch
import torch.nn.functional as F  # noqa: N812 (torch's own spelling)

SCENE = Path(__file__).resolve().parents[1] / "tests" / "data" / "spacenet4-atlanta"
SPLIT_X = 540
THRESHOLDS = (0.2, 0.3, 0.4, 0.5, 0.6)
DECODER = (128, 64, 32, 16, 16)


def _arguments() -> argparse.Namespace:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--chip", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--dice", type=float, default=0.5, help="share of soft Dice in the loss")
    parser.add_argument("--balanced", type=float, default=0.5, help="share of chips centred on buildings")
    parser.add_argument("--scale", type=int, default=1, help="work at this many pixels per side averaged")
    parser.add_argument("--norm", choices=("std", "percentile"), default="std")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--aug", choices=("flip", "strong"), default="flip",
                        help="strong: also gain x0.7-1.4, offset N(0, 0.3) and, half the time, noise")
    parser.add_argument("--zoom", type=float, default=1.0,
                        help="chips cut at a random scale in [1/zoom, zoom] and resized to --chip (1: none)")
    parser.add_argument("--encoder", default="resnet18", help="smp encoder (no pretrained weights)")
    parser.add_argument("--paste", type=float, default=0.0,
                        help="share of chips given 1-3 training buildings pasted at random (copy-paste)")
    parser.add_argument("--unlabelled", type=int, default=0,
                        help="chips a step from the unlabelled part (x >= 540), taught by a mean teacher")
    parser.add_argument("--tau", type=float, default=0.9, help="the teacher's confidence a pixel must reach")
    parser.add_argument("--tau-building", type=float, default=None,
                        help="the same for a pixel the teacher calls building (default: --tau)")
    parser.add_argument("--unlabelled-weight", type=float, default=1.0,
                        help="the unlabelled chips' loss weight, reached linearly by 30 %% of the steps")
    parser.add_argument("--pretext", type=int, default=0,
                        help="steps of masked inpainting on the whole image before training (0: none)")
    parser.add_argument("--mask-ratio", type=float, default=0.5, help="share of 16-px squares hidden")
    return parser.parse_args()


def _scene(scale: int, norm: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image (normalised on the training part), labels at the working scale, labels at 0.5 m."""
    with rasterio.open(SCENE / "image.tif") as src:
        image = src.read(1).astype(np.float32)
    with rasterio.open(SCENE / "labels.tif") as src:
        full = (src.read(1) == 2).astype(np.int64)  # 1 background, 2 building
    train = image[:, :SPLIT_X]
    if norm == "std":
        image = (image - train.mean()) / train.std()
    else:
        low, high = np.percentile(train, [2, 98])
        image = np.clip((image - low) / (high - low), 0, 1) * 2 - 1
    labels = full
    if scale > 1:
        h, w = image.shape[0] // scale, image.shape[1] // scale
        image = image[: h * scale, : w * scale].reshape(h, scale, w, scale).mean((1, 3))
        labels = full[: h * scale, : w * scale].reshape(h, scale, w, scale).mean((1, 3)) >= 0.5
    return image.astype(np.float32), labels.astype(np.int64), full


def _batch(
    image: np.ndarray, labels: np.ndarray, args: argparse.Namespace, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chips of the training part, ``args.balanced`` of them centred on a building pixel."""
    height, train_w = image.shape[0], SPLIT_X // args.scale
    ys, xs = np.nonzero(labels[:, :train_w])
    chips, targets = [], []
    for _ in range(args.batch):
        chip = _zoomed_edge(args, rng, min(height, train_w))
        if rng.random() < args.balanced:
            i = rng.integers(ys.size)
            y0 = int(np.clip(ys[i] - rng.integers(chip), 0, height - chip))
            x0 = int(np.clip(xs[i] - rng.integers(chip), 0, train_w - chip))
        else:
            y0, x0 = int(rng.integers(height - chip + 1)), int(rng.integers(train_w - chip + 1))
        a, b = image[y0 : y0 + chip, x0 : x0 + chip], labels[y0 : y0 + chip, x0 : x0 + chip]
        if chip != args.chip:
            a, b = _resized(a, b, args.chip)
        if args.paste and rng.random() < args.paste:
            a, b = _pasted(a, b, args.instances, rng)
        if args.aug == "strong":
            a = _jitter(a, rng)
        k = int(rng.integers(8))
        if k >= 4:
            a, b = a[:, ::-1], b[:, ::-1]
        chips.append(np.rot90(a, k % 4).copy())
        targets.append(np.rot90(b, k % 4).copy())
    return torch.from_numpy(np.stack(chips)[:, None]), torch.from_numpy(np.stack(targets))


def _instances(image: np.ndarray, labels: np.ndarray, train_w: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each training building as (image patch, pasted mask): its footprint grown by 3 px.

    The grown ring carries the roof's edge and a little ground, labelled as it was, so a pasted
    building keeps the outline the network must find.
    """
    from scipy import ndimage

    found, _n = ndimage.label(labels[:, :train_w] == 1)
    out = []
    for box in ndimage.find_objects(found):
        if box is None:
            continue
        y0, y1 = max(box[0].start - 3, 0), min(box[0].stop + 3, labels.shape[0])
        x0, x1 = max(box[1].start - 3, 0), min(box[1].stop + 3, train_w)
        grown = ndimage.binary_dilation(labels[y0:y1, x0:x1] == 1, iterations=3)
        out.append((np.stack([image[y0:y1, x0:x1], labels[y0:y1, x0:x1]]), grown))
    return out


def _pasted(
    a: np.ndarray, b: np.ndarray, instances: list[tuple[np.ndarray, np.ndarray]], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """The chip with 1-3 buildings pasted at random places, each flipped and rotated at random."""
    a, b = a.copy(), b.copy()
    for _ in range(int(rng.integers(1, 4))):
        patch, mask = instances[int(rng.integers(len(instances)))]
        k = int(rng.integers(8))
        patch, mask = np.rot90(patch, k % 4, (1, 2)), np.rot90(mask, k % 4)
        if k >= 4:
            patch, mask = patch[:, :, ::-1], mask[:, ::-1]
        h, w = min(mask.shape[0], a.shape[0]), min(mask.shape[1], a.shape[1])
        y0, x0 = int(rng.integers(a.shape[0] - h + 1)), int(rng.integers(a.shape[1] - w + 1))
        m = mask[:h, :w]
        a[y0 : y0 + h, x0 : x0 + w][m] = patch[0, :h, :w][m]
        b[y0 : y0 + h, x0 : x0 + w][m] = patch[1, :h, :w][m]
    return a, b


def _zoomed_edge(args: argparse.Namespace, rng: np.random.Generator, limit: int) -> int:
    """The edge of the window to cut: ``--chip`` at a log-uniform scale within ``--zoom``."""
    if args.zoom <= 1.0:
        return int(args.chip)
    factor = float(np.exp(rng.uniform(-np.log(args.zoom), np.log(args.zoom))))
    return int(min(limit, max(16, round(args.chip * factor))))


def _resized(a: np.ndarray, b: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """An image window resized bilinearly and its labels by nearest neighbour to ``size`` px."""
    x = F.interpolate(torch.from_numpy(np.ascontiguousarray(a))[None, None], size=(size, size),
                      mode="bilinear", align_corners=False)
    y = F.interpolate(torch.from_numpy(np.ascontiguousarray(b)).float()[None, None], size=(size, size),
                      mode="nearest")
    return x[0, 0].numpy(), y[0, 0].numpy().astype(np.int64)


def _jitter(chip: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The chip under another gain, offset and (half the time) sensor noise, in normalised units."""
    chip = chip * rng.uniform(0.7, 1.4) + rng.normal(0, 0.3)
    if rng.random() < 0.5:
        chip = chip + rng.normal(0, rng.uniform(0, 0.2), chip.shape)
    return chip.astype(np.float32)


def _turned(x: torch.Tensor, k: int) -> torch.Tensor:
    """One of the 8 flips and turns of the last two axes (flip first, then turn)."""
    return torch.rot90(x.flip(-1) if k >= 4 else x, k % 4, (-2, -1))


def _turned_back(x: torch.Tensor, k: int) -> torch.Tensor:
    """What :func:`_turned` with the same ``k`` did, undone."""
    x = torch.rot90(x, -(k % 4), (-2, -1))
    return x.flip(-1) if k >= 4 else x


def _cut(image: np.ndarray, y0s: np.ndarray, x0s: np.ndarray, chip: int) -> torch.Tensor:
    """The square chips of ``image`` whose top-left corners are (``y0s``, ``x0s``), as one batch."""
    chips = [image[y : y + chip, x : x + chip] for y, x in zip(y0s, x0s, strict=True)]
    return torch.from_numpy(np.stack(chips))


def _optimiser(
    net: torch.nn.Module, lr: float, steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.OneCycleLR]:
    """AdamW under a one-cycle schedule of ``steps`` steps peaking at ``lr`` (pretext and training alike)."""
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    return opt, torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)


def _ema(teacher: torch.nn.Module, student: torch.nn.Module, decay: float) -> None:
    """The teacher moved towards the student: an exponential average of its weights, its buffers copied."""
    with torch.no_grad():
        for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
            t.mul_(decay).add_(s.detach(), alpha=1 - decay)
        for tb, sb in zip(teacher.buffers(), student.buffers(), strict=True):
            tb.copy_(sb)


def _unlabelled_loss(
    net: torch.nn.Module, teacher: torch.nn.Module, image: np.ndarray, args: argparse.Namespace,
    rng: np.random.Generator,
) -> torch.Tensor:
    """Self-training on chips of the unlabelled part: the teacher's confident classes teach the student.

    The teacher (an exponential average of the student's weights, in eval mode) sees each chip
    as it is; the student sees it flipped or turned at random with a little noise, and is taught
    the teacher's class wherever the teacher's probability reaches ``--tau`` (``--tau-building``
    where it calls a building, so that a high ``--tau`` leaves doubtful background untaught
    without dropping the buildings found). Each class the teacher names weighs the same, so
    the background that fills most chips does not drown the buildings found in them.
    """
    chip, (height, width) = args.chip, image.shape
    x0s = rng.integers(SPLIT_X // args.scale, width - chip + 1, args.unlabelled)
    y0s = rng.integers(0, height - chip + 1, args.unlabelled)
    x = _cut(image, y0s, x0s, chip)
    with torch.no_grad():
        confidence, target = teacher(x[:, None]).softmax(1).max(1)
    tau_building = args.tau if args.tau_building is None else args.tau_building
    # -100: cross_entropy's ignore_index.
    target[confidence < torch.where(target == 1, tau_building, args.tau)] = -100
    k = int(rng.integers(8))
    view = _turned(x, k) + 0.1 * torch.randn(x.shape[0], chip, chip)
    logits, target = net(view[:, None].contiguous()), _turned(target, k)
    losses = F.cross_entropy(logits, target, ignore_index=-100, reduction="none")
    per_class = [losses[target == c].mean() for c in (0, 1) if (target == c).any()]
    return torch.stack(per_class).mean() if per_class else logits.sum() * 0.0


def _inpainting_step(
    net: torch.nn.Module, image: np.ndarray, args: argparse.Namespace, rng: np.random.Generator
) -> torch.Tensor:
    """The inpainting loss of one batch: chips of the whole image with 16-px squares hidden.

    Chips come from anywhere in the image, the part without labels included (its imagery,
    never its labels), each flipped or turned at random. A share ``--mask-ratio`` of 16-px
    squares is set to the image's mean (0 after normalising), and the network must give back
    the hidden pixels: to fill a square it has to carry roof edges, shadows and street lines in
    from around it, the shapes that tell buildings apart here.
    """
    chip, (height, width) = args.chip, image.shape
    y0s, x0s = rng.integers(0, height - chip + 1, args.batch), rng.integers(0, width - chip + 1, args.batch)
    x = _turned(_cut(image, y0s, x0s, chip), int(rng.integers(8))).contiguous()
    hidden = rng.random((args.batch, chip // 16, chip // 16)) < args.mask_ratio
    mask = torch.from_numpy(np.kron(hidden, np.ones((16, 16), dtype=bool)))
    out = net(x.masked_fill(mask, 0.0)[:, None])[:, 0]
    loss: torch.Tensor = ((out - x) ** 2)[mask].mean()
    return loss


def _pretrained(args: argparse.Namespace, image: np.ndarray) -> dict[str, Any]:
    """Encoder and decoder weights from ``--pretext`` steps of inpainting (its head left out).

    Its chips come from a generator of their own, so the training after it draws the very
    chips a run without ``--pretext`` draws: the two differ in their starting weights only.
    """
    import segmentation_models_pytorch as smp

    rng = np.random.default_rng(args.seed + 1)
    net = smp.Unet(args.encoder, encoder_weights=None, in_channels=1, classes=1, decoder_channels=DECODER)
    opt, schedule = _optimiser(net, args.lr, args.pretext)
    started = time.process_time()
    for step in range(1, args.pretext + 1):
        loss = _inpainting_step(net, image, args, rng)
        opt.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        schedule.step()
        if step % max(args.pretext // 5, 1) == 0:
            row = {"pretext_step": step, "loss": round(float(loss.detach()), 4),
                   "cpu_s": round(time.process_time() - started)}
            print(json.dumps(row), flush=True)
    return {k: v for k, v in net.state_dict().items() if not k.startswith("segmentation_head")}


def _loss(logits: torch.Tensor, target: torch.Tensor, dice: float) -> torch.Tensor:
    ce = F.cross_entropy(logits, target)
    probs = logits.softmax(1)
    onehot = F.one_hot(target, 2).permute(0, 3, 1, 2).float()
    overlap = (2 * (probs * onehot).sum((0, 2, 3)) + 1) / ((probs + onehot).sum((0, 2, 3)) + 1)
    return (1 - dice) * ce + dice * (1 - overlap.mean())


def _building_probability(net: torch.nn.Module, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Building probability of the whole image: the network as is, and its mean over 8 flips/rotations."""
    net.eval()
    pad = [(0, -n % 32) for n in image.shape]
    x = torch.from_numpy(np.pad(image, pad, mode="reflect"))[None, None]
    views = []
    with torch.no_grad():
        for k in range(8):
            views.append(_turned_back(net(_turned(x, k)).softmax(1)[:, 1:2], k))
    net.train()
    h, w = image.shape
    return views[0][0, 0, :h, :w].numpy(), torch.stack(views).mean(0)[0, 0, :h, :w].numpy()


def _building_iou(prob: np.ndarray, full: np.ndarray, scale: int, threshold: float) -> float:
    """Building IoU of the whole test part at 0.5 m (a coarser prediction repeated)."""
    pred = np.kron(prob > threshold, np.ones((scale, scale), dtype=bool))
    pred = np.pad(pred, [(0, full.shape[0] - pred.shape[0]), (0, full.shape[1] - pred.shape[1])], mode="edge")
    p, t = pred[:, SPLIT_X:], full[:, SPLIT_X:] == 1
    return float((p & t).sum() / max((p | t).sum(), 1))


def _scores(net: torch.nn.Module, image: np.ndarray, full: np.ndarray, scale: int) -> dict[str, Any]:
    """Building IoU at one half, and by threshold of the network alone and of its 8-view mean."""
    single, tta = _building_probability(net, image)
    return {
        "building_iou": round(_building_iou(single, full, scale, 0.5), 3),
        "thresholds": {f"{t:g}": round(_building_iou(single, full, scale, t), 3) for t in THRESHOLDS},
        "tta": {f"{t:g}": round(_building_iou(tta, full, scale, t), 3) for t in THRESHOLDS},
    }


def main() -> None:
    """Train, printing (step, training loss, building IoU, CPU s) every fifth of the run."""
    import segmentation_models_pytorch as smp

    args = _arguments()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    image, labels, full = _scene(args.scale, args.norm)
    args.instances = _instances(image, labels, SPLIT_X // args.scale) if args.paste else []
    net = smp.Unet(args.encoder, encoder_weights=None, in_channels=1, classes=2, decoder_channels=DECODER)
    if args.pretext:
        net.load_state_dict(_pretrained(args, image), strict=False)
    opt, schedule = _optimiser(net, args.lr, args.steps)
    teacher = copy.deepcopy(net).eval() if args.unlabelled else None
    started, history = time.process_time(), []
    for step in range(1, args.steps + 1):
        x, y = _batch(image, labels, args, rng)
        loss = _loss(net(x), y, args.dice)
        if teacher is not None:
            ramp = args.unlabelled_weight * min(1.0, step / (0.3 * args.steps))
            loss = loss + ramp * _unlabelled_loss(net, teacher, image, args, rng)
        opt.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        schedule.step()
        if teacher is not None:
            _ema(teacher, net, 0.99)
        if step % max(args.steps // 5, 1) == 0:
            row: dict[str, Any] = {"step": step, "loss": round(float(loss.detach()), 3)}
            row.update(_scores(net, image, full, args.scale), cpu_s=round(time.process_time() - started))
            history.append(row)
            print(json.dumps(row), flush=True)
    settings = {k: v for k, v in vars(args).items() if k != "instances"}
    print(json.dumps({"settings": settings, "history": history}))


if __name__ == "__main__":
    main()
