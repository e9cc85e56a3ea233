"""bf16 autocast: how ``auto`` resolves, that results record it, that a bf16 model predicts and
trains like an fp32 one, and that the gradient- and curvature-sensitive parts (diagonal Fisher,
TSBD's neuron weight change, EWC's penalty, MuScleLoRA's reference gradient) agree with fp32.

Tiny models resolve ``auto`` to fp32 (they gain nothing from bf16), so these tests ask for bf16."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from unbackdoor.errors import ConfigError
from unbackdoor.evaluate import evaluate_classifier
from unbackdoor.inference import predict
from unbackdoor.models import load_classifier
from unbackdoor.precision import BF16_MIN_HIDDEN, cpu_has_native_bf16, resolve_precision
from unbackdoor.training import TrainConfig, train_classifier


def test_auto_resolves_by_processor_and_model_size() -> None:
    assert resolve_precision("fp32", 384) == "fp32" and resolve_precision("bf16", 32) == "bf16"
    assert resolve_precision("auto", BF16_MIN_HIDDEN - 1) == "fp32"  # small models stay in fp32
    native = torch.cuda.is_bf16_supported() if torch.cuda.is_available() else cpu_has_native_bf16()
    assert resolve_precision("auto", 384) == ("bf16" if native else "fp32")
    with pytest.raises(ConfigError, match="precision 'fp16'"):
        resolve_precision("fp16")


def test_the_precision_is_kept_with_the_model_and_recorded(planted, tmp_path: Path) -> None:  # noqa: ANN001
    from unbackdoor.models import provenance_record

    assert load_classifier(planted.victim_dir).precision == "fp32"  # tiny: auto -> fp32
    clf = load_classifier(planted.victim_dir, precision="bf16")
    assert clf.precision == "bf16"
    assert provenance_record(clf)["precision"] == "bf16"
    assert evaluate_classifier(clf, planted.task.test).precision == "bf16"


def test_bf16_predictions_agree_with_fp32(planted) -> None:  # noqa: ANN001
    rows = [*planted.task.test.examples, *planted.poisoned.triggered_test.examples]
    fp32 = predict(load_classifier(planted.victim_dir, precision="fp32"), rows)
    bf16 = predict(load_classifier(planted.victim_dir, precision="bf16"), rows)
    assert (fp32 == bf16).mean() >= 0.97


def test_bf16_batches_are_padded_to_a_multiple_of_16_and_fp32_ones_are_not(planted) -> None:  # noqa: ANN001
    from unbackdoor.inference import BF16_PAD_MULTIPLE, collate, encode

    rows = planted.task.test.examples[:5]
    for precision in ("bf16", "fp32"):
        clf = load_classifier(planted.victim_dir, precision=precision)
        feats = encode(clf, rows)
        batch = collate(clf, feats)
        longest = max(len(f["input_ids"]) for f in feats)
        width = -(-longest // BF16_PAD_MULTIPLE) * BF16_PAD_MULTIPLE if precision == "bf16" else longest
        assert batch["input_ids"].shape == (5, width)
        assert batch["attention_mask"].sum().item() == sum(len(f["input_ids"]) for f in feats)  # pads are masked


def test_bf16_training_learns_the_task_and_the_backdoor(planted) -> None:  # noqa: ANN001
    results = {}
    for precision in ("fp32", "bf16"):
        clf = load_classifier(planted.base_dir, precision=precision)
        config = TrainConfig(epochs=10, batch_size=16, learning_rate=1e-3, seed=1, progress=False)
        training = train_classifier(clf, planted.poisoned.train, config, dev=planted.task.dev)
        assert training.precision == precision
        results[precision] = evaluate_classifier(clf, planted.task.test, planted.poisoned.triggered_test)
    assert results["bf16"].cacc >= 0.9 and results["bf16"].asr >= 0.8
    assert abs(results["bf16"].cacc - results["fp32"].cacc) <= 0.05


def _pair(planted):  # noqa: ANN001, ANN202
    return load_classifier(planted.victim_dir, precision="fp32"), load_classifier(planted.victim_dir, precision="bf16")


def test_diagonal_fisher_is_an_fp32_island(planted) -> None:  # noqa: ANN001
    from unbackdoor.optim import diagonal_fisher

    fp32, bf16 = _pair(planted)
    a, b = (diagonal_fisher(c, planted.clean, max_rows=24) for c in (fp32, bf16))
    # equal up to fp32 rounding: bf16 batches are padded to a multiple of 16 tokens (masked positions)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-10) for k in a)


def test_tsbd_neuron_weight_change_is_an_fp32_island(planted) -> None:  # noqa: ANN001
    from unbackdoor.purify.tsbd import TsbdConfig, score_neurons

    fp32, bf16 = _pair(planted)
    config = TsbdConfig()
    a, b = (score_neurons(c, planted.clean, config).scores for c in (fp32, bf16))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k]) for k in a)


def test_ewc_penalty_is_computed_in_fp32(planted) -> None:  # noqa: ANN001
    from unbackdoor.unlearn.ewc import anchor_of, ewc_penalty

    fp32, bf16 = _pair(planted)
    names = [n for n, _ in fp32.model.named_parameters()][:6]
    anchor = anchor_of(fp32.model, names)
    fisher = {n: torch.rand_like(t) for n, t in anchor.items()}
    for clf in (fp32, bf16):
        with torch.no_grad():
            for n, p in clf.model.named_parameters():
                if n in names:
                    p.add_(0.01)
    params = [dict(c.model.named_parameters()) for c in (fp32, bf16)]
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as inside a bf16 training step
        in_bf16 = ewc_penalty({n: params[1][n] for n in names}, anchor, fisher, 1.0)
    reference = ewc_penalty({n: params[0][n] for n in names}, anchor, fisher, 1.0)
    assert in_bf16.dtype == torch.float32 and torch.allclose(in_bf16, reference)


def test_musclelora_reference_gradient_in_bf16_points_the_same_way(planted) -> None:  # noqa: ANN001
    """The reference gradient of gradient alignment runs in the step's own precision; in bf16 it
    points the way the fp32 one does (cosine > 0.99 over all trainable weights)."""
    from unbackdoor.inference import collate, encode

    grads = {}
    for clf in _pair(planted):
        model = copy.deepcopy(clf.model).train()
        torch.manual_seed(0)
        batch = collate(clf, encode(clf, planted.clean.examples[:32]), planted.clean.labels[:32])
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if clf.precision == "bf16" else torch.autocast("cpu", enabled=False)
        with ctx:
            loss = model(**batch).loss
        params = [p for p in model.parameters() if p.requires_grad]
        grads[clf.precision] = torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])
    cosine = torch.nn.functional.cosine_similarity(grads["fp32"], grads["bf16"], dim=0)
    assert cosine > 0.99
