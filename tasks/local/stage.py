"""Stage 8, LM Studio / Ollama: put the GGUFs where the desktop apps find them.

LM Studio: each GGUF is linked (or copied) to `<models>/<publisher>/<model>-GGUF/<file>`; a file it
replaces is kept in a timestamped backup set (`python -m tasks.local.lmstudio rollback` restores it); with
the `lms` CLI on PATH the chosen quant is loaded under an identifier and the server status is read.
Ollama: a Modelfile is rendered for the chosen quant; with the `ollama` CLI it runs `ollama create`,
otherwise the Modelfile is staged and the command to run is printed. The placement logic lives in
tasks/local/lmstudio.py and tasks/local/ollama.py; each app is a registered local target
(tasks/local/targets/: name, availability, deploy, describe) and this module runs the configured ones.

A dry run (`--dry-run`) changes nothing outside the run folder: it writes the plan (where each file
would go) and the Modelfile into the run's publish/ folder.
"""

from __future__ import annotations

import logging
from pathlib import Path

from tasks.core.artifacts import Artifact
from tasks.core.constants import TEMPLATES_DIR
from tasks.core.errors import PermanentError
from tasks.core.stage import stage_task
from tasks.core.vocab import Stage
from tasks.local.settings import LocalDeploySettings
from tasks.local.targets import LOCAL_TARGETS

STAGE = Stage.LOCAL_DEPLOY
log = logging.getLogger("loraship.local_deploy")

__all__ = ["LocalDeploySettings", "STAGE", "local_deploy", "local_deploy_task"]


def local_deploy(
    ggufs: list[Artifact], settings: LocalDeploySettings, model: str, out_dir: Path, dry_run: bool = False
) -> list[Artifact]:
    """Deploy to every target of `deployment.targets`; one record artifact (`local:<target>`) each.

    `out_dir` (the run's publish/local_deploy folder) receives each target's record (lmstudio.json,
    ollama/Modelfile + ollama.json).
    """
    if not ggufs:
        raise PermanentError("no GGUF files to deploy", hint="run the convert/quantize stages first")
    out: list[Artifact] = []
    for name in settings.targets:
        target = LOCAL_TARGETS.lookup(name)
        ready = target.availability(settings)
        if not ready.ready:
            log.info("%s: %s", target.title, ready.reason)
        out.append(target.deploy(ggufs, settings, model, out_dir, dry_run))
    return out


@stage_task(STAGE, cache=False, key_files=[TEMPLATES_DIR / "ollama" / "Modelfile.j2"])
def local_deploy_task(
    ggufs: list[Artifact], settings: LocalDeploySettings, model: str, out_dir: Path, dry_run: bool = False
) -> list[Artifact]:
    return local_deploy(ggufs, settings, model, out_dir, dry_run)
