"""Training, evaluation and the model artifact every other stage loads."""

from everloop.train._artifact import Predictions, TrainedModel, load_artifact
from everloop.train._metrics import higher_is_better, improvement, score
from everloop.train._train import TrainResult, as_labels, task_of, train

__all__ = ["Predictions", "TrainResult", "TrainedModel", "as_labels", "higher_is_better", "improvement",
           "load_artifact", "score", "task_of", "train"]
