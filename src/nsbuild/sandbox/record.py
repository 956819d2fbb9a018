"""Frozen records at a fraction of the import cost of dataclasses.

`nsbuild run` is benchmarked against bubblewrap; importing dataclasses (and
inspect with it) and generating code for a dozen classes costs more than the
rest of its start-up (the run path, nsbuild/cli/main.py). Modules write `@dataclass(frozen=True)` as
usual and import it from here at run time, while type checkers see the real
thing (`if TYPE_CHECKING: from dataclasses import dataclass, field`).
Supported: frozen=True, defaults, field(default_factory=...), keyword or
positional construction, ==, hash, repr and `replace()`.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, TypeVar

    T = TypeVar("T")
_MISSING = object()


class _Factory:
    __slots__ = ("make",)

    def __init__(self, make: Callable[[], Any]) -> None:
        self.make = make


def field(*, default_factory: Callable[[], Any]) -> Any:
    return _Factory(default_factory)


def dataclass(*, frozen: bool = True) -> Callable[[type[T]], type[T]]:
    assert frozen, "only frozen records are supported"

    def wrap(cls: type[T]) -> type[T]:
        names: tuple[str, ...] = ()
        for klass in reversed(cls.__mro__):
            names += tuple(n for n in klass.__dict__.get("__annotations__", {})  # noqa: RUF063
                           if n not in names)
        defaults = {n: getattr(cls, n) for n in names if hasattr(cls, n)}

        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            if len(args) > len(names):
                raise TypeError(f"{cls.__name__}() takes {len(names)} arguments")
            values = dict(zip(names, args, strict=False))
            for n in names[len(args):]:
                v = kwargs.pop(n, _MISSING)
                if v is _MISSING:
                    v = defaults.get(n, _MISSING)
                    if v is _MISSING:
                        raise TypeError(f"{cls.__name__}() missing argument {n!r}")
                    if isinstance(v, _Factory):
                        v = v.make()
                values[n] = v
            if kwargs:
                raise TypeError(f"{cls.__name__}() got unexpected {', '.join(kwargs)}")
            for n, v in values.items():
                object.__setattr__(self, n, v)

        def __setattr__(self: Any, name: str, value: Any) -> None:
            raise AttributeError(f"{cls.__name__} is frozen")

        def _key(self: Any) -> tuple[Any, ...]:
            return tuple(getattr(self, n) for n in names)

        def __eq__(self: Any, other: object) -> bool:
            return type(other) is type(self) and _key(self) == _key(other)

        def __hash__(self: Any) -> int:
            return hash((type(self).__name__, _key(self)))

        def __repr__(self: Any) -> str:
            inner = ", ".join(f"{n}={getattr(self, n)!r}" for n in names)
            return f"{cls.__name__}({inner})"

        def replace(self: Any, **changes: Any) -> Any:
            values = {n: getattr(self, n) for n in names}
            values.update(changes)
            return cls(**values)

        for name, fn in (("__init__", __init__), ("__setattr__", __setattr__),
                         ("__eq__", __eq__), ("__hash__", __hash__), ("__repr__", __repr__),
                         ("replace", replace)):
            setattr(cls, name, fn)
        setattr(cls, "__match_args__", names)  # noqa: B010 (read-only to type checkers)
        return cls

    return wrap


def replace(record: T, **changes: Any) -> T:
    """A copy of `record` with `changes`: dataclasses.replace for these records,
    typed for the callers (type checkers see real dataclasses, without the
    `replace()` method)."""
    return record.replace(**changes)  # type: ignore[attr-defined, no-any-return]
