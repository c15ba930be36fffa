"""A tiny name → function registry (verl style): adding an estimator, a loss or a reward mode means
writing one decorated function."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

F = TypeVar("F", bound=Callable)


class Registry(Generic[F]):
    """`@registry.register("name")` on a function; `registry.get("name")` returns it."""

    def __init__(self, kind: str):
        self.kind = kind
        self._functions: dict[str, F] = {}

    def register(self, name: str) -> Callable[[F], F]:
        def decorator(function: F) -> F:
            if name in self._functions:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._functions[name] = function
            return function

        return decorator

    def get(self, name: str) -> F:
        if name not in self._functions:
            raise KeyError(f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self._functions))}")
        return self._functions[name]

    def names(self) -> list[str]:
        return sorted(self._functions)

    def __contains__(self, name: object) -> bool:
        return name in self._functions
