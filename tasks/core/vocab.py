"""The pipeline's vocabulary: stage names, stage statuses, artifact kinds and health verdicts, written once.

They are `str` enums, so a member compares equal to its text (`Stage.MERGE == "merge"`), formats as its
text in messages (`f"{Stage.MERGE}"` is `merge`) and lands in manifest.json and loraship.json as plain
JSON strings: the files stay readable and older manifests still load. Code asks these enums (and the stage
table in flows/stages.py, keyed by `Stage`) instead of spelling the strings.

Adding a stage: a member here, a row in flows/stages.py, and its module under tasks/.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum


class Stage(StrEnum):
    """Every stage of the pipeline. Their order and dependencies are the stage table's (flows/stages.py)."""

    DOWNLOAD = "download"
    MERGE = "merge"
    CONVERT = "convert"
    QUANTIZE = "quantize"
    SERVE = "serve"
    HEALTH = "health"
    EVALUATE = "evaluate"
    GATE = "gate"
    LOCAL_DEPLOY = "local_deploy"
    TEMPLATE_CONTRACT = "template_contract"
    HUB_PUSH = "hub_push"
    CARD = "card"
    SPACE = "space"


class StageStatus(StrEnum):
    """What happened to a stage in a run (manifest.json `stages.<name>.status`, the run summary)."""

    DONE = "done"  # ran and made its artifacts
    CACHED = "cached"  # every task of the stage was answered from the content cache
    DRY_RUN = "dry-run"  # a publishing/installing stage wrote what it would send and sent nothing
    SKIPPED = "skipped"  # not run, with the reason (nothing to do, or an upstream stage failed or was skipped)
    FAILED = "failed"  # raised; the run failed (a critical stage, or continue_on_error is off)
    DEGRADED = "degraded"  # a non-critical stage raised and pipeline.continue_on_error let the run go on
    SUPERSEDED = "superseded"  # not run this time, and what it made earlier left the current lineage

    @property
    def ok(self) -> bool:
        """Whether dependants may use what the stage made (done, cached or dry-run)."""
        return self in (StageStatus.DONE, StageStatus.CACHED, StageStatus.DRY_RUN)


class ArtifactKind(StrEnum):
    """What an artifact is (`Artifact.kind`); a stage declares the kinds it takes and makes."""

    ADAPTER = "adapter"  # the LoRA adapter folder (download)
    MERGED = "merged"  # the merged HF safetensors folder (merge)
    GGUF = "gguf"  # one GGUF model file: the converted F16 and each quantization
    GGUF_LORA = "gguf-lora"  # the adapter alone as a GGUF LoRA (convert.lora_adapter)
    GGUF_SPLIT = "gguf-split"  # a folder of llama.cpp shards of one GGUF (quantization.split_max_size)
    REPORT = "report"  # a report the run wrote: health, eval, the model card, the release gate
    PUBLISH = "publish"  # a record of what was published or installed (Hub repo, Space, LM Studio, Ollama)
    SERVICE = "service"  # a running server (serve)


class HealthVerdict(StrEnum):
    """The health report's verdict (`report:health` meta `verdict`), from its checks; the gate and the health
    runner read it. Members are in order of severity."""

    HEALTHY = "healthy"  # every check passed
    DEGRADED = "degraded"  # a check warned (slow answer, little disk or memory)
    UNHEALTHY = "unhealthy"  # a check failed (no answer, wrong model list, empty answer)

    @classmethod
    def worst(cls, verdicts: Iterable[str]) -> HealthVerdict:
        """The most severe of `verdicts` (healthy when there are none or none is known)."""
        seen = set(verdicts)
        return next((v for v in (cls.UNHEALTHY, cls.DEGRADED) if v in seen), cls.HEALTHY)
