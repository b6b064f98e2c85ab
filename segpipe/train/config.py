"""Training settings: one pydantic model shared by the CLI, the library and the flows."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["TrainConfig"]


class TrainConfig(BaseModel):
    """How to train a segmentation model from a region store.

    Attributes:
        arch: Network architecture: unet, pspnet, deeplabv3 or deeplabv3plus.
        encoder: Encoder (backbone), e.g. resnet18, resnet34, vgg16_bn, mobilenet_v2.
        epochs: Passes over ``samples_per_epoch`` chips.
        samples_per_epoch: Chips drawn per epoch.
        chip_size: Chip edge in pixels (a multiple of 32).
        batch_size: Chips per optimisation step.
        lr: Peak learning rate of the one-cycle schedule (AdamW).
        weight_decay: AdamW weight decay.
        valid_fraction: Share of labelled cells held out for validation (spatially disjoint).
        valid_cell: Edge in pixels of the cells assigned wholesale to train or validation.
        seed: Seed of sampling, augmentation and initialisation.
        device: ``auto`` (GPU when present), ``cpu`` or ``cuda``.
        threads: Torch CPU threads (0 = all cores).
        loss: ``ce`` (cross-entropy) or ``focal``; class 0 is always ignored.
        focal_gamma: Focusing exponent of the focal loss.
        dice_weight: Fraction of soft-Dice loss mixed in (0-1).
        class_balancing: Weight classes by median frequency of their labelled pixels.
        patience: Stop after this many epochs without improvement (None = never).
        monitor: What "improvement" and the kept checkpoint refer to.
    """

    model_config = ConfigDict(extra="forbid")

    arch: Literal["unet", "pspnet", "deeplabv3", "deeplabv3plus"] = "unet"
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
