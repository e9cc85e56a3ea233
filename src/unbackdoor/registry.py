"""A registry of named methods (attacks, defences), peft-style: one explicit object per family."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Generic, TypeVar

from unbackdoor.config import StrictConfig
from unbackdoor.errors import ConfigError

T = TypeVar("T")
C = TypeVar("C", bound=StrictConfig)


class Method(Generic[C]):
    """What every registered method is (attack, defence, detector, guard): a registry ``name``, a
    ``config_class`` (a :class:`~unbackdoor.config.StrictConfig`), and an ``__init__`` that only stores the
    validated config (scikit-learn's rule: no work, no side effects)."""

    name: ClassVar[str]
    config_class: ClassVar[type[Any]]

    def __init__(self, config: C | None = None) -> None:
        self.config: C = config if config is not None else self.config_class()


class Registry(Generic[T]):
    """Maps a method name to its class. ``register`` is a class decorator."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, type[T]] = {}

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        def add(cls: type[T]) -> type[T]:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._items[name] = cls
            return cls

        return add

    def get(self, name: str) -> type[T]:
        try:
            return self._items[name]
        except KeyError:
            raise ConfigError(
                f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items
