"""Content-addressed caching of stage results, as a Prefect cache policy.

The key is: the stage module's source (its code version) + the digests of the input artifacts + the
settings (as canonical JSON) + the run folder. Prefect's default `INPUTS` policy would hash a path
string, not the file, so a changed file with the same name would hit; this policy hashes artifacts by
their content digest instead.

A hit must never hand back a record whose files are missing or changed. Prefect has no hook between
"record found" and "record returned", so `compute_key` itself reads the stored record, checks every
artifact in it against the disk, and deletes a stale record, which turns the lookup into a miss and
the stage recomputes (and stores a fresh record under the same key).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from tasks.core.artifacts import Artifact, tool_versions
from tasks.core.constants import PROJECT_ROOT
from tasks.core.hashing import canonical_json, content_digest
from tasks.core.settings import ContentKey, secret_fingerprint

log = logging.getLogger("loraship.cache")


def fingerprint(value: Any) -> Any:
    """A JSON-able stand-in for a task input that changes exactly when the input's content changes.

    A settings field marked with a `ContentKey` (a path setting: imatrix, card.template, eval samples...)
    adds the digest of what the path names (file content, or a checkout's commit) to its value.
    """
    if isinstance(value, Artifact):
        return {"artifact": value.name, "sha256": value.sha256}
    if isinstance(value, BaseModel):
        out = {}
        for k, info in type(value).model_fields.items():
            v = getattr(value, k)
            out[k] = fingerprint(v)
            marker = next((m for m in info.metadata if isinstance(m, ContentKey)), None)
            if marker is not None and v:
                out[k] = {"value": out[k], "content": marker.digest(v)}
        return out
    if isinstance(value, dict):
        return {str(k): fingerprint(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [fingerprint(v) for v in value]
        return sorted(items, key=canonical_json) if isinstance(value, (set, frozenset)) else items
    if hasattr(value, "root") and hasattr(value, "manifest_path"):  # RunFolder
        return {"run": str(value.root)}
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "get_secret_value"):
        return {"secret": secret_fingerprint(value)}  # a keyed digest: changes on rotation, reveals nothing
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return repr(value)


# Shared plumbing, not stage logic: a change here does not invalidate every cached result.
_NOT_STAGE_CODE = ("tasks.core", "tasks.support")


def _module_file(name: str) -> Path | None:
    """The source file of a project module, found on disk (no import: find_spec would import parents)."""
    base = PROJECT_ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _family_modules(module_name: str) -> list[str]:
    """Every module of the stage family (the `tasks.<family>` package) that holds `module_name`."""
    parts = module_name.split(".")
    root = PROJECT_ROOT / "tasks" / parts[1] if len(parts) >= 3 and parts[0] == "tasks" else None
    if root is None or not root.is_dir():
        return [module_name]
    names = []
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root).with_suffix("")
        names.append(".".join([*parts[:2], *[p for p in rel.parts if p != "__init__"]]))
    return names


def _project_imports(module_name: str) -> set[str]:
    """The stage's package and the project modules it imports (at any depth in its code), by AST.

    A stage is a package by concept (tasks/merge/, tasks/gguf/, ...): every module in it counts, so a
    helper run as a script (convert_entry) or reached only through a registry counts too. Modules of
    other packages count when imported. tasks.core and tasks.support are shared plumbing and are left out.
    """
    import ast

    found: set[str] = set()
    todo = _family_modules(module_name) if module_name.startswith("tasks.") else [module_name]
    while todo:
        name = todo.pop()
        if name in found:
            continue
        origin = _module_file(name)
        if origin is None:
            continue
        found.add(name)
        tree = ast.parse(origin.read_text())
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for t in targets:
                if t.startswith("tasks.") and not t.startswith(_NOT_STAGE_CODE):
                    todo.append(t)
    return found


_CODE_VERSION_LOCK = threading.Lock()


def module_code_version(module_name: str) -> str:
    """Digest of the stage module's source and of the project modules it imports.

    Mapped tasks compute their keys in several threads at once, and CPython 3.11's ast.parse is not
    safe to run concurrently ("AST constructor recursion depth mismatch"): one lock, one computation.
    """
    with _CODE_VERSION_LOCK:
        return _module_code_version(module_name)


@functools.cache
def _module_code_version(module_name: str) -> str:
    h = hashlib.sha256()
    for name in sorted(_project_imports(module_name)) or [module_name]:
        module = sys.modules.get(name)
        try:
            src = inspect.getsource(module) if module is not None else Path(importlib_origin(name)).read_text()
        except (OSError, TypeError):
            src = name
        h.update(name.encode() + b"\0" + src.encode())
    return h.hexdigest()[:16]


def importlib_origin(name: str) -> str:
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None or not spec.origin:
        raise OSError(name)
    return spec.origin


def artifacts_in(value: Any) -> list[Artifact]:
    """Every Artifact inside a task result (a record, a list of records, a model holding records)."""
    found: list[Artifact] = []
    if isinstance(value, Artifact):
        found.append(value)
    elif isinstance(value, BaseModel):
        for k in type(value).model_fields:
            found.extend(artifacts_in(getattr(value, k)))
    elif isinstance(value, dict):
        for v in value.values():
            found.extend(artifacts_in(v))
    elif isinstance(value, (list, tuple)):
        for v in value:
            found.extend(artifacts_in(v))
    return found


def _drop_if_stale(task_ctx: Any, key: str) -> None:
    store = getattr(task_ctx, "result_store", None)
    storage = getattr(store, "result_storage", None)
    basepath = getattr(storage, "basepath", None)
    if store is None or basepath is None:
        return
    record_path = Path(basepath).expanduser() / key
    if not record_path.exists():
        return
    try:
        from prefect.results import ResultRecord

        record = ResultRecord.deserialize(record_path.read_bytes())
        result = record.result
    except Exception as exc:  # unreadable record: recompute
        log.warning("cache record %s unreadable (%s); recomputing", record_path.name, exc)
        record_path.unlink(missing_ok=True)
        return
    for art in artifacts_in(result):
        problems = art.problems()
        if problems:
            log.warning("cached %s is no longer valid (%s); recomputing", art.name, "; ".join(problems[:3]))
            record_path.unlink(missing_ok=True)
            cache = getattr(store, "cache", None)
            if cache is not None:
                for k in list(cache.keys()):
                    if str(k).endswith(key):
                        cache.pop(k, None)
            return


# The tools whose version changes what a stage makes (llama.cpp comes with llama-cpp-python: one pinned
# vendored commit per version; a checkout named by convert.llama_cpp_dir is keyed by its commit through
# the setting, one named by $LLAMA_CPP_DIR below).
KEY_TOOLS = ("llama-cpp-python", "transformers", "peft", "torch", "gguf", "huggingface_hub")


def environment_key() -> dict[str, Any]:
    """The tool versions (and a $LLAMA_CPP_DIR checkout's commit) every stage's key includes."""
    out: dict[str, Any] = {"tools": tool_versions(*KEY_TOOLS)}
    env_dir = os.environ.get("LLAMA_CPP_DIR")
    if env_dir:
        out["LLAMA_CPP_DIR"] = ContentKey("git").digest(env_dir)
    return out


def key_files(fn: Any) -> dict[str, str]:
    """Digests of the files a stage renders or copies (its templates), declared with stage_task(key_files=...)."""
    return {str(p): content_digest(p) for p in getattr(fn, "__loraship_key_files__", ())}


def artifact_key(task_ctx: Any, inputs: dict[str, Any]) -> str | None:
    """Key = stage code version + input artifact digests + settings (path settings by content) + tool
    versions + the stage's template files; stale records are dropped.

    Parameters named `_x` are left out (thread counts, plan details, secrets), except that a secret among
    them (a SecretStr) adds its keyed fingerprint: a rotated token makes the stage that uses it run again.
    """
    if task_ctx is None:
        return None
    fn = task_ctx.task.fn
    items = sorted((inputs or {}).items())
    payload = {
        "stage": task_ctx.task.name,
        "code": module_code_version(fn.__module__),
        "inputs": {k: fingerprint(v) for k, v in items if not k.startswith("_")},
        "secrets": {k: fingerprint(v) for k, v in items if k.startswith("_") and hasattr(v, "get_secret_value")},
        "environment": environment_key(),
        "files": key_files(fn),
    }
    key = hashlib.sha256(canonical_json(payload).encode()).hexdigest()
    _drop_if_stale(task_ctx, key)
    return key


@functools.cache
def artifacts_policy() -> Any:
    """The Prefect cache policy keyed by `artifact_key`, made on first use: importing prefect takes ~2 s, which
    a process that only calls stages' plain functions (the fused converter, a benchmark) need not pay."""
    from prefect.cache_policies import CachePolicy

    class ArtifactCachePolicy(CachePolicy):
        def compute_key(
            self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any
        ) -> str | None:
            return artifact_key(task_ctx, inputs)

    return ArtifactCachePolicy()
