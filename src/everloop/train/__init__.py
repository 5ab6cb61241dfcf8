"""Training, evaluation and the model artifact every other stage loads."""

from everloop.train._artifact import Predictions, TrainedModel, load_artifact
from everloop.train._metrics import higher_is_better, improvement, score
from everloop.train._reproduce import ReproduceReport, reproduce
from everloop.train._train import Fitted, TrainResult, as_labels, fit, score_labels, task_of, train

__all__ = ["Fitted", "Predictions", "ReproduceReport", "TrainResult", "TrainedModel", "as_labels", "fit",
           "higher_is_better", "improvement", "load_artifact", "reproduce", "score", "score_labels", "task_of", "train"]
