"""Registries: how the core finds the plugins without listing them.

One style for every kind of plugin (tasks, sample worlds, prep sources, evaluations): a plugin
registers itself when its module is imported, and a registry imports the modules that hold its
plugins the first time it is asked (``discover``): the task packages under ``nemo_ext/tasks/`` for
tasks, worlds and evaluations (a task's whole story is its folder), the ``cosmos_recipes.prep_sources``
entry points (pyproject.toml) for the converters in ``data_prep/``. No core file names a plugin.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import Callable, Dict, Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Named plugins of one kind."""

    def __init__(self, kind: str, discover: Callable[[], None]):
        self.kind = kind
        self._discover = discover
        self._items: Dict[str, T] = {}
        self._discovered = False

    def register(self, name: str, item: T) -> T:
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._items[name] = item
        return item

    def _ensure(self) -> None:
        if not self._discovered:
            self._discovered = True
            self._discover()

    def get(self, name: str) -> T:
        self._ensure()
        if name not in self._items:
            raise KeyError(f"unknown {self.kind} {name!r}; registered: {', '.join(sorted(self._items)) or 'none'}")
        return self._items[name]

    def __contains__(self, name: str) -> bool:
        self._ensure()
        return name in self._items

    def names(self) -> list[str]:
        self._ensure()
        return sorted(self._items)

    def values(self) -> list[T]:
        return [self._items[n] for n in self.names()]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def import_task_packages() -> None:
    """Import every task package (``nemo_ext.tasks.<task>``): each registers its task, its sample
    world and its evaluation."""
    importlib.import_module("nemo_ext.tasks")


def load_entry_points(group: str) -> Callable[[], None]:
    """A ``discover`` that imports the modules of an entry-point group (each registers itself)."""

    def discover() -> None:
        for ep in importlib.metadata.entry_points(group=group):
            ep.load()

    return discover
