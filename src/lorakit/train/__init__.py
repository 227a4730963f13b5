"""Training: `TrainConfig`, the Trainer-based runner behind `lorakit train`, evaluation."""

from lorakit.train.config import TrainConfig
from lorakit.train.evaluate import evaluate, generate_responses, response_loss
from lorakit.train.runner import AdapterTrainer, train

__all__ = ["AdapterTrainer", "TrainConfig", "evaluate", "generate_responses", "response_loss", "train"]
