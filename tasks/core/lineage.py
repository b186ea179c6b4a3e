"""Lineage: which artifacts belong to this run's line of descent, and why the others left it.

An artifact is current when the stage that made it ran in this run, or (its stage not run: `--only`,
`--from`, `--skip`, a stage disabled in the config) when its manifest record is intact on disk, every input
it records is the current artifact of that name with the same digest, and its stage still wants it under
the current config (a quantization whose type is still in `quantization.types`, ...). Everything else is
superseded: it stays in the manifest's `superseded` section with the reason, and no stage receives it, so it
is never published, linked, served, evaluated or split.

The digest comparison is transitive by construction: the flow settles stages in dependency order and only
adds current artifacts to the lineage, so a quantization of an F16 made from an older merged model finds
an F16 digest that is not current and is dropped with it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tasks.core.artifacts import Artifact

# A stage's judgement of one of its old artifacts under the current config and lineage: None keeps it, a
# string is the reason it is no longer wanted (e.g. "quantization.types no longer lists Q5_K_M").
Wanted = Callable[[Artifact, Any, "Lineage"], "str | None"]


@dataclass
class Lineage:
    """The current artifacts of a run (name -> record), built up stage by stage as the flow settles them."""

    artifacts: dict[str, Artifact] = field(default_factory=dict)
    # names deleted on purpose by pipeline.cleanup (the manifest's `removed`: name -> sha256): they still
    # count as current inputs of what was made from them when the stage that made them does not run
    removed: dict[str, str] = field(default_factory=dict)
    superseded: dict[str, str] = field(default_factory=dict)  # name -> why it left the lineage

    def digest(self, name: str) -> str | None:
        a = self.artifacts.get(name)
        return a.sha256 if a is not None else self.removed.get(name)

    def adopt(self, made: Iterable[Artifact]) -> None:
        """Artifacts a stage made in this run: current by definition (they replace any older record)."""
        for a in made:
            self.artifacts[a.name] = a
            self.superseded.pop(a.name, None)
            self.removed.pop(a.name, None)

    def why_not_current(
        self, a: Artifact, config: Any = None, wanted: Wanted | None = None, own_inputs: Iterable[str] = ()
    ) -> str | None:
        """None when the recorded artifact `a` still belongs to the lineage; else the reason it does not.

        `own_inputs` are recorded inputs that are not artifacts (merge's `base` fingerprint): `wanted`
        judges those itself."""
        problems = a.problems()
        if problems:
            return "; ".join(problems[:2])
        skip = set(own_inputs)
        for name, sha in sorted(a.inputs.items()):
            if name in skip:
                continue
            now = self.digest(name)
            if now is None:
                return f"made from {name} ({sha[:12]}), which is not part of this run"
            if now != sha:
                return f"made from {name} {sha[:12]}, the current {name} is {now[:12]}"
        if wanted is not None:
            return wanted(a, config, self)
        return None

    def carry(
        self,
        stage: str,
        records: Mapping[str, Artifact],
        config: Any = None,
        wanted: Wanted | None = None,
        own_inputs: Iterable[str] = (),
    ) -> tuple[list[Artifact], dict[str, str]]:
        """The recorded artifacts of `stage` (a stage not run this time) that are still current: adopted
        into the lineage and returned, with {name: reason} for the ones that are not."""
        kept: list[Artifact] = []
        dropped: dict[str, str] = {}
        for name, a in sorted(records.items()):
            if a.stage != stage:
                continue
            reason = self.why_not_current(a, config, wanted, own_inputs)
            if reason is None:
                kept.append(a)
            else:
                dropped[name] = reason
        self.adopt(kept)
        self.superseded.update(dropped)
        return kept, dropped
