"""Training: the Trainer, its config, checkpoints and evaluation."""

from moekit.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from moekit.train.evaluate import EvalResult, evaluate
from moekit.train.trainer import TrainConfig, Trainer

__all__ = ["Trainer", "TrainConfig", "evaluate", "EvalResult", "save_checkpoint", "load_checkpoint",
           "latest_checkpoint"]
