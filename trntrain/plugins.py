"""Name -> class registries that third-party packages extend through entry points."""

from __future__ import annotations

from collections.abc import Callable, Iterator, MutableMapping
from importlib.metadata import entry_points
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(MutableMapping[str, T], Generic[T]):
    """Built-in plugins by name, plus those of the entry point group `group`, loaded once."""

    def __init__(self, group: str) -> None:
        self.group = group
        self._items: dict[str, T] = {}
        self._loaded_entry_points = False

    def register(self, name: str) -> Callable[[T], T]:
        def add(item: T) -> T:
            self._items[name] = item
            return item

        return add

    def _load_entry_points(self) -> None:
        if self._loaded_entry_points:
            return
        self._loaded_entry_points = True
        for ep in entry_points(group=self.group):
            self._items.setdefault(ep.name, ep.load())

    def __getitem__(self, name: str) -> T:
        if name not in self._items:
            self._load_entry_points()
        return self._items[name]

    def __contains__(self, name: object) -> bool:
        if name not in self._items:
            self._load_entry_points()
        return name in self._items

    def __setitem__(self, name: str, item: T) -> None:
        self._items[name] = item

    def __delitem__(self, name: str) -> None:
        del self._items[name]

    def __iter__(self) -> Iterator[str]:
        self._load_entry_points()
        return iter(self._items)

    def __len__(self) -> int:
        self._load_entry_points()
        return len(self._items)
