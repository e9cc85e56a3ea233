"""build_config: strict keys, one-line errors, partial nested configs keep their defaults."""

from __future__ import annotations

import pytest

from unbackdoor.config import build_config
from unbackdoor.purify import FineMixingConfig
from unbackdoor.training.config import five_epoch_train_config
from unbackdoor.errors import ConfigError


def test_partial_nested_config_changes_only_the_given_keys() -> None:
    config = build_config(FineMixingConfig, {"rho": 0.3, "train": {"learning_rate": 1e-4}}, "params")
    expected = five_epoch_train_config().model_copy(update={"learning_rate": 1e-4})
    assert config.rho == 0.3 and config.train == expected
    assert config.train.epochs == 5 and config.train.selection_ties == "last"  # the method's, not TrainConfig's


def test_unknown_nested_key_is_one_clear_error() -> None:
    with pytest.raises(ConfigError, match=r"^params: train\.learning_rat: unknown key \(did you mean train\.learning_rate\?\)$"):
        build_config(FineMixingConfig, {"train": {"learning_rat": 1e-4}}, "params")
