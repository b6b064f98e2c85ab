"""Train: sample chips from a region store, fit a network or a forest, write a model package.

The settings (:mod:`segpipe.stages.train.config`) load without torch, so the command
line and the flows can build and check them cheaply; :func:`train` loads the training
loop, and torch with it, on first use (PEP 562).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from segpipe.stages.train.config import (
    AutoConfig,
    ForestConfig,
    NetworkConfig,
    SettingError,
    TrainConfig,
    TrainConfigField,
    train_config,
)
from segpipe.stages.train.progress import TrainProgress

if TYPE_CHECKING:
    from segpipe.stages.train.entry import train

__all__ = [
    "AutoConfig",
    "ForestConfig",
    "NetworkConfig",
    "SettingError",
    "TrainConfig",
    "TrainConfigField",
    "TrainProgress",
    "train",
    "train_config",
]


def __getattr__(name: str) -> Any:
    if name == "train":
        from segpipe.stages.train.entry import train

        return train
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
