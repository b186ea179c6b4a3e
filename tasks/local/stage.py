"""Stage 8, LM Studio / Ollama: put the GGUFs where the desktop apps find them.

LM Studio: each GGUF is linked (or copied) to `<models>/<publisher>/<model>-GGUF/<file>`; a file it
replaces is kept in a timestamped backup set (`python -m tasks.local.lmstudio rollback` restores it); with
the `lms` CLI on PATH the chosen quant is loaded under an identifier and the server status is read.
Ollama: a Modelfile is rendered for the chosen quant; with the `ollama` CLI it runs `ollama create`,
otherwise the Modelfile is staged and the command to run is printed. The placement logic lives in
tasks/local/lmstudio.py and tasks/local/ollama.py; this module decides what to do and records it.

A dry run (`--dry-run`) changes nothing outside the run folder: it writes the plan (where each file
would go) and the Modelfile into the run's publish/ folder.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from tasks.core.artifacts import Artifact
from tasks.core.atomic import atomic_write_json, atomic_write_text
from tasks.core.errors import PermanentError
from tasks.core.settings import StrictModel
from tasks.core.stage import stage_task
from tasks.gguf import quant_types
from tasks.local import lmstudio, ollama

STAGE = "local_deploy"
log = logging.getLogger("loraship.local_deploy")


class LocalDeploySettings(StrictModel):
    """Where LM Studio and Ollama should find the GGUFs, and how."""

    lmstudio_enabled: bool = Field(True, description="link the GGUFs into LM Studio's models folder")
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
    lms_load: bool = Field(
        True, description="when the `lms` CLI is found, load the model in LM Studio and read the server status"
    )
    lms_load_quant: str = Field(default_factory=quant_types.default_quant, description="which quant `lms load` loads")
    lms_path: str | None = Field(None, description="the `lms` executable (default: PATH, then <home>/bin/lms)")
    ollama_enabled: bool = Field(
        True, description="render an Ollama Modelfile (and `ollama create` when the CLI is found)"
    )
    ollama_quant: str = Field(
        default_factory=quant_types.default_quant, description="the quant the Modelfile points at"
    )
    ollama_name: str | None = Field(None, description="Ollama model name (default: <model>:<quant in lower case>)")
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


def _pick(ggufs: list[Artifact], quant: str) -> Artifact:
    by_quant = {a.meta.get("quant"): a for a in ggufs}
    if quant in by_quant:
        return by_quant[quant]
    quantized = [a for a in ggufs if not quant_types.is_float(str(a.meta.get("quant", "")))]
    chosen = (quantized or ggufs)[-1]
    log.warning("quant %s was not made in this run; using %s", quant, chosen.meta.get("quant"))
    return chosen


def deploy_lmstudio(
    ggufs: list[Artifact], settings: LocalDeploySettings, model: str, out_dir: Path, dry_run: bool = False
) -> dict[str, Any]:
    home = lmstudio.lmstudio_home(settings.lmstudio_home)
    wanted = settings.lmstudio_quants
    chosen = [
        a
        for a in ggufs
        if (a.meta.get("quant") in wanted if wanted else not quant_types.is_float(str(a.meta.get("quant", ""))))
    ] or ([] if wanted else ggufs)
    if wanted and not chosen:
        raise PermanentError(
            (
                f"deployment.lmstudio_quants {wanted} matches none of the GGUFs made "
                f"({', '.join(str(a.meta.get('quant')) for a in ggufs)})"
            ),
            hint="list quants from quantization.types",
        )
    files = {a.local_path.name: a.local_path for a in chosen}
    repo = lmstudio.models_dir(home) / settings.publisher / lmstudio.repo_name(model)
    if dry_run:
        return {
            "dry_run": True,
            "home": str(home),
            "repo_dir": str(repo),
            "link_mode": settings.link_mode,
            "files": {n: {"source": str(s), "dest": str(repo / n), "action": "would place"} for n, s in files.items()},
        }
    record = lmstudio.link_files(files, home, settings.publisher, model, settings.link_mode)
    defaults = [
        lmstudio.write_model_defaults(
            home, settings.publisher, model, n, settings.system_prompt, settings.context_length
        )
        for n in files
    ]
    record["model_defaults"] = [str(p) for p in defaults if p]
    lms = (
        settings.lms_path
        or shutil.which("lms")
        or (str(home / "bin" / "lms") if (home / "bin" / "lms").is_file() else None)
    )
    if not settings.lms_load:
        record["lms"] = {"skipped": "deployment.lms_load is false"}
    elif not lms:
        record["lms"] = {
            "skipped": (
                "the `lms` CLI is not on PATH nor in <home>/bin: open LM Studio to see the model, or install lms "
                "(https://lmstudio.ai/docs/cli)"
            )
        }
    else:
        target = _pick(chosen, settings.lms_load_quant)
        identifier = f"{model}-{target.meta.get('quant')}".lower()
        record["lms"] = lmstudio.lms_cli(
            lms, f"{settings.publisher}/{lmstudio.repo_name(model)}/{target.local_path.name}", identifier
        )
        if record["lms"]["load_rc"] != 0:
            log.warning("lms load failed (rc %s): %s", record["lms"]["load_rc"], record["lms"]["load_output"][-300:])
    return record


def deploy_ollama(
    ggufs: list[Artifact], settings: LocalDeploySettings, model: str, out_dir: Path, dry_run: bool = False
) -> dict[str, Any]:
    target = _pick(ggufs, settings.ollama_quant)
    quant = str(target.meta.get("quant"))
    name = settings.ollama_name or f"{model}:{quant.lower()}"
    params = dict(settings.ollama_parameters)
    if settings.context_length and "num_ctx" not in params:
        params["num_ctx"] = settings.context_length
    modelfile = out_dir / "Modelfile"
    text, info = ollama.render_modelfile(
        target.local_path,
        model=model,
        quant=quant,
        ollama_name=name,
        system=settings.system_prompt,
        parameters=params,
        modelfile_name=str(modelfile),
    )
    atomic_write_text(modelfile, text)
    record: dict[str, Any] = {"modelfile": str(modelfile), "name": name, "gguf": str(target.local_path), **info}
    exe = settings.ollama_path or shutil.which("ollama")
    command = f"ollama create {name} -f {modelfile}"
    if dry_run:
        record["create"] = {"skipped": f"dry run; to create it: {command}"}
    elif not exe:
        record["create"] = {"skipped": f"the `ollama` CLI is not on PATH; to create the model: {command}"}
    else:
        record["create"] = ollama.ollama_create(exe, name, modelfile)
        if record["create"]["rc"] != 0:
            raise PermanentError(
                f"`{command}` failed (rc {record['create']['rc']}): {record['create']['output'][-500:]}",
                hint="check that the Ollama server is running (`ollama serve`)",
            )
    return record


def local_deploy(
    ggufs: list[Artifact], settings: LocalDeploySettings, model: str, out_dir: Path, dry_run: bool = False
) -> list[Artifact]:
    """Link the GGUFs into LM Studio and write/create the Ollama model; returns one record artifact per app.

    `out_dir` (the run's publish/local_deploy folder) receives lmstudio.json and ollama/Modelfile.
    """
    if not ggufs:
        raise PermanentError("no GGUF files to deploy", hint="run the convert/quantize stages first")
    out: list[Artifact] = []
    inputs = ggufs
    if settings.lmstudio_enabled:
        rec = deploy_lmstudio(ggufs, settings, model, out_dir, dry_run)
        path = atomic_write_json(out_dir / "lmstudio.json", rec)
        out.append(
            Artifact.from_path(
                path,
                name="local:lmstudio",
                kind="publish",
                stage=STAGE,
                inputs=inputs,
                settings=settings,
                meta={
                    "repo_dir": rec["repo_dir"],
                    "dry_run": dry_run,
                    "lms": rec.get("lms", {}),
                    "files": sorted(rec["files"]),
                },
            )
        )
    if settings.ollama_enabled:
        rec = deploy_ollama(ggufs, settings, model, out_dir / "ollama", dry_run)
        atomic_write_json(out_dir / "ollama" / "ollama.json", rec)
        out.append(
            Artifact.from_path(
                out_dir / "ollama",
                name="local:ollama",
                kind="publish",
                stage=STAGE,
                inputs=inputs,
                settings=settings,
                meta={
                    "name": rec["name"],
                    "modelfile": rec["modelfile"],
                    "create": rec["create"],
                    "chat_format": rec["chat_format"],
                },
            )
        )
    return out


@stage_task(STAGE, cache=False)
def local_deploy_task(
    ggufs: list[Artifact], settings: LocalDeploySettings, model: str, out_dir: Path, dry_run: bool = False
) -> list[Artifact]:
    return local_deploy(ggufs, settings, model, out_dir, dry_run)
