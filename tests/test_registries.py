"""One conformance test over every entry of every registry (tasks/core/registry.py `EXTENSION_POINTS`).

Each registry declares a `Contract` (the base class, the method that does the work, the check that says
why an entry cannot run here); these tests hold every entry to it, check that config validation reads the
registry (an unknown name fails naming the setting and every registered name), and that no registry in
tasks/ is missing from the index, so a new registry or a new entry is checked by being listed.
The registry-specific behaviour (a real merge, a real fetch, a real deploy) stays in each registry's own
tests (tests/test_merge_backends.py, tests/test_download_sources.py, tests/test_local_targets.py).
"""

from __future__ import annotations

import ast
import inspect
import re
import typing
from pathlib import Path

import pytest

from flows.config import PipelineConfig, parse_config
from tasks.core.errors import ConfigError, PermanentError
from tasks.core.registry import EXTENSION_POINTS, Registry, extension_points

ROOT = Path(__file__).resolve().parents[1]
REGISTRIES = extension_points()
ENTRIES = [(field, name) for field, registry in REGISTRIES.items() for name in registry]
MINIMAL = {"model": {"name": "m"}, "source": {"kind": "local", "path": "/tmp/adapter"}}


def _module_level_registries() -> set[str]:
    """ "module:NAME" of every module-level `NAME = Registry(...)` under tasks/ (read from the source)."""
    found = set()
    for path in (ROOT / "tasks").rglob("*.py"):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Assign | ast.AnnAssign) and isinstance(node.value, ast.Call):
                func = node.value.func
                if isinstance(func, ast.Name) and func.id == "Registry":
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                    found |= {f"{module}:{t.id}" for t in targets if isinstance(t, ast.Name)}
    return found


def test_every_registry_is_in_the_index():
    assert _module_level_registries() == set(EXTENSION_POINTS.values()), "list each registry in EXTENSION_POINTS"
    for field, registry in REGISTRIES.items():
        assert isinstance(registry, Registry) and registry.field == field and len(registry) > 0
        assert registry.contract is not None, f"{field}: give the registry a Contract"


@pytest.mark.parametrize("field,name", ENTRIES, ids=[f"{f}={n}" for f, n in ENTRIES])
def test_entry_keeps_its_contract(field, name):
    registry = REGISTRIES[field]
    contract = registry.contract
    entry = registry[name]
    assert isinstance(entry, contract.base) and entry.name == name
    assert re.fullmatch(r"[a-z][a-z0-9_-]*", name), "names are lower-case words (they are written in YAML and URLs)"
    description = contract.describe(entry)
    assert description.strip() and "\n" not in description and len(description) <= 120, "one-line description"
    run = getattr(entry, contract.run, None)
    assert callable(run) and not getattr(run, "__isabstractmethod__", False), f"{name} implements {contract.run}"
    declared = inspect.getattr_static(contract.base, contract.run, None)
    if type(entry) is not contract.base and inspect.isfunction(declared):  # a subclass: its own, not the base's
        assert inspect.getattr_static(type(entry), contract.run) is not declared, f"{name} overrides {contract.run}"
    reason = contract.unavailable(entry)
    assert reason is None or (isinstance(reason, str) and reason.strip()), "None, or the reason it cannot run"
    readme = (ROOT / "README.md").read_text()
    assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", readme), f"the README documents {field}: {name}"


def _takes_a_list(field: str) -> bool:
    """Whether the setting `field` ("deployment.targets") holds a list of names rather than one name."""
    section, key = field.split(".")
    settings = PipelineConfig.model_fields[section].annotation
    model = next(a for a in (settings, *typing.get_args(settings)) if hasattr(a, "model_fields"))
    annotation = model.model_fields[key].annotation
    return typing.get_origin(annotation) is list


CONFIG_FIELDS = [f for f in REGISTRIES if f.partition(".")[0] in PipelineConfig.model_fields]


@pytest.mark.parametrize("field", list(REGISTRIES))
def test_lookup_of_an_unknown_name_names_the_setting_and_lists_the_registered_ones(field):
    registry = REGISTRIES[field]
    with pytest.raises(PermanentError) as err:
        registry.lookup(registry.names()[0] + "x")
    text = str(err.value)
    assert text.startswith(f"{field}: unknown {registry.what}") and field in err.value.hint
    assert f"did you mean {registry.names()[0]!r}" in text and f"registered: {', '.join(registry.names())}" in text


@pytest.mark.parametrize("field", CONFIG_FIELDS)
def test_config_validation_lists_the_registered_names(field):
    registry = REGISTRIES[field]
    section, key = field.split(".")
    first = registry.names()[0]
    bad = first + "x"  # close to a registered name: the message suggests it
    value = [bad] if _takes_a_list(field) else bad
    with pytest.raises(ConfigError) as err:
        parse_config({**MINIMAL, section: {**MINIMAL.get(section, {}), key: value}})
    text = str(err.value)
    assert field in text and f"unknown {registry.what} {bad!r}" in text and f"did you mean {first!r}" in text
    assert f"registered: {', '.join(registry.names())}" in text


def test_a_registry_refuses_an_entry_that_breaks_its_contract():
    field = next(iter(REGISTRIES))
    registry = REGISTRIES[field]

    class Stranger:
        name = "stranger"

    copy = Registry(registry.what, field, list(registry.values()), contract=registry.contract)
    with pytest.raises(TypeError, match=f"is not a {registry.contract.base.__name__}"):
        copy.register(Stranger())
    with pytest.raises(ValueError, match="already registered"):
        copy.register(next(iter(registry.values())))
