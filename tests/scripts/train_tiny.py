"""Train a tiny model on synthetic data; used by the resume and distributed tests.

usage: train_tiny.py MODEL_DIR WORK_DIR RESULT_JSON [--kill-at-step N] [--epochs E]
Under torchrun every process trains its shard; each writes RESULT_JSON.rank<k>.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from synthetic import make_task  # noqa: E402

from unbackdoor.evaluate import evaluate_classifier  # noqa: E402
from unbackdoor.models import load_classifier  # noqa: E402
from unbackdoor.training import Callback, TrainConfig, make_accelerator, train_classifier  # noqa: E402


class KillAt(Callback):
    """SIGKILL this process right after optimizer step ``step``: no clean-up, like a crash."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, ctx) -> None:  # noqa: ANN001
        if ctx.state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("work")
    parser.add_argument("result")
    parser.add_argument("--kill-at-step", type=int)
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    task = make_task(320, 60, 100)
    config = TrainConfig(epochs=args.epochs, batch_size=16, learning_rate=1e-3, checkpoint_every=3, progress=False)
    accelerator = make_accelerator(config)
    clf = load_classifier(args.model)
    callbacks = [KillAt(args.kill_at_step)] if args.kill_at_step else []
    result = train_classifier(clf, task.train, config, dev=task.dev, callbacks=callbacks, work_dir=args.work,
                              accelerator=accelerator)
    digest = hashlib.sha256()
    for name, tensor in sorted(clf.model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().numpy().tobytes())
    metrics = evaluate_classifier(clf, task.test)
    out = {
        "world_size": accelerator.num_processes,
        "rank": accelerator.process_index,
        "cacc": metrics.cacc,
        "history": result.history,
        "best_epoch": result.best_epoch,
        "steps": result.steps,
        "resumed_from_step": result.resumed_from_step,
        "weights_sha256": digest.hexdigest(),
    }
    suffix = f".rank{accelerator.process_index}" if accelerator.num_processes > 1 else ""
    Path(args.result + suffix).write_text(json.dumps(out))


if __name__ == "__main__":
    main()
