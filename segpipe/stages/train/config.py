"""Training settings: one pydantic model shared by the CLI, the library and the flows."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from segpipe.errors import InputError

__all__ = ["CHIP_MULTIPLE", "TrainConfig", "fit_chip_size"]

# Every architecture's input edges must be multiples of its output stride (at most 32).
CHIP_MULTIPLE = 32

# Settings only one family reads. Setting one for the other family is refused rather than
# ignored: a user who asks for, say, a focal loss on a forest would otherwise compare
# results that never had it.
_FOREST_ONLY = ("trees", "min_samples_leaf", "max_depth", "max_train_pixels", "forest_context")
_NETWORK_ONLY = (
    "encoder",
    "epochs",
    "samples_per_epoch",
    "chip_size",
    "batch_size",
    "lr",
    "weight_decay",
    "loss",
    "focal_gamma",
    "dice_weight",
    "patience",
    "monitor",
    "schedule",
    "pretrained",
    "balanced_sampling",
    "color_jitter",
    "checkpoint_every",
    "checkpoint_seconds",
    "pixel_head",
    "devices",
)


class TrainConfig(BaseModel):
    """How to train a segmentation model from a region store.

    Attributes:
        arch: Network architecture: unet, pspnet, deeplabv3 or deeplabv3plus; or
            ``random_forest``, the classical per-pixel baseline (scikit-learn random forest
            on the band values), packaged and predicted like a network. It uses ``trees``,
            ``min_samples_leaf``, ``max_depth``, ``max_train_pixels``, ``forest_context``,
            ``class_balancing``, ``valid_fraction``, ``valid_cell``, ``seed``, ``threads``
            and ``clip_percentiles``. Setting a network-only setting for it, or a forest
            setting for a network, away from its default is refused.
        encoder: Encoder (backbone), e.g. resnet18, resnet34, vgg16_bn, mobilenet_v2.
        epochs: Passes over ``samples_per_epoch`` chips.
        samples_per_epoch: Chips drawn per epoch.
        chip_size: Chip edge in pixels (a multiple of 32).
        batch_size: Chips per optimisation step.
        lr: Peak learning rate of the schedule (AdamW).
        weight_decay: AdamW weight decay.
        valid_fraction: Share of labelled cells held out for validation (spatially disjoint).
        valid_cell: Edge in pixels of the cells assigned wholesale to train or validation.
        seed: Seed of sampling, augmentation and initialisation.
        device: ``auto`` (GPU when present), ``cpu`` or ``cuda``.
        threads: Torch CPU threads (0 = all cores).
        loss: ``ce`` (cross-entropy) or ``focal``; class 0 is always ignored.
        focal_gamma: Focusing exponent of the focal loss.
        dice_weight: Fraction of soft-Dice loss mixed in (0-1).
        class_balancing: Weight classes by their labelled pixels: a network's loss by
            median frequency (at most 10x), a random forest's trees by the inverse of each
            class's count in their bootstrap sample.
        patience: Stop after this many epochs without improvement (None = never).
        monitor: What "improvement" and the kept checkpoint refer to.
        schedule: Learning-rate schedule: ``onecycle`` (warm-up then cosine decay) or
            ``cosine`` (cosine decay from ``lr`` without warm-up, e.g. for fine-tuning).
        pretrained: Local encoder weights file (.safetensors, .pth, .pt) to start from,
            e.g. a torchvision ResNet state dict; never downloaded.
        clip_percentiles: Per-band (low, high) percentiles that clip pixel values before
            standardising, e.g. (2, 98); stored in the package, applied in prediction.
        balanced_sampling: Centre chips on each class equally often.
        color_jitter: Strength of random brightness/contrast changes of valid pixels
            (in normalised units; 0 = off).
        checkpoint_every: Also checkpoint every N steps, counted over the whole run
            (0 = by time and at epoch ends only), so that a killed run loses little.
        checkpoint_seconds: Also checkpoint when this many seconds have passed since the
            last checkpoint (0 = off), so a slow run is resumable within minutes.
        pixel_head: Hidden width of a per-pixel path on the band values whose logits are
            added to the network's at full resolution (0 = none); helps medium-resolution
            imagery, where features one to three pixels wide blur in the encoder.
        devices: Processes training data-parallel on this machine (one per GPU; on the
            CPU they share its cores, useful for testing).
        trees: Random forest only: number of trees.
        min_samples_leaf: Random forest only: fewest training pixels in a leaf. The default
            5 (scikit-learn's is 1) halves the trees' nodes, hence the package size, on
            noisy labels at no measured loss of accuracy; larger = smoother probabilities.
        max_depth: Random forest only: deepest split level (None = grow until leaves are
            pure); prediction time grows with depth.
        max_train_pixels: Random forest only: labelled training pixels sampled at most
            (validation pixels are capped alike).
        forest_context: Random forest only: odd window edge K; above 1 the trees also
            get each band's mean and standard deviation over the K x K pixels around
            the pixel (1 = the band values alone, the classical baseline).
    """

    model_config = ConfigDict(extra="forbid")

    arch: Literal["unet", "pspnet", "deeplabv3", "deeplabv3plus", "random_forest"] = "unet"
    encoder: str = "resnet18"
    epochs: int = Field(default=10, ge=1)
    samples_per_epoch: int = Field(default=512, ge=1)
    chip_size: int = Field(default=128, ge=32, multiple_of=32)
    batch_size: int = Field(default=16, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)
    valid_fraction: float = Field(default=0.15, ge=0, lt=1)
    valid_cell: int = Field(default=256, ge=32)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = Field(default=0, ge=0)
    loss: Literal["ce", "focal"] = "ce"
    focal_gamma: float = Field(default=2.0, ge=0)
    dice_weight: float = Field(default=0.0, ge=0, le=1)
    class_balancing: bool = False
    patience: int | None = Field(default=None, ge=1)
    monitor: Literal["valid_miou", "valid_loss"] = "valid_miou"
    schedule: Literal["onecycle", "cosine"] = "onecycle"
    pretrained: str | None = None
    clip_percentiles: tuple[float, float] | None = None
    balanced_sampling: bool = False
    color_jitter: float = Field(default=0.0, ge=0, le=1)
    checkpoint_every: int = Field(default=50, ge=0)
    checkpoint_seconds: float = Field(default=300.0, ge=0)
    pixel_head: int = Field(default=0, ge=0)
    devices: int = Field(default=1, ge=1)
    trees: int = Field(default=100, ge=1)
    min_samples_leaf: int = Field(default=5, ge=1)
    max_depth: int | None = Field(default=None, ge=1)
    max_train_pixels: int = Field(default=200_000, ge=1)
    forest_context: int = Field(default=1, ge=1, le=31)

    @field_validator("forest_context")
    @classmethod
    def _odd_window(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError("must be an odd window edge (1, 3, 5, ...) so the window has a centre pixel")
        return value

    @field_validator("clip_percentiles")
    @classmethod
    def _ordered_percentiles(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and not 0 <= value[0] < value[1] <= 100:
            raise ValueError("must be two percentiles with 0 <= low < high <= 100, e.g. 2 98")
        return value

    @model_validator(mode="after")
    def _settings_of_the_family(self) -> TrainConfig:
        forest = self.arch == "random_forest"
        unused = _NETWORK_ONLY if forest else _FOREST_ONLY
        changed = [
            f"{name}={getattr(self, name)!r}"
            for name in unused
            if getattr(self, name) != type(self).model_fields[name].default
        ]
        if changed:
            family = "networks" if forest else "--arch random_forest"
            raise ValueError(
                f"--arch {self.arch} does not use {', '.join(changed)} (these apply to {family} only): "
                "leave them at their defaults"
            )
        return self

    def fit_region(self, height: int, width: int) -> tuple[TrainConfig, str | None]:
        """These settings with the chip clamped to a region of ``height`` x ``width`` px.

        Returns:
            The settings (unchanged when the chip fits or for the random forest, which
            reads no chips) and the warning to log and record when the chip was clamped.

        Raises:
            InputError: The region is smaller than the smallest chip (32 px).
        """
        if self.arch == "random_forest":
            return self, None
        chip, note = fit_chip_size(self.chip_size, height, width)
        return (self, None) if note is None else (self.model_copy(update={"chip_size": chip}), note)

    def resume_key(self) -> str:
        """The settings a resumed run must share with the checkpoint, as JSON.

        Threads and checkpoint frequency change no result, so they may differ.
        """
        return self.model_dump_json(exclude={"threads", "checkpoint_every", "checkpoint_seconds"})


def fit_chip_size(chip_size: int, height: int, width: int) -> tuple[int, str | None]:
    """The chip edge to train with on a ``height`` x ``width`` px region.

    A chip larger than the region would be padded to its full size on every draw (a
    20,000 px chip on a 500 px region never finishes), so it is clamped to the largest
    multiple of 32 that fits, and a warning says so.

    Returns:
        The chip edge and the warning (None when ``chip_size`` fits).

    Raises:
        InputError: The region's smaller edge is under 32 px: no network chip fits.
    """
    largest = min(height, width) // CHIP_MULTIPLE * CHIP_MULTIPLE
    if largest < CHIP_MULTIPLE:
        raise InputError(
            f"the region is {width} x {height} px, smaller than the smallest training chip "
            f"({CHIP_MULTIPLE} px): ingest a larger region or use --arch random_forest"
        )
    if chip_size <= largest:
        return chip_size, None
    return largest, (
        f"--chip-size {chip_size} does not fit the {width} x {height} px region: "
        f"training with {largest} px chips instead"
    )
