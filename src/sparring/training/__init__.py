"""The one training loop shared by every method, its optimizers, metrics and precompute passes."""

from sparring.training.loop import train
from sparring.training.metrics import MetricsLogger
from sparring.training.precompute import score_sequences

__all__ = ["MetricsLogger", "score_sequences", "train"]
