"""`pipeline.cleanup`: delete an intermediate (merged/, the F16 GGUF) once what is made from it exists.

One rule, used where the disk is freed: right after the stage that consumed the intermediate (convert
drops merged/ as soon as the F16 is written, quantize the F16 as soon as its quantizations are), and once
more at the end of the run over the whole lineage (what a cached or partial run left). An intermediate
goes only when at least one of its products exists and every one of them is intact; the manifest keeps
its record (digests), so provenance stays traceable.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tasks.core.artifacts import Artifact
from tasks.core.vocab import ArtifactKind
from tasks.gguf import quant_types

if TYPE_CHECKING:
    from flows.config import PipelineConfig

log = logging.getLogger("loraship.cleanup")


def _quant(a: Artifact) -> str:
    return str(a.meta.get("quant") or a.name.partition(":")[2])


def _is_float_gguf(a: Artifact) -> bool:
    return a.kind == ArtifactKind.GGUF and quant_types.is_float(_quant(a))


def _is_quantized_gguf(a: Artifact) -> bool:
    return a.kind == ArtifactKind.GGUF and not quant_types.is_float(_quant(a))


@dataclass(frozen=True)
class Intermediate:
    """Something `pipeline.cleanup.<setting>` deletes, and what must exist first."""

    setting: str  # the CleanupSettings flag
    is_it: Callable[[Artifact], bool]
    is_product: Callable[[Artifact], bool]  # made from it: all of these intact, at least one


INTERMEDIATES = (
    Intermediate("delete_merged", lambda a: a.kind == ArtifactKind.MERGED, lambda a: a.kind == ArtifactKind.GGUF),
    Intermediate("delete_f16", _is_float_gguf, _is_quantized_gguf),
)


def removable(cfg: PipelineConfig, artifacts: Iterable[Artifact]) -> list[tuple[Artifact, str]]:
    """(artifact, the setting that deletes it) for every intermediate among `artifacts` that may go now."""
    arts = list(artifacts)
    out: list[tuple[Artifact, str]] = []
    for rule in INTERMEDIATES:
        if not getattr(cfg.pipeline.cleanup, rule.setting):
            continue
        products = [a for a in arts if rule.is_product(a)]
        if products and all(p.is_intact() for p in products):
            out += [(a, rule.setting) for a in arts if rule.is_it(a)]
    return out


def remove_intermediates(cfg: PipelineConfig, artifacts: Iterable[Artifact]) -> list[tuple[Artifact, str]]:
    """Delete what `removable` names; returns (artifact, setting) for each one whose files were removed."""
    removed = []
    for art, setting in removable(cfg, artifacts):
        if _remove(Path(art.path)):
            log.info("cleanup: removed %s (pipeline.cleanup.%s)", art.path, setting)
            removed.append((art, setting))
    return removed


def cleanup_intermediates(cfg: PipelineConfig, artifacts: dict[str, Artifact]) -> list[str]:
    """The end-of-run pass over the lineage's artifacts; returns the paths removed."""
    return [str(art.path) for art, _ in remove_intermediates(cfg, artifacts.values())]


def _remove(path: Path) -> bool:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    else:
        return False
    return True
