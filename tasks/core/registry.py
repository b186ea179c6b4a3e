"""One table per extension point (merge backends, download sources, serve engines, ...).

A registry maps a name to an entry object that carries that `name`, in registration order (the order
help texts and errors list them in). Settings validate a configured name with `check` inside a pydantic
validator, so an unknown one fails config validation naming the field, the closest registered name and
all of them; stage code fetches the entry with `lookup`, which raises the same message as a
PermanentError for callers that bypass the config (tests, benchmarks, the Python API).

Modelled on mergekit's `merge_methods/registry.py`: a plain table built from a list, no import magic.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator, Mapping
from typing import Generic, Protocol, TypeVar

from tasks.core.errors import PermanentError


class Named(Protocol):
    name: str


T = TypeVar("T", bound=Named)


class Registry(Mapping[str, T], Generic[T]):
    """Entries by name. `what` is how errors call an entry ("merge backend"), `field` the setting that names
    one ("merge.backend")."""

    def __init__(self, what: str, field: str, entries: Iterable[T] = ()) -> None:
        self.what = what
        self.field = field
        self._entries: dict[str, T] = {}
        for entry in entries:
            self.register(entry)

    def register(self, entry: T) -> T:
        """Add `entry` under its name; a second entry with the same name is a programming error."""
        if not entry.name or entry.name in self._entries:
            raise ValueError(f"{self.what} {entry.name!r}: the name is empty or already registered")
        self._entries[entry.name] = entry
        return entry

    def __getitem__(self, name: str) -> T:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def unknown(self, name: str) -> str:
        """The message for a name that is not registered."""
        close = difflib.get_close_matches(str(name), self.names(), n=1, cutoff=0.6)
        suggestion = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown {self.what} {name!r}{suggestion}; registered: {', '.join(self.names())}"

    def check(self, name: str) -> str:
        """For a pydantic field validator: `name` when registered, else a ValueError that lists the names."""
        if name not in self._entries:
            raise ValueError(self.unknown(name))
        return name

    def lookup(self, name: str) -> T:
        """The entry for `name`; an unknown name is a PermanentError naming the setting and the registered names."""
        if name not in self._entries:
            raise PermanentError(f"{self.field}: {self.unknown(name)}", hint=f"set {self.field} to a registered name")
        return self._entries[name]
