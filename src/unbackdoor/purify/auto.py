"""``unbackdoor purify --method auto``: choose and compose purify defences from what the defender
holds [OURS]: the suspect, its clean base (if given), the small clean set, and ``scan``'s signals.
Never the attack's name, the poison flags or triggered data (:class:`PurifyInputs` has no place for
them).

Steps, each choice logged and recorded in the report (``unbackdoor.json``'s ``defense.choices``):

1. **Scan** (:func:`unbackdoor.scan.scan` without the weight summaries): the suspect's word-embedding
   rows against the base's, scored for their drift given their frequency in the clean set.
2. **Embeddings first**: a trigger word whose embedding row drifted far more than words in clean use
   is what embedding poisoning leaves, and what clean data cannot reach (its row gets no gradient).
   ``epur_rule=always`` (default): E-PUR's bare reset of its own top ``n_reset`` rows (and at least
   every row scan flags) runs first (``before``: as ``--epur``), without fine-tuning. ``scan``: only
   when rows stand out by scan's rule, resetting exactly those. On the OLID development grid both
   rules gave the same rows (scan flagged three of BadNets' four trigger rows; the fourth is fourth
   in E-PUR's top 200); ``always`` is the superset, so it is the default (``docs/results/auto.md``).
3. **The encoder**: ``encoder_method`` (default Fine-purifying: reset the dimensions whose drift is
   abnormal for their clean curvature, then clean fine-tuning); with ``after_epur=finetune``, when
   E-PUR ran the encoder step is plain clean fine-tuning instead. With
   ``encoder_step=if_trigger_remains`` the encoder step is skipped when a **trigger probe** says the
   embedding step removed the backdoor (:func:`probe_candidates`): the tokens scan flagged, inserted
   together into the clean rows, changed the suspect's predictions (flip rate at least ``flip_margin``
   over inserting as many of the clean text's most frequent words) and no longer change the reset
   model's.
   The probe reads only scan's tokens and the clean set. Why: on the weight attacks whose backdoor is
   in a few embedding rows (EP, SOS, the surgery of RIPPLES) the reset alone may remove it, and the
   fine-tuning on a small clean set that follows costs accuracy and can make the model lean to one
   label. The default since the OLID development grid (``benchmarks/dev_olid_weights.yaml``, 2 seeds):
   it held 7 of 10 (attack, seed) pairs against 6 for ``always``, at 1.2 CACC points more on the
   weight attacks, and kept the encoder step on every data-attack cell (``docs/results/auto.md``).
4. Without a base: clean fine-tuning (the only method that needs nothing else).
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from unbackdoor.attacks.word_sets import insert_words
from unbackdoor.config import StrictConfig
from unbackdoor.data.types import Dataset, Example
from unbackdoor.inference import predict
from unbackdoor.models.loading import Classifier
from unbackdoor.purify.base import PURIFY_DEFENSES, PurifyDefense, PurifyInputs, PurifyResult, build_purify_defense

logger = logging.getLogger(__name__)


class AutoPurifyConfig(StrictConfig):
    """Options of ``auto`` (all [OURS]; defaults chosen on the development grid, ``docs/results/auto.md``)."""

    encoder_method: str = Field("fine-purifying", description="the encoder-level defence after the embedding step")
    encoder_params: dict[str, Any] = Field(default_factory=dict, description="its options")
    after_epur: Literal["encoder_method", "finetune"] = Field(
        "encoder_method", description="when E-PUR ran: the encoder method as well, or plain clean fine-tuning")
    epur_params: dict[str, Any] = Field(default_factory=dict, description="E-PUR's options for the embedding step")
    epur_rule: Literal["always", "scan"] = Field(
        "always", description="always: E-PUR's own reset (its top n_reset rows, at least every row scan flags) before "
        "the encoder method; scan: E-PUR only when scan flags rows, resetting exactly those. Both gave the same rows "
        "on the OLID development grid; always is the superset (docs/results/auto.md)")
    margin: float = Field(1.5, gt=1, description="scan's rule: a row stands out at this multiple of the best score "
                          "among tokens in clean use")
    encoder_step: Literal["always", "if_trigger_remains"] = Field(
        "if_trigger_remains", description="if_trigger_remains: the encoder method after the embedding step only when the "
        "trigger probe (scan's tokens inserted into the clean rows) says the embedding step did not remove the backdoor; "
        "always: every time [OURS; chosen on the OLID development grid, docs/results/auto.md]")
    flip_margin: float = Field(0.1, gt=0, lt=1, description="trigger probe: the flagged tokens act as a trigger when their "
                               "flip rate exceeds that of as many of the clean text's most frequent words by this much [OURS]")


@PURIFY_DEFENSES.register("auto")
class AutoPurify(PurifyDefense[AutoPurifyConfig]):
    """Scan first; reset standing-out embedding rows (E-PUR) if any; then the encoder-level method."""

    uses_base = True  # with a base: E-PUR and Fine-purifying; without: clean fine-tuning

    name = "auto"
    config_class = AutoPurifyConfig

    def _purify(self, inputs: PurifyInputs, work_dir: Path | None) -> PurifyResult:
        cfg = self.config
        if inputs.base is None:  # step 4
            choices = {"base": False, "steps": ["finetune"], "why": "no base: clean fine-tuning only"}
            return self._run("finetune", {}, [], inputs, work_dir, choices)
        signals = embedding_signals(inputs, cfg.margin)  # step 1
        n_out = len(signals["standing_out"])  # step 2: reset the standing-out rows (and E-PUR's own top rows)
        before = epur_step(n_out, cfg)
        method, params = cfg.encoder_method, cfg.encoder_params  # step 3
        if before and cfg.after_epur == "finetune":
            method, params = "finetune", {}
        choices = {"base": True, "scan": signals, "steps": [*(n for n, _ in before), method],
                   "why": (f"{n_out} embedding rows stand out" if n_out else "no embedding row stands out")
                   + ("; E-PUR first" if before else "")
                   + f"; then {method}"}
        if before and n_out and cfg.encoder_step == "if_trigger_remains":
            return self._probed(method, params, before, inputs, work_dir, choices)
        return self._run(method, params, before, inputs, work_dir, choices)

    def _probed(self, method: str, params: dict[str, Any], before: list[tuple[str, dict[str, Any]]],
                inputs: PurifyInputs, work_dir: Path | None, choices: dict[str, Any]) -> PurifyResult:
        """The embedding step, then the encoder method only if the trigger probe says the flagged
        tokens were a trigger before the reset and still are after it."""
        words = candidate_words(choices["scan"]["standing_out"])
        probe = {"words": words, "before": probe_candidates(inputs.suspect, inputs.clean, words)}
        embedding = build_purify_defense(*before[-1], have_base=True, before=before[:-1])
        reset = embedding.run(inputs, None if work_dir is None else work_dir / "embedding-step")
        probe["after"] = probe_candidates(inputs.suspect, inputs.clean, words)
        was = probe["before"]["excess"] >= self.config.flip_margin
        gone = probe["after"]["excess"] < self.config.flip_margin
        choices["trigger_probe"] = probe
        if was and gone:
            choices["steps"] = [n for n, _ in before]
            choices["why"] += f"; trigger probe: {' '.join(words)} no longer a trigger after the reset, so {method} is skipped"
            logger.info("purify auto: %s", choices["why"])
            reset.report = {"method": self.name, "choices": choices, "steps": reset.report}
            return reset
        choices["why"] += ("; trigger probe: the flagged tokens " + ("still act as a trigger" if was else
                                                                       "did not act as a trigger before the reset"))
        return self._run(method, params, [], inputs, work_dir, choices, embedding_step=reset.report)

    def _run(self, method: str, params: dict[str, Any], before: list[tuple[str, dict[str, Any]]],
             inputs: PurifyInputs, work_dir: Path | None, choices: dict[str, Any],
             embedding_step: dict[str, Any] | None = None) -> PurifyResult:
        logger.info("purify auto: %s", choices["why"])
        plan = build_purify_defense(method, params, have_base=inputs.base is not None, before=before)
        result = plan.run(inputs, work_dir)
        steps = result.report if embedding_step is None else {"before": [embedding_step], **result.report}
        result.report = {"method": self.name, "choices": choices, "steps": steps}
        return result


def epur_step(n_out: int, cfg: AutoPurifyConfig) -> list[tuple[str, dict[str, Any]]]:
    """The embedding step: E-PUR's bare reset (no fine-tuning of its own; the encoder method follows)."""
    if cfg.epur_rule == "scan":
        return [("e-pur", {"n_reset": n_out, **cfg.epur_params, "finetune": False})] if n_out else []
    own = PURIFY_DEFENSES.get("e-pur").config_class(**{**cfg.epur_params, "finetune": False}).n_reset
    n_reset = max(n_out, own)
    return [("e-pur", {**cfg.epur_params, "n_reset": n_reset, "finetune": False})]


def candidate_words(tokens: Sequence[str]) -> list[str]:
    """Scan's flagged tokens as words to insert (a WordPiece continuation loses its ``##``)."""
    words = [t[2:] if t.startswith("##") else t for t in tokens]
    return [w for w in dict.fromkeys(words) if w.strip()]


def probe_candidates(clf: Classifier, clean: Dataset, words: Sequence[str], seed: str = "probe") -> dict[str, float]:
    """Flip rate of ``clf``'s predictions on the clean rows when all of ``words`` are inserted (each at its
    own random word position), the same for as many of the clean text's most frequent words (the
    control: function words in real text, which carry no label), and their difference (``excess``)
    [OURS]. Inserting a trigger changes many predictions; neutral words few. (Random clean words are no
    control: in a sentiment task they are often sentiment words.)"""
    flagged = set(words)
    counts = Counter(w for e in clean.examples for w in e.text.lower().split() if w not in flagged)
    control = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:len(words)]]
    plain = predict(clf, clean.examples)
    rates = {name: float(np.mean(predict(clf, inserted(clean, chosen, f"{seed}-{name}")) != plain))
             for name, chosen in (("flagged", words), ("control", control))}
    return {**rates, "excess": rates["flagged"] - rates["control"]}


def inserted(data: Dataset, words: Sequence[str], seed: str) -> list[Example]:
    """The rows of ``data`` with every one of ``words`` inserted at its own random word position (seeded)."""
    rng = random.Random(seed)
    return [Example(e.id, insert_words(e.text, words, rng), e.label, e.text_pair) for e in data.examples]


def embedding_signals(inputs: PurifyInputs, margin: float) -> dict[str, Any]:
    """Scan's token signals: the rows that stand out, the rule, the top few scores (no weights summary)."""
    from unbackdoor.scan import scan_tokens

    assert inputs.base is not None
    return scan_tokens(inputs.suspect, inputs.base, inputs.clean, margin=margin)
