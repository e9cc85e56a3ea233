"""Inference-time guards (``unbackdoor guard``): the suspect stays as it is; each input is inspected
or rewritten at prediction time.

* :mod:`.base`: the contract (:class:`GuardInputs` without triggered data, :class:`Guard`,
  :class:`FittedGuard`, :class:`GuardOutput`, the :data:`GUARDS` registry, :func:`build_guard`);
* :mod:`.onion`: ONION, outlier-word removal by perplexity (rewrites); :mod:`.lm`: its perplexity
  models (the offline Kneser–Ney n-gram default, any local causal LM);
* :mod:`.strip`: STRIP, low prediction entropy under perturbation (rejects);
* :mod:`.rap`: RAP, robustness to a clean-tuned rare-word perturbation (rejects);
* :mod:`.evaluation`: FRR, FAR and end-to-end CACC/ASR against a triggered set (evaluation only);
* the ``guard`` command: :class:`unbackdoor.commands.GuardCommand`, :func:`unbackdoor.commands.run_guard`.

Importing this package registers ``onion``, ``rap`` and ``strip``.
"""

from unbackdoor.guard.base import (
    GUARDS,
    REJECTED,
    FittedGuard,
    Guard,
    GuardConfig,
    GuardInputs,
    GuardOutput,
    build_guard,
)
from unbackdoor.guard.evaluation import DEFAULT_BUDGETS, GuardEvaluation, GuardMetrics, evaluate_guard
from unbackdoor.guard.lm import CausalLM, KneserNeyLM, load_causal_lm
from unbackdoor.guard.onion import FittedOnion, Onion, OnionConfig
from unbackdoor.guard.rap import FittedRap, Rap, RapConfig
from unbackdoor.guard.strip import FittedStrip, Strip, StripConfig

__all__ = [
    "DEFAULT_BUDGETS",
    "GUARDS",
    "REJECTED",
    "CausalLM",
    "FittedGuard",
    "FittedOnion",
    "FittedRap",
    "FittedStrip",
    "Guard",
    "GuardConfig",
    "GuardEvaluation",
    "GuardInputs",
    "GuardMetrics",
    "GuardOutput",
    "KneserNeyLM",
    "Onion",
    "OnionConfig",
    "Rap",
    "RapConfig",
    "Strip",
    "StripConfig",
    "build_guard",
    "evaluate_guard",
    "load_causal_lm",
]
