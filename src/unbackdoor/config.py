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


def build_config(cls: type[M], values: dict[str, Any], where: str) -> M:
    """Validate ``values`` into ``cls``, turning validation errors into one ConfigError line."""
    try:
        return cls.model_validate(values)
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
