"""LM Studio as a local target: link the GGUFs into its models folder, write per-model defaults, `lms load`.

The placement, backups and per-model config format are tasks/local/lmstudio.py; this module decides what
to place and records it in `lmstudio.json` (artifact `local:lmstudio`). The record lists, per file, the
per-model config LM Studio will read (`model_configs`; in a dry run `planned_model_config`), which the
template contract reads to know which chat template LM Studio will use.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.core.artifacts import Artifact
from tasks.core.atomic import atomic_write_json
from tasks.core.errors import PermanentError
from tasks.gguf import quant_types
from tasks.local import lmstudio
from tasks.local.targets.base import Availability, LocalTarget, pick

if TYPE_CHECKING:
    from tasks.local.settings import LocalDeploySettings

log = logging.getLogger("loraship.local_deploy")


def _lms(settings: LocalDeploySettings, home: Path) -> str | None:
    return (
        settings.lms_path
        or shutil.which("lms")
        or (str(home / "bin" / "lms") if (home / "bin" / "lms").is_file() else None)
    )


def _chosen(ggufs: list[Artifact], wanted: list[str] | None) -> list[Artifact]:
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
    return chosen


def _prompt_template(settings: LocalDeploySettings, gguf: Path) -> dict[str, Any] | None:
    if not settings.lmstudio_prompt_template:
        return None
    from tasks.chat.vocab import load_vocab

    vocab = load_vocab(gguf)
    return lmstudio.jinja_prompt_template(settings.lmstudio_prompt_template, vocab.bos_text, vocab.eos_text)


class LMStudioTarget(LocalTarget):
    name = "lmstudio"
    title = "LM Studio"
    description = "links the GGUFs into LM Studio's models folder (backups kept), writes per-model defaults, `lms load`"

    def availability(self, settings: LocalDeploySettings) -> Availability:
        home = lmstudio.lmstudio_home(settings.lmstudio_home)
        lms = _lms(settings, home)
        if lms:
            return Availability(True, f"lms CLI at {lms}: the files are linked and {settings.lms_load_quant} loaded")
        return Availability(False, "no `lms` CLI: the files are linked; open LM Studio to load one")

    def plan(self, ggufs: list[Artifact], settings: LocalDeploySettings, model: str) -> dict[str, Any]:
        home = lmstudio.lmstudio_home(settings.lmstudio_home)
        files = {a.local_path.name: a.local_path for a in _chosen(ggufs, settings.lmstudio_quants)}
        repo = lmstudio.models_dir(home) / settings.publisher / lmstudio.repo_name(model)
        return {"home": home, "repo": repo, "files": files}

    def deploy(
        self, ggufs: list[Artifact], settings: LocalDeploySettings, model: str, out_dir: Path, dry_run: bool = False
    ) -> Artifact:
        rec = self._deploy(ggufs, settings, model, dry_run)
        path = atomic_write_json(out_dir / "lmstudio.json", rec)
        meta = {
            "repo_dir": rec["repo_dir"],
            "dry_run": dry_run,
            "lms": rec.get("lms", {}),
            "files": sorted(rec["files"]),
        }
        return self.record(path, ggufs, settings, meta)

    def _deploy(
        self, ggufs: list[Artifact], settings: LocalDeploySettings, model: str, dry_run: bool
    ) -> dict[str, Any]:
        p = self.plan(ggufs, settings, model)
        home, repo, files = p["home"], p["repo"], p["files"]
        template = _prompt_template(settings, next(iter(files.values()))) if files else None
        config = lmstudio.model_defaults(settings.system_prompt, settings.context_length, template)
        configs = {n: str(lmstudio.model_defaults_path(home, settings.publisher, model, n)) for n in files}
        if dry_run:
            return {
                "dry_run": True,
                "home": str(home),
                "repo_dir": str(repo),
                "link_mode": settings.link_mode,
                "files": {
                    n: {"source": str(s), "dest": str(repo / n), "action": "would place"} for n, s in files.items()
                },
                "model_configs": configs if config else {},
                "planned_model_config": config,
            }
        record = lmstudio.link_files(files, home, settings.publisher, model, settings.link_mode)
        written = [
            lmstudio.write_model_defaults(
                home, settings.publisher, model, n, settings.system_prompt, settings.context_length, template
            )
            for n in files
        ]
        record["model_defaults"] = [str(x) for x in written if x]
        record["model_configs"] = configs
        record["lms"] = self._load(settings, home, model, _chosen(ggufs, settings.lmstudio_quants))
        return record

    def _load(self, settings: LocalDeploySettings, home: Path, model: str, chosen: list[Artifact]) -> dict[str, Any]:
        lms = _lms(settings, home)
        if not settings.lms_load:
            return {"skipped": "deployment.lms_load is false"}
        if not lms:
            return {
                "skipped": (
                    "the `lms` CLI is not on PATH nor in <home>/bin: open LM Studio to see the model, or install lms "
                    "(https://lmstudio.ai/docs/cli)"
                )
            }
        target = pick(chosen, settings.lms_load_quant, log)
        identifier = f"{model}-{target.meta.get('quant')}".lower()
        out = lmstudio.lms_cli(
            lms, f"{settings.publisher}/{lmstudio.repo_name(model)}/{target.local_path.name}", identifier
        )
        if out["load_rc"] != 0:
            log.warning("lms load failed (rc %s): %s", out["load_rc"], out["load_output"][-300:])
        return out
