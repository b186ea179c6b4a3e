"""The `deployment:` section: which local targets get the GGUFs (tasks/local/targets/), and how.

`targets` is validated against the local-targets registry, so an unknown name lists the registered ones.
`lmstudio_enabled: false` / `ollama_enabled: false` (the older switches) still work: they take that
target out of `targets`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from tasks.core.settings import StrictModel
from tasks.gguf import quant_types
from tasks.local.targets import LOCAL_TARGETS


class LocalDeploySettings(StrictModel):
    """Where LM Studio and Ollama should find the GGUFs, and how."""

    targets: list[str] = Field(
        default_factory=lambda: list(LOCAL_TARGETS),
        description="local targets to deploy to, in order: "
        + "; ".join(f"{t.name}: {t.description}" for t in LOCAL_TARGETS.values()),
    )
    lmstudio_enabled: bool = Field(True, description="older switch: false takes lmstudio out of `targets`")
    lmstudio_home: str | None = Field(
        None,
        description=(
            "LM Studio home (default: the app's ~/.lmstudio-home-pointer, else ~/.lmstudio); its settings.json "
            "downloadsFolder is honoured"
        ),
    )
    publisher: str = Field("loraship", description="folder under models/: models/<publisher>/<model>-GGUF/")
    link_mode: Literal["symlink", "hardlink", "copy"] = Field(
        "symlink", description="symlink (no extra disk), hardlink (same filesystem) or copy"
    )
    lmstudio_quants: list[str] | None = Field(
        None,
        description=(
            "quants to link (e.g. [Q4_K_M, Q8_0]); None: every quantized GGUF (F16 only when it is the only one)"
        ),
    )
    system_prompt: str | None = Field(
        None, description="default system prompt (LM Studio per-model default and Ollama SYSTEM)"
    )
    context_length: int | None = Field(
        None, ge=64, description="default context length (LM Studio load default and Ollama num_ctx)"
    )
    lmstudio_prompt_template: str | None = Field(
        None,
        description=(
            "a Jinja chat template LM Studio should use instead of the GGUF's (written to its per-model config; "
            "the template contract checks it)"
        ),
    )
    lms_load: bool = Field(
        True, description="when the `lms` CLI is found, load the model in LM Studio and read the server status"
    )
    lms_load_quant: str = Field(default_factory=quant_types.default_quant, description="which quant `lms load` loads")
    lms_path: str | None = Field(None, description="the `lms` executable (default: PATH, then <home>/bin/lms)")
    ollama_enabled: bool = Field(True, description="older switch: false takes ollama out of `targets`")
    ollama_quant: str = Field(
        default_factory=quant_types.default_quant, description="the quant the Modelfile points at"
    )
    ollama_name: str | None = Field(None, description="Ollama model name (default: <model>:<quant in lower case>)")
    ollama_template: str | None = Field(
        None,
        description=(
            "the Modelfile TEMPLATE (Go text/template) to write instead of the one translated from the GGUF's chat "
            "template (the template contract renders it with Go)"
        ),
    )
    ollama_parameters: dict[str, str | int | float | list[str]] = Field(
        default_factory=lambda: {"temperature": 0.7}, description="PARAMETER lines of the Modelfile"
    )
    ollama_path: str | None = Field(None, description="the `ollama` executable (default: PATH)")

    @field_validator("lms_load_quant", "ollama_quant")
    @classmethod
    def _known_quant(cls, v: str) -> str:
        return quant_types.check_quant(v)

    @field_validator("lmstudio_quants")
    @classmethod
    def _known_quants(cls, v: list[str] | None) -> list[str] | None:
        return quant_types.check_quants(v)

    @field_validator("targets")
    @classmethod
    def _registered(cls, v: list[str]) -> list[str]:
        for name in v:
            LOCAL_TARGETS.check(name)
        if len(set(v)) != len(v):
            raise ValueError("deployment.targets names a target twice")
        return v

    @model_validator(mode="after")
    def _older_switches(self) -> LocalDeploySettings:
        off = {"lmstudio": not self.lmstudio_enabled, "ollama": not self.ollama_enabled}
        kept = [t for t in self.targets if not off.get(t)]
        if kept != self.targets:
            object.__setattr__(self, "targets", kept)  # validate_assignment would re-enter this validator
        return self

    def wants(self, target: str) -> bool:
        return target in self.targets
