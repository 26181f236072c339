"""Training, evaluation and inference over tasks (see loop.py for the training loop)."""

from .config import TrainConfig
from .inference import Run
from .loop import train

__all__ = ["TrainConfig", "Run", "train"]
