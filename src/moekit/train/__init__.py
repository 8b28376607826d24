"""Training: the Trainer, its config, checkpoints and evaluation."""

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .evaluate import EvalResult, evaluate
from .trainer import TrainConfig, Trainer

__all__ = ["Trainer", "TrainConfig", "evaluate", "EvalResult", "save_checkpoint", "load_checkpoint",
           "latest_checkpoint"]
