"""Training, evaluation and the model artifact every other stage loads."""

from everloop.train._artifact import Predictions, TrainedModel, load_artifact
from everloop.train._labels import label_parser, parse_label, valid_labels
from everloop.train._metrics import allowed_loss, describe_tolerance, higher_is_better, improvement, score
from everloop.train._rows import row_hashes, training_hashes
from everloop.train._reproduce import ReproduceReport, reproduce
from everloop.train._train import (Fitted, TrainResult, as_labels, bootstrap_labels, calibration_maps, fit,
                                   score_labels, task_of, train)

__all__ = ["Fitted", "Predictions", "ReproduceReport", "TrainResult", "TrainedModel", "as_labels", "fit",
           "allowed_loss", "bootstrap_labels", "calibration_maps", "describe_tolerance", "row_hashes", "training_hashes",
           "higher_is_better", "improvement", "label_parser", "load_artifact", "parse_label",
           "reproduce", "score", "score_labels", "task_of", "train", "valid_labels"]
