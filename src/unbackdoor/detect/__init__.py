"""Poisoned-row detection for a training set (``unbackdoor detect``), and the ``reweight`` training
defence built on it.

* :mod:`.base`: the contract (:class:`DetectInputs` without flags, :class:`Detector`,
  :class:`FlagRule`, the :data:`DETECTORS` registry);
* :mod:`.features`: frozen, pooled encoder features computed once;
* :mod:`.reweight`: per-row weights by multilevel (bi-/trilevel) optimisation (spec ``multilevel.md``);
* :mod:`.loss`: per-row loss of a briefly trained head (baseline);
* :mod:`.metrics`: precision / recall / AUROC against the true flags (evaluation only);
* :mod:`.defense`: ``unbackdoor train --defense reweight``;
* :mod:`.command`: the ``detect`` command and its output folder.

Importing this package registers the ``reweight`` and ``loss`` detectors and the ``reweight``
training defence.
"""

from unbackdoor.detect.base import DETECTORS, Detection, DetectInputs, Detector, FlagRule, Scores, flag_indices
from unbackdoor.detect.defense import ReweightDefense, ReweightDefenseConfig
from unbackdoor.detect.features import FeatureData, feature_data, sentence_features, standardise
from unbackdoor.detect.loss import LossConfig, LossDetector
from unbackdoor.detect.metrics import auroc, detection_metrics, scores_file_metrics
from unbackdoor.detect.reweight import ReweightConfig, ReweightDetector, build_levels, learn_weights

__all__ = [
    "DETECTORS",
    "DetectInputs",
    "Detection",
    "Detector",
    "FeatureData",
    "FlagRule",
    "LossConfig",
    "LossDetector",
    "ReweightConfig",
    "ReweightDefense",
    "ReweightDefenseConfig",
    "ReweightDetector",
    "Scores",
    "auroc",
    "build_levels",
    "detection_metrics",
    "feature_data",
    "flag_indices",
    "learn_weights",
    "scores_file_metrics",
    "sentence_features",
    "standardise",
]
