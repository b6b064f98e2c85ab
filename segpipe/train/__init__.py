"""Training: sampling from the region store, normalisation statistics, the loop."""

from segpipe.train.config import TrainConfig
from segpipe.train.loop import TrainProgress, train

__all__ = ["TrainConfig", "TrainProgress", "train"]
