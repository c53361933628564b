"""Per-run state for plugins: ``config.stash[KEY]`` (pytest's ``Stash``/``StashKey`` pattern).

A plugin that keeps state for the length of a run (an open tracker run, a rule engine, the
answer of an earlier hook) stores it on the run's config instead of in a module-level
dictionary, so two runs in one process (tests, notebooks) never see each other's state and
nothing outlives its run::

    from fmtune.stash import StashKey

    ENGINE = StashKey["Engine"]()

    @hookimpl
    def on_train_begin(run):
        run.config.stash[ENGINE] = Engine(...)

    @hookimpl
    def on_step(run):
        engine = run.config.stash.get(ENGINE)     # None before on_train_begin

Keys are objects, not strings: two plugins cannot collide, and a key's type parameter
documents (and type-checks) what it holds.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar, cast

T = TypeVar("T")
D = TypeVar("D")

__all__ = ["Stash", "StashKey"]


class StashKey(Generic[T]):
    """A key for :class:`Stash`; create one per piece of state, at module level."""

    __slots__ = ()


class Stash:
    """A type-safe mapping from :class:`StashKey` objects to values, one per run."""

    __slots__ = ("_data",)

    def __init__(self) -> None:
        self._data: dict[StashKey[Any], object] = {}

    def __setitem__(self, key: StashKey[T], value: T) -> None:
        self._data[key] = value

    def __getitem__(self, key: StashKey[T]) -> T:
        return cast(T, self._data[key])

    def get(self, key: StashKey[T], default: D = None) -> T | D:  # type: ignore[assignment]
        try:
            return self[key]
        except KeyError:
            return default

    def setdefault(self, key: StashKey[T], default: T) -> T:
        try:
            return self[key]
        except KeyError:
            self[key] = default
            return default

    def pop(self, key: StashKey[T], default: D = None) -> T | D:  # type: ignore[assignment]
        return cast("T | D", self._data.pop(key, default))

    def __delitem__(self, key: StashKey[T]) -> None:
        del self._data[key]

    def __contains__(self, key: StashKey[T]) -> bool:
        return key in self._data

    def __len__(self) -> int:
        return len(self._data)
