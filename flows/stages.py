"""The stage table: one row per stage, and everything the flow knows about stages derives from it.

A row says what a stage is called (`Stage`), which section of deployment_config.yaml it owns and that
section's Settings model, the artifact kinds it takes and makes, the stages it needs (hard: it runs after
them, and is skipped when one of them fails or is skipped because of a failure) and uses (soft: it runs
after them when they run and takes what they made, but does not need them), whether it is critical (its
failure always fails the run) or heavy (it holds a slot of the global concurrency limit), how its results
are cached, and the runner that feeds it (flows/runners.py).

`STAGES` (table order: a topological order of the graph), `CRITICAL_STAGES`, `HEAVY_STAGES`, `RUNNERS`,
`SECTION_OWNERS` and the config schema (flows/config.py) are built from `TABLE`. Adding a stage is a
`Stage` member (tasks/core/vocab.py), one row here and its module under tasks/; tests/test_stages.py checks
every row (settings documented, kinds made by an upstream, the README's stage graph in sync).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from flows import runners
from tasks.chat.stage import TemplateContractSettings
from tasks.core.lineage import Wanted
from tasks.core.vocab import ArtifactKind, Stage
from tasks.download.settings import DownloadSettings
from tasks.evaluate.evaluation import EvalSettings
from tasks.evaluate.health import HealthSettings
from tasks.gguf.convert import ConvertSettings
from tasks.gguf.quantize import QuantizeSettings
from tasks.local.stage import LocalDeploySettings
from tasks.merge.stage import MergeSettings
from tasks.publish.card import CardSettings
from tasks.publish.hub_push import HubSettings
from tasks.publish.space import SpaceSettings
from tasks.serve.stage import ServeSettings

if TYPE_CHECKING:
    from flows.context import RunContext
    from tasks.core.artifacts import Artifact

K = ArtifactKind


class Caching(StrEnum):
    """How a stage's results are reused across runs."""

    CONTENT = "content"  # Prefect result cache keyed by code version + input digests + settings (tasks/core/caching)
    NONE = "none"  # always runs: its own comparison is the cache (download compares digests with the source)
    REMOTE = "remote"  # always runs and compares with the remote it publishes to; a record about a remote is no proof


@dataclass(frozen=True)
class StageSpec:
    """One stage of the pipeline, as the flow, the config schema and the docs see it."""

    name: Stage
    section: str | None  # its section of deployment_config.yaml (None: settings live in a pipeline-wide section)
    settings: type[BaseModel] | None  # that section's model (owned by the stage's module)
    runner: Callable[[RunContext], list[Artifact]]  # flows/runners.py: wiring from the run to the stage's task
    summary: str  # one line for the README's stage table and `--help`
    takes: tuple[ArtifactKind, ...] = ()
    makes: tuple[ArtifactKind, ...] = ()
    needs: tuple[Stage, ...] = ()  # hard upstreams
    uses: tuple[Stage, ...] = ()  # soft upstreams: waited for and read when they run, not required
    critical: bool = False
    heavy: bool = False
    cache: Caching = Caching.CONTENT
    required: bool = False  # the config must have this section (download's `source`: there is no default source)
    # Which of `uses` this config needs (None: all). The release gate waits for health and evaluate only
    # when it checks them, so with the gate off publishing does not wait for the health check.
    wants: Callable[[Any], tuple[Stage, ...]] | None = None
    # Whether a recorded artifact of this stage is still wanted under the current config, when the stage
    # does not run (tasks/core/lineage.py): None keeps it, a string says why not. `keep_inputs` are recorded
    # inputs that are not artifacts (merge's base fingerprint), judged by `keep` itself.
    keep: Wanted | None = None
    keep_inputs: tuple[str, ...] = ()
    implied: bool = False  # runs whenever one of its dependants runs (the release gate); cannot be skipped

    @property
    def upstream(self) -> tuple[Stage, ...]:
        return self.needs + tuple(s for s in self.uses if s not in self.needs)

    def upstream_for(self, config: Any) -> tuple[Stage, ...]:
        """The stages this one waits for under `config`: its needs and the uses the config asks for."""
        if self.wants is None:
            return self.upstream
        wanted = set(self.wants(config))
        return self.needs + tuple(s for s in self.uses if s in wanted and s not in self.needs)

    @property
    def owner(self) -> str:
        """The file that defines the section's Settings model (for the config reference)."""
        return (self.settings.__module__.replace(".", "/") + ".py") if self.settings else "flows/config.py"


TABLE: tuple[StageSpec, ...] = (
    StageSpec(
        Stage.DOWNLOAD,
        "source",
        DownloadSettings,
        runners.run_download,
        "the adapter and training metadata from the training box (rsync/SFTP) or a local folder, sha256-verified",
        makes=(K.ADAPTER,),
        critical=True,
        cache=Caching.NONE,
        required=True,
    ),
    StageSpec(
        Stage.MERGE,
        "merge",
        MergeSettings,
        runners.run_merge,
        "the LoRA folded into the base model (streaming, peft or unsloth), verified against peft",
        takes=(K.ADAPTER,),
        makes=(K.MERGED,),
        needs=(Stage.DOWNLOAD,),
        critical=True,
        heavy=True,
        keep=runners.keep_merged,
        keep_inputs=("base",),
    ),
    StageSpec(
        Stage.CONVERT,
        "convert",
        ConvertSettings,
        runners.run_convert,
        "merged/ to <model>-F16.gguf with llama.cpp's converter (merge.fused_convert: from the base + "
        "adapter in one pass, or the GGUF the merge stage wrote beside merged/ reused); the adapter as a GGUF LoRA",
        takes=(K.MERGED, K.ADAPTER),
        makes=(K.GGUF, K.GGUF_LORA),
        needs=(Stage.MERGE,),
        critical=True,
        keep=runners.keep_converted,
    ),
    StageSpec(
        Stage.QUANTIZE,
        "quantization",
        QuantizeSettings,
        runners.run_quantize,
        "the F16 into each of quantization.types in parallel (and llama.cpp shards above split_max_size)",
        takes=(K.GGUF,),
        makes=(K.GGUF, K.GGUF_SPLIT),
        needs=(Stage.CONVERT,),
        critical=True,
        heavy=True,
        keep=runners.keep_quantized,
    ),
    StageSpec(
        Stage.SERVE,
        "serving",
        ServeSettings,
        runners.run_serve,
        "an OpenAI-compatible llama.cpp server for the chosen quant(s) on a free port",
        takes=(K.GGUF,),
        makes=(K.SERVICE,),
        needs=(Stage.QUANTIZE,),
        cache=Caching.NONE,
        keep=runners.keep_served,
    ),
    StageSpec(
        Stage.HEALTH,
        "health_check",
        HealthSettings,
        runners.run_health,
        "the served model (or any OpenAI-compatible URL) checked: file, API, answers, system",
        takes=(K.SERVICE, K.GGUF),
        makes=(K.REPORT,),
        needs=(Stage.SERVE,),
        cache=Caching.NONE,
    ),
    StageSpec(
        Stage.EVALUATE,
        "evaluation",
        EvalSettings,
        runners.run_evaluate,
        "each GGUF against the F16: perplexity, KL-divergence, top-1 agreement, accuracy, speed; a speech "
        "model's merged weights: word error rate on recordings",
        takes=(K.GGUF, K.MERGED),
        makes=(K.REPORT,),
        needs=(Stage.QUANTIZE,),
    ),
    StageSpec(
        Stage.GATE,
        None,  # settings: pipeline.gate, pipeline.approval
        None,
        runners.run_gate,
        "which quantizations ship (pipeline.gate: health, KL and perplexity limits; pipeline.approval: a person)",
        takes=(K.GGUF, K.REPORT),
        makes=(K.REPORT,),
        needs=(Stage.QUANTIZE,),
        uses=(Stage.HEALTH, Stage.EVALUATE),
        cache=Caching.NONE,
        wants=runners.gate_evidence,
        implied=True,
    ),
    StageSpec(
        Stage.LOCAL_DEPLOY,
        "deployment",
        LocalDeploySettings,
        runners.run_local_deploy,
        "the GGUFs linked into LM Studio's models folder, an Ollama Modelfile (and `ollama create`)",
        takes=(K.GGUF,),
        makes=(K.PUBLISH,),
        needs=(Stage.GATE,),
        cache=Caching.NONE,
    ),
    StageSpec(
        Stage.TEMPLATE_CONTRACT,
        "template_contract",
        TemplateContractSettings,
        runners.run_template_contract,
        "fixed conversations give the same tokens in transformers, llama.cpp, Ollama (Go) and LM Studio; stops agree",
        takes=(K.GGUF, K.MERGED, K.PUBLISH, K.SERVICE),
        makes=(K.REPORT,),
        needs=(Stage.CONVERT, Stage.LOCAL_DEPLOY),
        uses=(Stage.SERVE,),
    ),
    StageSpec(
        Stage.HUB_PUSH,
        "hub",
        HubSettings,
        runners.run_hub_push,
        "each repo of hub.repos (merged, GGUF, LoRA) with its card and metadata in one commit (only what differs)",
        takes=(K.GGUF, K.GGUF_SPLIT, K.ADAPTER, K.MERGED, K.REPORT),
        makes=(K.PUBLISH,),
        needs=(Stage.GATE,),
        uses=(Stage.EVALUATE, Stage.TEMPLATE_CONTRACT),
        cache=Caching.REMOTE,
    ),
    StageSpec(
        Stage.SPACE,
        "space",
        SpaceSettings,
        runners.run_space,
        "a Gradio demo Space from a registered template (GGUF chat, transformers chat, ASR), with its variables, "
        "secret and hardware",
        takes=(K.PUBLISH, K.GGUF, K.MERGED),
        makes=(K.PUBLISH,),
        needs=(Stage.HUB_PUSH,),
        cache=Caching.REMOTE,
    ),
    StageSpec(
        Stage.CARD,
        "card",
        CardSettings,
        runners.run_card,
        "each repo's card (quants, training, eval, model-index, links, the Space embed) kept in sync on the Hub",
        takes=(K.GGUF, K.GGUF_SPLIT, K.ADAPTER, K.REPORT, K.PUBLISH),
        makes=(K.REPORT,),
        needs=(Stage.GATE,),
        uses=(Stage.EVALUATE, Stage.TEMPLATE_CONTRACT, Stage.HUB_PUSH, Stage.SPACE),
        cache=Caching.REMOTE,
    ),
)

SPECS: dict[Stage, StageSpec] = {s.name: s for s in TABLE}
STAGES: tuple[Stage, ...] = tuple(s.name for s in TABLE)
CRITICAL_STAGES: frozenset[Stage] = frozenset(s.name for s in TABLE if s.critical)
HEAVY_STAGES: frozenset[Stage] = frozenset(s.name for s in TABLE if s.heavy)
# The runner of each stage. A dict on purpose: tests replace one entry to stand in for a broken stage.
RUNNERS: dict[Stage, Callable[[RunContext], list[Artifact]]] = {s.name: s.runner for s in TABLE}
SECTION_OWNERS: dict[str, str] = {s.section: s.owner for s in TABLE if s.section}


def ancestors(stage: Stage, table: Iterable[StageSpec] = TABLE, config: Any = None, hard: bool = False) -> set[Stage]:
    """Every stage `stage` depends on, directly or not: through needs and uses (those `config` wants, when
    given), or through needs alone (`hard`)."""
    specs = {s.name: s for s in table}

    def up(s: Stage) -> tuple[Stage, ...]:
        spec = specs[s]
        return spec.needs if hard else spec.upstream_for(config) if config is not None else spec.upstream

    seen: set[Stage] = set()
    todo = list(up(stage))
    while todo:
        s = todo.pop()
        if s not in seen:
            seen.add(s)
            todo.extend(up(s))
    return seen


def descendants(stage: Stage, table: Iterable[StageSpec] = TABLE) -> set[Stage]:
    """Every stage that depends on `stage`, directly or not."""
    return {s.name for s in table if stage in ancestors(s.name, table)}


def check_table(table: tuple[StageSpec, ...] = TABLE) -> None:
    """The table is a DAG in topological order, names and sections are unique, and every kind a stage
    takes is made by one of its upstream stages. Raises ValueError naming the row."""
    seen: set[Stage] = set()
    sections: set[str] = set()
    for spec in table:
        if spec.name in seen:
            raise ValueError(f"stage table: {spec.name} appears twice")
        if spec.section and spec.section in sections:
            raise ValueError(f"stage table: section '{spec.section}' of {spec.name} is owned by another stage")
        for up in spec.upstream:
            if up not in seen:
                raise ValueError(f"stage table: {spec.name} depends on {up}, which is not an earlier row")
        for up in spec.uses:
            if any(up in ancestors(n, table, hard=True) | {n} for n in spec.needs):
                raise ValueError(f"stage table: {spec.name} uses {up}, which it already depends on through needs")
        specs = {s.name: s for s in table}
        made_upstream = {k for a in ancestors(spec.name, table) for k in specs[a].makes}
        for kind in spec.takes:
            if kind not in made_upstream:
                raise ValueError(f"stage table: {spec.name} takes '{kind}', which none of its upstream stages makes")
        seen.add(spec.name)
        if spec.section:
            sections.add(spec.section)


check_table()


def mermaid(table: tuple[StageSpec, ...] = TABLE) -> str:
    """The stage graph as a mermaid flowchart (the README's drawing; tests/test_stages.py keeps it in sync).

    A solid arrow is a hard dependency (`needs`), a dotted one a soft one (`uses`); critical stages are
    drawn with double borders, heavy ones are marked."""
    lines = ["flowchart LR"]
    for s in table:
        label = f"{s.name}" + (" (heavy)" if s.heavy else "")
        lines.append(f'    {s.name}[["{label}"]]' if s.critical else f'    {s.name}("{label}")')
    for s in table:
        lines += [f"    {up} --> {s.name}" for up in s.needs]
        lines += [f"    {up} -.-> {s.name}" for up in s.uses if up not in s.needs]
    return "\n".join(lines)


def stage_table_markdown(table: tuple[StageSpec, ...] = TABLE) -> str:
    """The stage table as the README shows it (kept in sync by tests/test_stages.py)."""
    rows = [
        "| stage | section | takes | makes | needs | uses | critical | heavy | cache |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def cell(items: Iterable[str]) -> str:
        return ", ".join(f"`{i}`" for i in items) or "-"

    for s in table:
        section = f"`{s.section}`" if s.section else "(`pipeline`)"
        rows.append(
            f"| `{s.name}` | {section} | {cell(s.takes)} | {cell(s.makes)} | {cell(s.needs)} | {cell(s.uses)} "
            f"| {'yes' if s.critical else '-'} | {'yes' if s.heavy else '-'} | {s.cache} |"
        )
    return "\n".join(rows)
