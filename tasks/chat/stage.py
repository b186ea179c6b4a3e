"""Stage template_contract: one conversation, the same tokens everywhere.

After convert (the GGUFs) and local_deploy (the Ollama Modelfile, LM Studio's per-model config), the fixed
conversations are rendered by transformers (the reference), llama.cpp reading the GGUF, Ollama's TEMPLATE
(Go) and LM Studio; the token ids must be equal, every runtime must stop on the template's end-of-turn
token, and a short served generation must end on it. Writes `reports/template-contract.{json,md}` and
returns `report:template-contract` (kind report; meta: verdict, family, summary lines for the run summary
and the model card). A FAIL verdict fails the stage (degraded under `pipeline.continue_on_error`) unless
`template_contract.fail_on_mismatch: false`; the report is written either way.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from tasks.chat import gorender
from tasks.chat.contract import ContractInputs, ContractResult, LMStudioInput, Server, check
from tasks.chat.conversations import CONVERSATIONS, by_name
from tasks.chat.findings import Verdict
from tasks.chat.report import card_lines, summary_lines, write
from tasks.core.artifacts import Artifact
from tasks.core.errors import FailedWithReport, PermanentError
from tasks.core.hashing import digest_of
from tasks.core.settings import StrictModel
from tasks.core.stage import stage_task
from tasks.core.vocab import ArtifactKind
from tasks.gguf import quant_types
from tasks.local.ollama import parse_modelfile

STAGE = "template_contract"
REPORT = "report:template-contract"
RUNTIMES = ("transformers", "llama.cpp", "ollama", "lmstudio")
log = logging.getLogger("loraship.template_contract")


class TemplateContractSettings(StrictModel):
    """Which conversations and runtimes the chat-template contract checks, and what fails it."""

    conversations: list[str] = Field(
        default_factory=lambda: [c.name for c in CONVERSATIONS],
        description="the fixed conversations to render (" + ", ".join(c.name for c in CONVERSATIONS) + ")",
    )
    runtimes: list[str] = Field(
        default_factory=lambda: list(RUNTIMES), description="runtimes to check: " + ", ".join(RUNTIMES)
    )
    gguf_quant: str | None = Field(
        None, description="the GGUF llama.cpp's rendering reads (default: F16, else the first)"
    )
    served_generation: bool = Field(
        True, description="try a short generation through a served model (the run's server, else one started here)"
    )
    serve_quant: str = Field(
        default_factory=quant_types.default_quant, description="the quant to serve when no server of this run is up"
    )
    natural_stop: Literal["require", "warn", "off"] = Field(
        "require", description="the served model's own answer must end on a stop token within max_tokens"
    )
    max_tokens: int = Field(48, ge=4, le=4096, description="max_tokens of the served answer")
    n_ctx: int = Field(512, ge=64, description="context of the server started for the check")
    fail_on_mismatch: bool = Field(True, description="a FAIL verdict fails the stage (false: report only)")

    @field_validator("conversations")
    @classmethod
    def _known_conversations(cls, v: list[str]) -> list[str]:
        names = [c.name for c in CONVERSATIONS]
        bad = [c for c in v if c not in names]
        if bad:
            raise ValueError(f"unknown conversation(s) {bad}; conversations: {', '.join(names)}")
        if not v:
            raise ValueError("template_contract.conversations is empty")
        return v

    @field_validator("serve_quant")
    @classmethod
    def _known_quant(cls, v: str) -> str:
        return quant_types.check_quant(v)

    @field_validator("gguf_quant")
    @classmethod
    def _known_gguf_quant(cls, v: str | None) -> str | None:
        return quant_types.check_quant(v) if v else v

    @field_validator("runtimes")
    @classmethod
    def _known_runtimes(cls, v: list[str]) -> list[str]:
        bad = [r for r in v if r not in RUNTIMES]
        if bad:
            raise ValueError(f"unknown runtime(s) {bad}; runtimes: {', '.join(RUNTIMES)}")
        return v


def _pick_gguf(ggufs: list[Artifact], quant: str | None) -> Artifact:
    by_quant = {str(a.meta.get("quant")): a for a in ggufs if a.local_path.is_file()}
    if not by_quant:
        raise PermanentError("template_contract needs a GGUF file and none is on disk", hint="run convert first")
    if quant:
        if quant not in by_quant:
            raise PermanentError(
                f"template_contract.gguf_quant {quant!r} was not made (made: {', '.join(by_quant)})",
                hint="name a quant from quantization.types, or F16",
            )
        return by_quant[quant]
    floats = sorted((q for q in by_quant if quant_types.is_float(q)), key=quant_types.precision_key)
    return by_quant[floats[0]] if floats else next(iter(by_quant.values()))  # the unquantized one: F16/BF16/F32


def hf_folder(merged: Artifact | None) -> Path | None:
    """The folder with the merged model's tokenizer (the base's when merged/ was cleaned up and it came from it)."""
    if merged is None:
        return None
    for candidate in (
        merged.local_path,
        merged.meta.get("base_dir") if merged.meta.get("tokenizer_from") == "base" else None,
    ):
        if candidate and Path(candidate).is_dir() and (Path(candidate) / "tokenizer_config.json").is_file():
            return Path(candidate)
    return None


def _record(local: list[Artifact], name: str) -> Artifact | None:
    return next((a for a in local if a.name == name), None)


def lmstudio_input(record: Artifact | None) -> LMStudioInput | None:
    """The GGUF LM Studio gets and its per-model config (the file, or the dry run's planned one)."""
    if record is None:
        return None
    rec = json.loads(Path(record.path).read_text())
    files = rec.get("files") or {}
    if not files:
        return None
    first = sorted(files)[0]
    gguf = Path(files[first]["source"])
    cfg_path = Path((rec.get("model_configs") or {}).get(first) or "") if rec.get("model_configs") else None
    config = None
    if cfg_path and cfg_path.is_file():
        config = json.loads(cfg_path.read_text())
    elif rec.get("dry_run"):
        config = rec.get("planned_model_config")
    return LMStudioInput(gguf=gguf, config=config, config_path=cfg_path)


def modelfile_of(record: Artifact | None) -> Path | None:
    if record is None:
        return None
    path = Path(str(record.meta.get("modelfile") or Path(record.path) / "Modelfile"))
    return path if path.is_file() else None


def inputs_for(
    ggufs: list[Artifact],
    merged: Artifact | None,
    local: list[Artifact],
    settings: TemplateContractSettings,
    server: Server | None,
) -> ContractInputs:
    gguf = _pick_gguf(ggufs, settings.gguf_quant)
    not_deployed = {r: "not in template_contract.runtimes" for r in RUNTIMES if r not in settings.runtimes}
    return ContractInputs(
        gguf=gguf.local_path,
        hf_dir=hf_folder(merged),
        modelfile=modelfile_of(_record(local, "local:ollama")),
        lmstudio=lmstudio_input(_record(local, "local:lmstudio")),
        server=server,
        conversations=tuple(by_name(n) for n in settings.conversations),
        natural_generation=settings.natural_stop,
        max_tokens=settings.max_tokens,
        not_deployed=not_deployed,
    )


def _own_server(ggufs: list[Artifact], settings: TemplateContractSettings, state_dir: Path):
    """Start a short-lived server for the check (the run's serve stage did not leave one up)."""
    from tasks.serve.stage import ServeSettings, start_server

    by_quant = {str(a.meta.get("quant")): a for a in ggufs if a.local_path.is_file()}
    gguf = by_quant.get(settings.serve_quant) or _pick_gguf(ggufs, settings.gguf_quant)
    rec = start_server(gguf, ServeSettings(n_ctx=settings.n_ctx), state_dir, alias="template-contract")
    return rec, Server(base_url=rec["base_url"], model_id=rec["model_id"], gguf=gguf.local_path)


def template_contract(
    ggufs: list[Artifact],
    merged: Artifact | None,
    local: list[Artifact],
    settings: TemplateContractSettings,
    out_dir: Path,
    server: Server | None = None,
) -> Artifact:
    """Run the contract, write the report into `out_dir`, return its record (never raises for a mismatch)."""
    started = None
    if server is None and settings.served_generation:
        started, server = _own_server(ggufs, settings, out_dir / "template-contract-server")
    try:
        result = check(inputs_for(ggufs, merged, local, settings, server))
    finally:
        if started is not None:
            from tasks.serve.stage import stop_servers

            stop_servers([started], 10.0)
    return _artifact(result, ggufs, merged, local, settings, out_dir)


def _artifact(
    result: ContractResult,
    ggufs: list[Artifact],
    merged: Artifact | None,
    local: list[Artifact],
    settings: TemplateContractSettings,
    out_dir: Path,
) -> Artifact:
    js, md = write(result, out_dir)
    errors = result.errors
    modelfile = modelfile_of(_record(local, "local:ollama"))
    ollama_ok = "ollama" in {s.name for s in result.runtimes if s.checked} and not any(
        d.runtime == "ollama" for d in result.differences
    )
    mf = parse_modelfile(modelfile.read_text()) if modelfile is not None and ollama_ok else None
    return Artifact.from_path(
        js,
        name=REPORT,
        kind=ArtifactKind.REPORT,
        stage=STAGE,
        inputs=[*ggufs, *([merged] if merged else []), *local],
        settings=settings,
        meta={
            "verdict": result.verdict.value,
            "family": result.family.name,
            "reference": result.reference,
            "checked": [s.name for s in result.runtimes if s.checked],
            "not_checked": {s.name: s.detail for s in result.runtimes if not s.checked},
            "turn_end": result.turn_end.token.piece if result.turn_end.token else None,
            "differences": len(result.differences),
            "errors": [f.message for f in errors][:10],
            "summary": summary_lines(result),
            "markdown": str(md),
            "card": {
                "lines": card_lines(result),
                "turn_end": result.turn_end.token.piece if result.turn_end.token else None,
                "ollama_template": mf.template if mf else None,
                "ollama_stops": list(mf.stops) if mf else [],
            },
        },
    )


def failure(report: Artifact) -> FailedWithReport | None:
    """The error a FAIL verdict raises (with the first problem and where the report is); None otherwise."""
    if report.meta.get("verdict") != Verdict.FAIL.value:
        return None
    errors = report.meta.get("errors") or ["see the report"]
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    return FailedWithReport(
        f"chat-template contract failed: {errors[0]}{more}",
        hint=f"see {report.meta.get('markdown')}; template_contract.fail_on_mismatch: false only reports it",
        artifacts=[report],
    )


def environment_key() -> dict[str, Any]:
    """What the cache key must also see: whether Go's renderer is there (a degraded report is not final)."""
    return {
        "go_renderer": gorender.build_dir().name if (gorender.build_dir() / gorender.BINARY_NAME).is_file() else None
    }


@stage_task(STAGE)
def template_contract_task(
    ggufs: list[Artifact],
    merged: Artifact | None,
    settings: TemplateContractSettings,
    out_dir: Path,
    environment: dict[str, Any],
    deployed: dict[str, Any],
    _local: list[Artifact],
    _server: Server | None = None,
) -> Artifact:
    """Cached on the GGUFs, the merged model, the settings, Go's availability (`environment_key`) and what the
    deployed runtimes read (`deployed_key`: the Modelfile, LM Studio's file and per-model config, which the user
    may edit in the app). The local_deploy records themselves change every run (placed/unchanged), and a running
    server is not an input: both are passed outside the key."""
    return template_contract(ggufs, merged, _local, settings, out_dir, _server)


def deployed_key(local: list[Artifact]) -> dict[str, Any]:
    """What the Ollama and LM Studio renderings depend on, by content (not the records' bookkeeping)."""
    modelfile = modelfile_of(_record(local, "local:ollama"))
    lm = lmstudio_input(_record(local, "local:lmstudio"))
    return {
        "modelfile": digest_of(modelfile.read_text()) if modelfile else None,
        "lmstudio": digest_of({"gguf": lm.gguf.name, "config": lm.config}) if lm else None,
    }
