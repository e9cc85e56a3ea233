"""``unbackdoor train --defense auto``: find the training rows that are easy to fit, then train from the
base without them [OURS].

What the defender has here: the training rows (no flags), the clean pre-trained base and a clean dev
set. Nothing about the attack. Steps:

1. **Score** every training row with each registered detector of ``detectors`` in turn, on the rows
   the earlier detectors left (default: ``zscore``, Z-defence's lexical filter, which finds word and
   sentence triggers from label statistics alone; then ``contrast``, the rows a lexical classifier
   tells apart from the clean dev set, for a trigger spread over many weak words such as a style;
   then ``isolation``, ABL's early-loss isolation on a copy of the base, for triggers no word count
   sees: the rows a trigger makes easy to fit keep falling below γ while clean rows are held near it;
   :mod:`unbackdoor.detect`). ``contrast`` joined the default on the development grids (3 seeds;
   docs/results/auto.md): on OpenBackdoor's StyleBkd SST-2 rows re-tokenised it adds 2–26 rows per
   seed at precision 0.5–0.6, elsewhere 0–3; end to end ASR −5.2 and −3.3 on the style rows
   (re-tokenised, as released), +0.3 on average on BadNets, AddSent and SynBkd (HSOL, QNLI, OLID,
   SST-2), moves of the size of the retraining's own noise. ``reference`` (the rows whose label a copy of
   the base fine-tuned on the clean set rejects) can be added; it failed both its development rounds
   (docs/results/reference_dev/: style ASR -9.4 / -6.5, but clean rows lost where the lexical detectors had
   already found the poison), so it is not a default.
2. **Choose the rows to drop** after each detector, from its scores alone (``drop``):
   ``calibrated`` [OURS, default]: the rows above the threshold the detector calibrated on the clean
   set, where it gives one (``zscore``: the 99th percentile of the clean rows' scores; ``contrast``:
   its empirical-null false-discovery cut), else ``gap``;
   ``gap`` [OURS]: among the ``max_drop`` most suspicious rows, cut where the sorted scores jump
   most, if the jump is large for these scores (a separate group: a trigger easier to fit than the
   task gives one, and the cut falls at its edge), else drop only ``min_drop``; ``rate``: the
   ``rate`` most suspicious rows. Every choice is logged.
3. **Retrain** the base on the remaining rows with the victim recipe, the epoch chosen on clean dev
   accuracy (the rows the detectors trained on are never used for selection). ``balance=dev``
   [OURS, default]: weight each kept row's loss by p_dev(y) / p_kept(y), as dropping a dirty-label
   attack's rows (non-target text labelled as the target) leaves the target label over-represented,
   and the retrained model leans to it.
3a. ``clean_rows`` [OURS, default 0.5; 0 = off]: this share of the clean dev set (stratified, seeded) is
   trained on with the kept rows; the rest is the dev set of every later step (the epoch, the label shares,
   the bias shift, the clean relabeller), so no row both trains and selects. The detectors saw all of it.
   More clean text of every label, against what is left of the lean and of undetected poison. Chosen on the
   development grids by a rule written down before the runs (3 seeds; docs/results/auto.md): against 0, ASR
   lower on all 6 (task, attack) pairs (HSOL and QNLI dirty BadNets and AddSent, OpenBackdoor's SynBkd and
   StyleBkd SST-2 rows re-tokenised), e.g. StyleBkd 51.1 -> 44.5 and QNLI BadNets 29.2 -> 24.2, CACC +2.8
   on average. The model then also learnt from clean rows the never-poisoned reference did not see:
   ``benchmarks/floor_clean_rows.py`` trains that reference on the same rows.
4. ``shift_bias=dev`` [OURS, default]: shift the retrained head's bias so its mean predicted class
   probabilities on the clean dev set match the dev label shares (:mod:`unbackdoor.calibration`):
   the remedy for what is left of the lean after training. Both together gave the lowest ASR at the
   highest CACC on HSOL and QNLI (balanced binary tasks outside the acceptance grids, 3 seeds ×
   dirty BadNets and AddSent); ``none`` turns either off.
4b. ``suspects=relabel`` [OURS option, off; giving the suspected rows back follows DBD's idea (Huang et al.,
   "Backdoor Defense via Decoupling the Training Process", ICLR 2022: suspected samples lose their labels
   and return as unlabelled data), the rule is ours]: a model predicts every dropped row; the rows whose
   given label it rejects come back with the label it predicts and step 3 runs again from the base on the
   kept rows plus these. The model (``relabeller``): ``retrained``, the one steps 3-4 give on the kept
   rows (twice the training time; it has learnt whatever poison the detectors left), or ``clean``, a
   logistic regression on the frozen base's sentence features of the clean dev set (seconds; it never
   saw a training row, but is a weaker classifier; the dev set then also gives these labels). A
   dirty-label row (non-target text, the trigger, the target label) then teaches its trigger against the
   target, and the non-target rows the attack took are given back; a row whose label the model accepts
   (a clean-label attack's rows, most clean rows a detector took by mistake) stays out. Measured on the
   development grids it lowered ASR on every attack (to below the floor), but that is the trigger
   turned into an anti-trigger: with AddSent's rows given back, the trigger moved 93-95 % of clean
   target-label rows to the other label (never-poisoned model: 2-13 %). A backdoor towards the other
   label is not a clean model, so ``drop`` stays the default (docs/results/auto.md).
   ``suspects=strip`` [OURS option]: only the rows a detector can clean come back: ``zscore`` deletes from
   the rows it dropped the words of their outlying features where these are all inserted words or pairs
   (rare in clean text, each tied to its label on its own; :meth:`~unbackdoor.detect.base.Detector.strip`),
   and gives a row back only if nothing outlying is left; a template's or a style's rows keep their
   trigger and stay out. The stripped rows come back with the label the relabeller predicts: a
   dirty-label row as the non-target text it was, without the trigger, so the non-target texts the
   attack took are given back and nothing teaches the trigger in either direction.
5. ``soup`` [OURS option; the averaging follows Wortsman et al., "Model soups", ICML 2022]: step 3 runs
   ``soup`` times from the same start with seeds seed, seed+1, ... and the weights are averaged
   (before step 4). At 1,000 rows one retraining's ASR moves by several points when a few rows
   change; the average of several is meant to damp that. The record gives each member's dev accuracy
   and the soup's.

The report (``unbackdoor.json``'s ``defense``) records each detector's report, the drop rule, the
score at each cut, how many rows were dropped and which.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from unbackdoor.calibration import calibrate_to_dev
from unbackdoor.config import StrictConfig
from unbackdoor.data.types import Dataset, Example
from unbackdoor.detect.base import DetectInputs, Detector, FlagRule, build_detector, suspicion_order
from unbackdoor.detect.features import clean_classifier, representations, standardise
from unbackdoor.inference import predict_logits
from unbackdoor.models.loading import Classifier
from unbackdoor.models.surgery import restore_state, snapshot_state
from unbackdoor.train_defenses.base import TRAIN_DEFENSES, TrainDefense, TrainDefenseResult, TrainInputs, clean_split
from unbackdoor.training.callbacks import Callback
from unbackdoor.training.config import TrainConfig, merge_train, victim_train_config
from unbackdoor.training.loop import TrainResult, train_classifier

logger = logging.getLogger(__name__)


class AutoTrainConfig(StrictConfig):
    """Options of ``auto`` (all [OURS]; defaults chosen on the development grids, see
    ``docs/results/auto.md``: the detectors and drop rule on ``benchmarks/dev_olid.yaml``, ``contrast`` on
    ``benchmarks/dev_sst2_retok.yaml`` and the other dev grids, ``balance`` and ``shift_bias`` on
    ``benchmarks/dev_hsol_lean.yaml`` and ``benchmarks/dev_qnli_lean.yaml``, ``clean_rows`` on
    ``benchmarks/dev_strip.yaml`` and ``benchmarks/dev_sst2_retok_clean.yaml``)."""

    detectors: list[str] = Field(default_factory=lambda: ["zscore", "contrast", "isolation"], min_length=1,
                                 description="detectors run in turn, each on the rows the ones before left "
                                 "(unbackdoor.detect.DETECTORS)")
    detector_params: dict[str, dict[str, Any]] = Field(default_factory=dict,
                                                       description="options by detector name")
    drop: Literal["calibrated", "gap", "rate"] = Field(
        "calibrated", description="calibrated: the rows above the detector's clean-set threshold where it gives one, "
        "else gap; gap: cut the sorted scores where they jump most among the max_drop most suspicious rows; "
        "rate: drop the rate most suspicious")
    rate: float = Field(0.2, gt=0, lt=1, description="drop=rate: share of rows dropped")
    max_drop: float = Field(0.35, gt=0, lt=1, description="drop=gap: never drop more than this share of rows")
    min_drop: float = Field(0.01, ge=0, lt=1, description="drop=gap: drop at least this share of rows (also what is "
                            "dropped when no separate group shows)")
    significance: float = Field(0.25, gt=0, description="drop=gap: a jump counts as a group's edge when it is at "
                                "least this many interquartile ranges of the scores")
    balance: Literal["none", "dev"] = Field(
        "dev", description="dev: weight the kept rows' loss so their label shares match the clean dev set's "
        "(dropping a dirty-label attack's rows leaves the target label over-represented); none: plain retraining. "
        "Default chosen on the development grid (docs/results/auto.md)")
    shift_bias: Literal["none", "dev"] = Field(
        "dev", description="dev: after retraining, shift the head's bias so the mean predicted class probabilities on "
        "the clean dev set match its label shares; none: leave the retrained model as it is. Default chosen on the "
        "development grid (docs/results/auto.md)")
    suspects: Literal["drop", "relabel", "strip"] = Field(
        "drop", description="drop: retrain without the dropped rows; relabel: give back the dropped rows whose label "
        "the relabeller rejects, with the label it predicts (a dirty-label row then teaches its trigger against the "
        "target: lower ASR, but the trigger becomes an anti-trigger, so it is off; docs/results/auto.md); strip: give "
        "back the dropped rows a detector can delete its trigger words from (zscore), without them, with the label "
        "the relabeller predicts")
    relabeller: Literal["retrained", "clean"] = Field(
        "clean", description="suspects=relabel or strip: whose prediction gives the labels; retrained: the model "
        "trained without the dropped rows (steps 3-4); clean: a logistic regression on the frozen base's sentence features "
        "of the clean dev set (never saw a training row; its penalty chosen by 5-fold accuracy on the dev set)")
    clean_rows: float = Field(0.5, ge=0, lt=1, description="share of the clean dev set trained on with the kept rows "
                              "(after the detectors, which see all of it); the rest selects the epoch, gives the label "
                              "shares, the bias shift and the clean relabeller; 0: the dev set only selects. Default "
                              "chosen on the development grids (docs/results/auto.md)")
    soup: int = Field(1, ge=1, description="retrain this many times (seeds seed, seed+1, ...) from the same start and "
                      "average the weights (a uniform model soup); 1: one retraining")
    train: TrainConfig | None = Field(None, description="the retraining; keys given override the victim defaults "
                                      "(3 epochs, batch 32, lr 1e-4)")

    @model_validator(mode="after")
    def _detector(self) -> AutoTrainConfig:
        strays = sorted(set(self.detector_params) - set(self.detectors))
        if strays:
            raise ValueError(f"detector_params for {', '.join(strays)}, which detectors does not list")
        for name in self.detectors:
            build_detector(name, self.detector_params.get(name, {}))  # an unknown detector or option fails here
        if self.min_drop > self.max_drop:
            raise ValueError("min_drop must not exceed max_drop")
        return self


def gap_cut(scores: torch.Tensor, min_share: float, max_share: float, significance: float = 0.25) -> tuple[int, float]:
    """How many of the most suspicious rows to drop: where consecutive sorted scores jump most among the
    first ``max_share`` of rows, if that jump is at least ``significance`` × the scores' interquartile
    range (a separate group); else ``min_share`` of the rows (no group: keep almost everything).
    Returns (count, score at the cut)."""
    ordered = torch.sort(scores.double(), descending=True).values
    n = len(ordered)
    lo, hi = max(1, int(min_share * n)), max(1, min(n - 1, int(max_share * n)))
    if hi > lo:
        gaps = ordered[lo - 1:hi] - ordered[lo:hi + 1]  # gaps[j] separates rank lo + j from the next
        j = int(torch.argmax(gaps))
        spread = float(torch.quantile(ordered, 0.75) - torch.quantile(ordered, 0.25))
        if float(gaps[j]) >= significance * spread and float(gaps[j]) > 0:
            k = lo + j
            return k, float(ordered[k - 1])
    return lo, float(ordered[lo - 1])


@TRAIN_DEFENSES.register("auto")
class AutoTrain(TrainDefense[AutoTrainConfig]):
    """Score the rows, drop the easily fitted group, retrain from the base on the rest."""

    name = "auto"
    config_class = AutoTrainConfig

    def train_config(self, clf: Classifier) -> TrainConfig:
        return merge_train(victim_train_config(), self.config.train)

    def _fit(self, inputs: TrainInputs, work_dir: Path | None, observers: list[Callback]) -> TrainDefenseResult:
        cfg = self.config
        start = snapshot_state(inputs.model.model)  # the base (with its seeded head), kept for step 3
        kept, dropped, steps, detectors = inputs.rows, [], [], []
        for name in cfg.detectors:  # steps 1 and 2, detector by detector
            restore_state(inputs.model.model, start)
            ids, step, detector = self._drop(name, kept, inputs)
            dropped += ids
            kept = kept.without(ids, f"{inputs.rows.name}[auto: {len(dropped)} rows dropped]")
            steps.append(step)
            detectors.append((detector, ids))
        logger.info("auto: dropped %d of %d rows (%s); retraining on %d", len(dropped), len(inputs.rows),
                    ", ".join(f"{s['detector']} {s['n_dropped']}" for s in steps), len(kept))
        train = self.train_config(inputs.model)  # step 3: from the base, on the rows kept
        added: list[Example] = []
        if cfg.clean_rows > 0:  # step 3a
            inputs, added = with_clean_rows(inputs, cfg.clean_rows, train.seed)
            kept = kept.replace([*kept.examples, *added], f"{kept.name} + {len(added)} clean rows")
        returned, relabelling = [], None
        if cfg.suspects != "drop" and dropped:  # step 4b
            suspects = (list(inputs.rows.select(dropped)) if cfg.suspects == "relabel"
                        else stripped_suspects(inputs.rows, detectors))
            if suspects:
                predicted, relabelling = self._predict(inputs, kept, suspects, train, start, work_dir, observers)
                returned = (rejected_relabelled(suspects, predicted) if cfg.suspects == "relabel"
                            else relabelled(suspects, predicted))
            kept = kept.replace([*kept.examples, *returned],
                                f"{kept.name} + {len(returned)} given back ({cfg.suspects})")
            logger.info("auto: gave back %d of the %d dropped rows (%s) with the label the %s relabeller predicts; "
                        "retraining on %d", len(returned), len(dropped), cfg.suspects, cfg.relabeller, len(kept))
        given_back = [{"id": e.id, "label": e.label, **({"text": e.text, "text_pair": e.text_pair}
                                                         if cfg.suspects == "strip" else {})} for e in returned]
        trainings, soup, shares = self._retrain(inputs, kept, train, start, work_dir, observers,
                                                {"dropped": dropped, "returned": given_back})
        training = trainings[0]
        calibration = calibrate_to_dev(inputs.model, inputs.dev) if cfg.shift_bias == "dev" else None  # step 4
        report = {"method": self.name, "config": cfg.model_dump(mode="json"), "train": train.model_dump(),
                  "choices": {"detectors": cfg.detectors, "drop_rule": cfg.drop, "n_dropped": len(dropped),
                              "share_dropped": len(dropped) / len(inputs.rows), "label_shares": shares,
                              "suspects": cfg.suspects, "n_returned": len(returned), "relabeller": relabelling,
                              "bias_shift": calibration, "soup": soup, "n_clean_trained": len(added),
                              "n_clean_selecting": len(inputs.dev),
                              "steps": [{k: v for k, v in s.items() if k != "report"} for s in steps]},
                  "detectors": {s["detector"]: s["report"] for s in steps}, "dropped_ids": dropped,
                  "returned": given_back,
                  "n_trained": len(kept), "selected_epoch": training.best_epoch,
                  "selection_accuracy": training.best_dev_accuracy}
        return TrainDefenseResult(inputs.model, training, report)

    def _retrain(self, inputs: TrainInputs, kept: Dataset, train: TrainConfig, start: dict[str, torch.Tensor],
                 work_dir: Path | None, observers: list[Callback], fingerprint: dict[str, Any],
                 ) -> tuple[list[TrainResult], dict[str, Any] | None, dict[str, dict[int, float]] | None]:
        """Step 3 (and 5): ``inputs.model`` trained from ``start`` on ``kept`` (once, or the soup of
        ``soup`` retrainings); the trainings, the soup's record and the label shares behind the weights."""
        cfg = self.config
        weights, shares = label_balance(kept, inputs.dev) if cfg.balance == "dev" else (None, None)
        fingerprint = {"defense": self.name, "config": cfg.model_dump(mode="json"), **fingerprint}
        trainings, members = [], []
        for j in range(cfg.soup):
            restore_state(inputs.model.model, start)
            member = train if j == 0 else train.model_copy(update={"seed": train.seed + j})
            member_dir = work_dir if work_dir is None or j == 0 else work_dir / f"soup-{j}"
            trainings.append(train_classifier(inputs.model, kept, member, dev=inputs.dev, callbacks=observers,
                                              work_dir=member_dir, fingerprint=fingerprint, sample_weights=weights))
            if cfg.soup > 1:
                members.append(snapshot_state(inputs.model.model))
        soup = self._soup(inputs, members, trainings) if cfg.soup > 1 else None
        return trainings, soup, shares

    def _predict(self, inputs: TrainInputs, kept: Dataset, suspects: list[Example], train: TrainConfig,
                 start: dict[str, torch.Tensor], work_dir: Path | None, observers: list[Callback],
                 ) -> tuple[list[int], dict[str, float] | None]:
        """Step 4b: the relabeller's labels for ``suspects``; the clean relabeller's record (None for the
        retrained one)."""
        if self.config.relabeller == "clean":
            restore_state(inputs.model.model, start)
            return clean_predictions(inputs.model, inputs.dev, suspects)
        self._retrain(inputs, kept, train, start, None if work_dir is None else work_dir / "relabel-pass",
                      observers, {"pass": "relabel", "suspects": [e.id for e in suspects]})
        if self.config.shift_bias == "dev":  # the model suspects=drop returns
            calibrate_to_dev(inputs.model, inputs.dev)
        return predict_logits(inputs.model, suspects).argmax(1).tolist(), None

    @staticmethod
    def _soup(inputs: TrainInputs, members: list[dict[str, torch.Tensor]],
              trainings: list[TrainResult]) -> dict[str, Any]:
        """Put the members' average into ``inputs.model``; what the soup's record holds."""
        restore_state(inputs.model.model, average_states(members))
        logits = predict_logits(inputs.model, inputs.dev.examples)
        accuracy = float((logits.argmax(1) == np.asarray(inputs.dev.labels)).mean())
        logger.info("auto: soup of %d retrained models: dev accuracy %.4f (members %s)", len(members), accuracy,
                    ", ".join(f"{t.best_dev_accuracy:.4f}" for t in trainings))
        return {"members": len(members), "member_dev_accuracy": [t.best_dev_accuracy for t in trainings],
                "member_epoch": [t.best_epoch for t in trainings], "dev_accuracy": accuracy}

    def _drop(self, name: str, rows: Dataset, inputs: TrainInputs) -> tuple[list[str], dict[str, Any], Detector]:
        """One detector's scores over ``rows`` and the ids its cut drops (steps 1 and 2)."""
        cfg = self.config
        detector = build_detector(name, cfg.detector_params.get(name, {}))
        rule = FlagRule(rate=cfg.rate if cfg.drop == "rate" else cfg.max_drop)  # under gap, the cut below is ours
        detection = detector.detect(DetectInputs(rows, inputs.dev, inputs.model), rule)
        rule_used = cfg.drop if cfg.drop != "calibrated" or "threshold" in detection.report else "gap"
        if rule_used == "rate":
            k, cut = len(detection.flagged_ids), None
        elif rule_used == "calibrated":
            cut = float(detection.report["threshold"])
            k = min(int((detection.scores > cut).sum()), max(1, int(cfg.max_drop * len(rows))))
        else:
            k, cut = gap_cut(detection.scores, cfg.min_drop, cfg.max_drop, cfg.significance)
        ids = [rows.examples[i].id for i in suspicion_order(detection.scores, detection.tiebreak)[:k]]
        logger.info("auto: %s scored %d rows; dropping %d (%s%s)", name, len(rows), k, rule_used,
                    "" if cut is None else f", cut at score {cut:.4g}")
        return ids, {"detector": name, "rows_scored": len(rows), "drop_rule": rule_used, "n_dropped": k,
                     "score_at_cut": cut, "report": detection.report}, detector


def label_balance(kept: Dataset, dev: Dataset) -> tuple[list[float], dict[str, dict[int, float]]]:
    """Per-row loss weights w(y) = p_dev(y) / p_kept(y) (mean weight 1 over the kept rows), so the kept
    rows weigh as the clean dev set's label shares; and both shares, for the report."""
    def shares(labels: list[int]) -> dict[int, float]:
        counts = Counter(labels)
        return {y: counts[y] / len(labels) for y in sorted(counts)}

    p_kept, p_dev = shares(list(kept.labels)), shares(list(dev.labels))
    weights = [p_dev.get(y, 0.0) / p_kept[y] for y in kept.labels]
    mean = sum(weights) / len(weights)
    return [w / mean for w in weights], {"kept": p_kept, "dev": p_dev}


def with_clean_rows(inputs: TrainInputs, share: float, seed: int) -> tuple[TrainInputs, list[Example]]:
    """Step 3a: the clean rows trained on (:func:`clean_split`), and the inputs with the rest as their dev set."""
    added, select = clean_split(inputs.dev, share, seed)
    logger.info("auto: training on %d clean rows as well; %d select", len(added), len(select))
    return dataclasses.replace(inputs, dev=select), added


def rejected_relabelled(rows: list[Example], predicted: list[int]) -> list[Example]:
    """The rows whose label is not the one predicted for them, each with the predicted label (step 4b)."""
    return [new for old, new in zip(rows, relabelled(rows, predicted), strict=True) if new.label != old.label]


def relabelled(rows: list[Example], predicted: list[int]) -> list[Example]:
    """Every row with the label predicted for it (step 4b, ``suspects=strip``)."""
    return [dataclasses.replace(e, label=int(y)) for e, y in zip(rows, predicted, strict=True)]


def stripped_suspects(rows: Dataset, detectors: list[tuple[Detector, list[str]]]) -> list[Example]:
    """``suspects=strip``: the dropped rows a detector that names its trigger as text could clean, cleaned
    (:meth:`~unbackdoor.detect.base.Detector.strip`); rows dropped by the other detectors stay out."""
    out: list[Example] = []
    for detector, ids in detectors:
        if detector.strips and ids:
            cleaned = detector.strip(list(rows.select(ids)))
            out += [e for e in cleaned if e is not None]
            logger.info("auto: %s could strip its trigger from %d of the %d rows it dropped", detector.name,
                        sum(e is not None for e in cleaned), len(ids))
    return out


def clean_predictions(clf: Classifier, dev: Dataset, rows: list[Example]) -> tuple[list[int], dict[str, float]]:
    """``relabeller=clean``: labels for ``rows`` from a logistic regression on ``clf``'s frozen sentence
    features (mean pooling) of the clean ``dev`` rows, its L2 penalty chosen by 5-fold accuracy on them; and
    the penalty and accuracy, for the record."""
    dev_x, rows_x = representations(clf, dev.examples, "mean"), representations(clf, rows, "mean")
    dev_x, rows_x = standardise(dev_x, rows_x)
    weight, bias, l2, accuracy = clean_classifier(dev_x, torch.tensor(dev.labels), dev.num_labels)
    logger.info("auto: clean relabeller on %d dev rows: L2 %g, 5-fold accuracy %.4f", len(dev), l2, accuracy)
    return (rows_x @ weight.T + bias).argmax(1).tolist(), {"l2": l2, "dev_cv_accuracy": accuracy}


def average_states(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The element-wise mean of floating-point tensors (a uniform soup); other tensors from the first state."""
    return {k: torch.stack([st[k] for st in states]).mean(dim=0) if v.is_floating_point() else v
            for k, v in states[0].items()}
