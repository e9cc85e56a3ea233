"""Strict configuration models and YAML loading shared by every command and method."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from unbackdoor.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


class StrictConfig(BaseModel):
    """Base of every config: unknown keys are errors, values are validated, instances frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


def format_validation_error(exc: ValidationError, where: str) -> str:
    """One line naming each bad key and why."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        parts.append(f"{loc}: {msg}")
    return f"{where}: " + "; ".join(parts)


def _field_default(cls: type[BaseModel], name: str) -> Any:
    info = cls.model_fields[name]
    return info.default_factory() if info.default_factory is not None else info.default  # type: ignore[call-arg]


def with_nested_defaults(cls: type[BaseModel], values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with every partial nested config filled in from the field's own default.

    ``{"train": {"learning_rate": 1e-4}}`` changes only the learning rate of a method whose
    ``train`` default is, say, 5 epochs at batch 32, instead of replacing the whole ``train``.
    """
    merged = dict(values)
    for name, value in values.items():
        if name not in cls.model_fields or not isinstance(value, dict):
            continue
        default = _field_default(cls, name)
        if isinstance(default, BaseModel):
            merged[name] = {**default.model_dump(exclude_unset=False),
                            **with_nested_defaults(type(default), value)}
    return merged


def build_config(cls: type[M], values: dict[str, Any], where: str) -> M:
    """Validate ``values`` into ``cls`` (partial nested configs keep their field's defaults),
    turning validation errors into one ConfigError line."""
    try:
        return cls.model_validate(with_nested_defaults(cls, values))
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, where)) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from ``path`` (an empty file is an empty mapping)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.strerror})") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: config is not UTF-8 text ({exc.reason})") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: malformed YAML ({str(exc).splitlines()[0]})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping of keys to values")
    return data
