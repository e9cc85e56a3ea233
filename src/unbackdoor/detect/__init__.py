"""Poisoned-row detection for a training set (``unbackdoor detect``). (The ``reweight`` and ``abl``
train-time defences built on these detectors live in :mod:`unbackdoor.train_defenses`.)

* :mod:`.base`: the contract (:class:`DetectInputs` without flags, :class:`Detector`,
  :class:`FlagRule`, the :data:`DETECTORS` registry);
* :mod:`.features`: frozen, pooled encoder features computed once;
* :mod:`.reweight`: per-row weights by multilevel (bi-/trilevel) optimisation (spec ``multilevel.md``);
* :mod:`.loss`: per-row loss of a briefly trained head (baseline);
* the field's filters, each on a copy of the encoder fine-tuned on the rows (:mod:`.finetuned`):
  :mod:`.bki` (Backdoor Keyword Identification), :mod:`.cube` (CUBE: minority clusters of a label),
  :mod:`.isolation` (ABL's early-loss isolation: lowest loss under local gradient ascent);
* :mod:`.zscore`: Z-defence's lexical filter (features whose label share is an extreme outlier; no model);
* :mod:`.contrast`: rows a classifier tells apart from the clean set, cut by an empirical-null FDR (no task model);
* :mod:`.reference`: rows whose label a classifier trained on the clean set alone rejects;
* :mod:`.lexical`, :mod:`.null`: the lexical row features both use; the empirical-null FDR cut;
* :mod:`.metrics`: precision / recall / AUROC against the true flags (evaluation only);
* :mod:`.output`: the ``detect`` command's files (the command: :func:`unbackdoor.commands.run_detect`).

Importing this package registers the ``reweight``, ``loss``, ``bki``, ``cube``, ``isolation``,
``zscore``, ``contrast`` and ``reference`` detectors.
"""

from unbackdoor.detect.base import DETECTORS, Detection, DetectInputs, Detector, FlagRule, Scores, flag_indices
from unbackdoor.detect.bki import BkiConfig, BkiDetector
from unbackdoor.detect.contrast import ContrastConfig, ContrastDetector
from unbackdoor.detect.cube import CubeConfig, CubeDetector
from unbackdoor.detect.features import FeatureData, feature_data, sentence_features, standardise
from unbackdoor.detect.isolation import IsolationConfig, IsolationDetector, LocalGradientAscent, isolate
from unbackdoor.detect.loss import LossConfig, LossDetector
from unbackdoor.detect.metrics import auroc, detection_metrics, scores_file_metrics
from unbackdoor.detect.reference import ReferenceConfig, ReferenceDetector
from unbackdoor.detect.reweight import ReweightConfig, ReweightDetector, build_levels, learn_weights
from unbackdoor.detect.zscore import ZScoreConfig, ZScoreDetector

__all__ = [
    "BkiConfig",
    "BkiDetector",
    "ContrastConfig",
    "ContrastDetector",
    "CubeConfig",
    "CubeDetector",
    "DETECTORS",
    "DetectInputs",
    "Detection",
    "Detector",
    "FeatureData",
    "FlagRule",
    "IsolationConfig",
    "IsolationDetector",
    "LocalGradientAscent",
    "LossConfig",
    "LossDetector",
    "ReferenceConfig",
    "ReferenceDetector",
    "ReweightConfig",
    "ReweightDetector",
    "Scores",
    "ZScoreConfig",
    "ZScoreDetector",
    "auroc",
    "build_levels",
    "detection_metrics",
    "feature_data",
    "flag_indices",
    "isolate",
    "learn_weights",
    "scores_file_metrics",
    "sentence_features",
    "standardise",
]
