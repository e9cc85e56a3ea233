"""Strict configuration models and YAML loading shared by every command and method."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from unbackdoor.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


class StrictConfig(BaseModel):
    """Base of every config: unknown keys are errors, values are validated, instances frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class CommandConfig(StrictConfig):
    """The options every command that loads a model or writes an output shares."""

    allow_pickle: bool = Field(False, description="allow pickle (.bin) weights, plain tensors only: for files you "
                               "trust")
    overwrite: bool = Field(False, description="replace an existing output that unbackdoor wrote")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="compute precision: auto = bf16 autocast where the processor runs bf16 natively "
        "(avx512_bf16/AMX CPUs, bf16 GPUs), else fp32")


def format_validation_error(exc: ValidationError, where: str, cls: type[BaseModel] | None = None) -> str:
    """One line naming each bad key and why; an unknown key gets the nearest valid key of ``cls``."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            hint = nearest_key(cls, tuple(err["loc"])) if cls is not None else None
            msg = "unknown key" + (f" (did you mean {hint}?)" if hint else "")
        parts.append(f"{loc}: {msg}")
    return f"{where}: " + "; ".join(parts)


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The config classes an annotation may hold (``X``, ``X | None``, ``list[X]``, unions)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in get_args(annotation) for m in _models_in(arg)]


def _field_models(field: Any) -> list[type[BaseModel]]:
    """The config classes a field holds: by its type, or, for a plain mapping validated later, the class
    named by ``json_schema_extra={"keys_of": Class}``."""
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    keys_of = extra.get("keys_of")
    return _models_in(field.annotation) + ([keys_of] if isinstance(keys_of, type) else [])


def _model_at(cls: type[BaseModel], path: tuple[Any, ...]) -> type[BaseModel] | None:
    """The config class that holds the key at ``path`` (list indices skipped)."""
    for part in path:
        if isinstance(part, int):
            continue
        field = cls.model_fields.get(str(part))
        models = _field_models(field) if field is not None else []
        if not models:
            return None
        cls = models[0]
    return cls


def _dotted_fields(cls: type[BaseModel], prefix: str = "", depth: int = 3) -> list[str]:
    names = []
    for name, field in cls.model_fields.items():
        names.append(prefix + name)
        if depth > 1:
            for inner in _field_models(field):
                names += _dotted_fields(inner, f"{prefix}{name}.", depth - 1)
    return names


def nearest_key(cls: type[BaseModel], loc: tuple[Any, ...]) -> str | None:
    """A valid key the user probably meant by the unknown key at ``loc``: the same name one level
    down (``epochs`` -> ``train.epochs``), else a close spelling among its siblings."""
    holder = _model_at(cls, loc[:-1])
    if holder is None or not loc:
        return None
    key = str(loc[-1])
    prefix = "".join(f"{p}." for p in loc[:-1] if not isinstance(p, int))
    nested = [name for name in _dotted_fields(holder) if "." in name and name.rsplit(".", 1)[1] == key]
    if nested:
        return " or ".join(prefix + name for name in nested[:3])
    close = difflib.get_close_matches(key, list(holder.model_fields), n=1, cutoff=0.7)
    return prefix + close[0] if close else None


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
        raise ConfigError(format_validation_error(exc, where, cls)) from None


MERGE_TAG = "tag:yaml.org,2002:merge"


class DuplicateKeyError(yaml.YAMLError):
    """A mapping gives one key twice (YAML itself would keep the last value silently)."""


class StrictYamlLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == MERGE_TAG:
                continue  # merge keys (<<) and complex keys: the base loader handles them
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise DuplicateKeyError(f"key {key!r} given twice (lines {seen[key]} and {line})")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


StrictYamlLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, StrictYamlLoader.construct_yaml_map)


def parse_yaml(text: str) -> Any:
    """YAML text to Python values, safely, refusing duplicated keys."""
    return yaml.load(text, Loader=StrictYamlLoader)  # noqa: S506 - a SafeLoader subclass


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from ``path`` (an empty file is an empty mapping); a key given twice is an error."""
    path = Path(path)
    try:
        data = parse_yaml(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.strerror})") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: config is not UTF-8 text ({exc.reason})") from exc
    except DuplicateKeyError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: malformed YAML ({str(exc).splitlines()[0]})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping of keys to values")
    return data
