"""Training, evaluation and inference over tasks (see loop.py for the training loop)."""

from .config import TrainConfig
from .inference import Run, evaluate_zero_shot
from .loop import train

__all__ = ["TrainConfig", "Run", "evaluate_zero_shot", "train"]
