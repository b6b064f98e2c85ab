"""Train: sample chips from a region store, fit a network or a forest, write a model package."""

from segpipe.stages.train.config import TrainConfig
from segpipe.stages.train.loop import train
from segpipe.stages.train.progress import TrainProgress

__all__ = ["TrainConfig", "TrainProgress", "train"]
