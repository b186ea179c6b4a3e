"""One table per extension point (merge backends, download sources, serve engines, ...).

A registry maps a name to an entry object that carries that `name`, in registration order (the order
help texts and errors list them in). Settings validate a configured name with `check` inside a pydantic
validator, so an unknown one fails config validation naming the field, the closest registered name and
all of them; stage code fetches the entry with `lookup`, which raises the same message as a
PermanentError for callers that bypass the config (tests, benchmarks, the Python API).

Modelled on mergekit's `merge_methods/registry.py`: a plain table built from a list, no import magic.

Every registry also says what its entries promise (a `Contract`: the class they subclass, the method that
does their work, the check that says why one cannot run here), and `EXTENSION_POINTS` lists the registries,
so one conformance test (tests/test_registries.py) checks every entry of every registry and a new registry
or entry gets those checks by being listed.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from tasks.core.errors import PermanentError


class Named(Protocol):
    name: str


T = TypeVar("T", bound=Named)

# Every registry of the project: the setting that names an entry -> "module:attribute" of its table. Imported
# only when asked (`extension_points()`): the tables live in the stage packages, which import tasks.core.
EXTENSION_POINTS: dict[str, str] = {
    "source.kind": "tasks.download.sources:SOURCES",
    "merge.backend": "tasks.merge.backends:MERGE_BACKENDS",
    "deployment.targets": "tasks.local.targets:LOCAL_TARGETS",
    "space.template": "tasks.publish.space_templates:SPACE_TEMPLATES",
    "serving.engine": "tasks.serve.engines:SERVE_ENGINES",
    "hub.repos": "tasks.publish.repos:HUB_REPOS",
    "task": "tasks.model_api.tasks_table:TASKS",  # the model API's DeployRequest.task, not a config section
}


@dataclass(frozen=True)
class Contract:
    """What every entry of one registry provides, said once so one test can check all registries alike.

    `base`: the class every entry is an instance of (its docstring is the contract's documentation; a
    Protocol must be runtime_checkable); `run`: the name of the callable that does the entry's work (a merge
    backend's `run`, a source's `fetch`); `unavailable`: called with an entry, why it cannot run on this
    machine now (a missing package, no GPU, no CLI), or None when it can. Cheap and side-effect free: stages
    call it before any work. `describe`: the entry's one-line description (for help texts and errors).
    """

    base: type
    run: str
    unavailable: Callable[[Any], str | None]
    describe: Callable[[Any], str] = lambda entry: entry.description


class Registry(Mapping[str, T], Generic[T]):
    """Entries by name. `what` is how errors call an entry ("merge backend"), `field` the setting that names
    one ("merge.backend"), `contract` what every entry provides (None only for ad-hoc tables in tests)."""

    def __init__(self, what: str, field: str, entries: Iterable[T] = (), contract: Contract | None = None) -> None:
        self.what = what
        self.field = field
        self.contract = contract
        self._entries: dict[str, T] = {}
        for entry in entries:
            self.register(entry)

    def register(self, entry: T) -> T:
        """Add `entry` under its name; a second entry with the same name is a programming error."""
        if not entry.name or entry.name in self._entries:
            raise ValueError(f"{self.what} {entry.name!r}: the name is empty or already registered")
        if self.contract is not None and not isinstance(entry, self.contract.base):
            raise TypeError(f"{self.what} {entry.name!r} is not a {self.contract.base.__name__}")
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


def extension_points() -> dict[str, Registry[Any]]:
    """Every registry in `EXTENSION_POINTS`, by the setting that names its entries (imports their packages)."""
    out: dict[str, Registry[Any]] = {}
    for field, ref in EXTENSION_POINTS.items():
        module, _, attr = ref.partition(":")
        out[field] = getattr(importlib.import_module(module), attr)
    return out
