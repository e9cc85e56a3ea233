"""A registry of named methods (attacks, defences), peft-style: one explicit object per family."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from unbackdoor.errors import ConfigError

T = TypeVar("T")


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
