"""Ollama as a local target: a Modelfile for one quant (TEMPLATE translated by family), `ollama create`.

The Modelfile rendering and the family translation are tasks/local/ollama.py and tasks/chat/families.py;
this module writes `ollama/Modelfile` and `ollama/ollama.json` and, with the CLI, creates the model
(artifact `local:ollama`, the folder).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.core.artifacts import Artifact
from tasks.core.atomic import atomic_write_json, atomic_write_text
from tasks.core.errors import PermanentError
from tasks.local import ollama
from tasks.local.targets.base import Availability, LocalTarget, pick

if TYPE_CHECKING:
    from tasks.local.settings import LocalDeploySettings

log = logging.getLogger("loraship.local_deploy")


class OllamaTarget(LocalTarget):
    name = "ollama"
    title = "Ollama"
    description = "writes a Modelfile (TEMPLATE and stops from the chat-template family) and runs `ollama create`"

    def availability(self, settings: LocalDeploySettings) -> Availability:
        exe = settings.ollama_path or shutil.which("ollama")
        if exe:
            return Availability(True, f"ollama CLI at {exe}: the model is created")
        return Availability(False, "no `ollama` CLI: the Modelfile is written and the create command printed")

    def deploy(
        self, ggufs: list[Artifact], settings: LocalDeploySettings, model: str, out_dir: Path, dry_run: bool = False
    ) -> Artifact:
        folder = out_dir / "ollama"
        rec = self._deploy(ggufs, settings, model, folder, dry_run)
        atomic_write_json(folder / "ollama.json", rec)
        keys = ("name", "modelfile", "create", "chat_format")
        return self.record(folder, ggufs, settings, {k: rec[k] for k in keys})

    def _deploy(
        self, ggufs: list[Artifact], settings: LocalDeploySettings, model: str, folder: Path, dry_run: bool
    ) -> dict[str, Any]:
        target = pick(ggufs, settings.ollama_quant, log)
        quant = str(target.meta.get("quant"))
        name = settings.ollama_name or f"{model}:{quant.lower()}"
        params = dict(settings.ollama_parameters)
        if settings.context_length and "num_ctx" not in params:
            params["num_ctx"] = settings.context_length
        modelfile = folder / "Modelfile"
        text, info = ollama.render_modelfile(
            target.local_path,
            model=model,
            quant=quant,
            ollama_name=name,
            system=settings.system_prompt,
            parameters=params,
            modelfile_name=str(modelfile),
            template=settings.ollama_template,
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
