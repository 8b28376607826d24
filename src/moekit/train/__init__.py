"""Training: the Trainer, its config, the learning-rate schedule, the optimisation step, checkpoints and evaluation."""

from moekit.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from moekit.train.evaluate import EvalResult, evaluate
from moekit.train.schedule import warmup_cosine
from moekit.train.step import fine_tune, optimizer_step
from moekit.train.trainer import TrainConfig, Trainer

__all__ = ["Trainer", "TrainConfig", "evaluate", "EvalResult", "save_checkpoint", "load_checkpoint",
           "latest_checkpoint", "warmup_cosine", "optimizer_step", "fine_tune"]
