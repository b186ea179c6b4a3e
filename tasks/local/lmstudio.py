"""LM Studio: put GGUF files where the desktop app finds them, keep the previous version, roll back.

LM Studio lists every `.gguf` under `<models folder>/<publisher>/<repo>/`. Its home is `~/.lmstudio`
unless `~/.lmstudio-home-pointer` names another one, and its models folder is `<home>/models` unless
`<home>/settings.json` sets `downloadsFolder`. LM Studio has no library for this and its `lms` CLI
cannot place a file under a publisher/repo of our choosing without copying it, so the placement is
written here: link (symlink/hardlink) or copy, an existing file of the same name first moved into a
timestamped backup set (outside the models folder, so LM Studio does not list backups as models),
and `python -m tasks.local.lmstudio rollback` to put the previous set back.

Per-model defaults (system prompt, context length, a prompt-template override) go to
`<home>/.internal/user-concrete-model-default-config/<publisher>/<repo>/<file>.json`, the file LM Studio
0.3 writes when you change a model's defaults in its UI ("load" and "operation" field lists).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from tasks.core.atomic import atomic_path, atomic_write_json
from tasks.core.errors import PermanentError

log = logging.getLogger("loraship.local_deploy")
BACKUPS = "loraship-backups"


def lmstudio_home(home: str | Path | None = None) -> Path:
    """The LM Studio home: the given one, else the app's home pointer, else ~/.lmstudio."""
    if home:
        return Path(home).expanduser().resolve()
    pointer = Path.home() / ".lmstudio-home-pointer"
    if pointer.is_file():
        text = pointer.read_text().strip()
        if text:
            return Path(text).expanduser().resolve()
    return (Path.home() / ".lmstudio").resolve()


def models_dir(home: Path) -> Path:
    """LM Studio's models folder: `downloadsFolder` from its settings.json when set, else <home>/models."""
    settings = home / "settings.json"
    if settings.is_file():
        try:
            folder = json.loads(settings.read_text()).get("downloadsFolder")
        except (ValueError, AttributeError):
            folder = None
        if folder:
            return Path(folder).expanduser().resolve()
    return home / "models"


def repo_name(model: str) -> str:
    return f"{model}-GGUF"


def backups_dir(home: Path, publisher: str, model: str) -> Path:
    return home / BACKUPS / publisher / repo_name(model)


def _stamp() -> str:
    return dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def place(src: Path, dest: Path, mode: str) -> None:
    """Link or copy `src` to `dest` (which must not exist); the final name appears atomically."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dest) as tmp:
        if mode == "symlink":
            tmp.symlink_to(src.resolve())
        elif mode == "hardlink":
            try:
                os.link(src, tmp)
            except OSError as exc:
                raise PermanentError(
                    f"cannot hardlink {src} into {dest.parent}: {exc.strerror}",
                    hint="deployment.link_mode: symlink or copy (hardlinks need one filesystem)",
                ) from None
        else:
            shutil.copyfile(src, tmp)
    # atomic_path fsyncs through the link; a symlink's target is what it names, so check it.
    if mode == "symlink" and not dest.is_symlink():
        raise PermanentError(f"{dest} is not a symlink after linking")


def link_files(files: dict[str, Path], home: Path, publisher: str, model: str, mode: str) -> dict[str, Any]:
    """Place `files` (file name -> source) under LM Studio's models folder; back up what they replace.

    Returns a record: models folder, repo folder, per file its destination and what happened
    (`placed`, `replaced` with the backup path, or `unchanged` when it already points at the same file),
    and `retired`: this model's GGUFs from an earlier deploy that are not in `files`, moved to the backup set.
    """
    repo = models_dir(home) / publisher / repo_name(model)
    stamp = _stamp()
    backup_set = backups_dir(home, publisher, model) / stamp
    record: dict[str, Any] = {
        "home": str(home),
        "models_dir": str(models_dir(home)),
        "repo_dir": str(repo),
        "link_mode": mode,
        "files": {},
        "backup": None,
    }
    for name, src in files.items():
        if not src.is_file():
            raise PermanentError(f"GGUF {src} does not exist", hint="run the quantize stage first")
        dest = repo / name
        entry: dict[str, Any] = {"source": str(src), "dest": str(dest)}
        if dest.exists() or dest.is_symlink():
            if _same_file(dest, src) and (mode != "symlink" or dest.is_symlink()):
                entry["action"] = "unchanged"
                record["files"][name] = entry
                continue
            backup_set.mkdir(parents=True, exist_ok=True)
            os.replace(dest, backup_set / name)  # moves a link as a link, a file as a file
            entry["action"] = "replaced"
            entry["backup"] = str(backup_set / name)
            record["backup"] = str(backup_set)
        else:
            entry["action"] = "placed"
        place(src, dest, mode)
        record["files"][name] = entry
    # GGUFs an earlier deploy put in this model's folder that are not part of this run (a dropped or
    # withheld quantization) leave LM Studio too: moved into the backup set, so a rollback brings them back.
    record["retired"] = {}
    for old in sorted(repo.glob("*.gguf")) if repo.is_dir() else []:
        if old.name in files or not old.name.startswith(f"{model}-"):
            continue
        backup_set.mkdir(parents=True, exist_ok=True)
        os.replace(old, backup_set / old.name)
        record["retired"][old.name] = str(backup_set / old.name)
        record["backup"] = str(backup_set)
    if record["backup"]:
        atomic_write_json(
            backup_set / "backup.json",
            {
                "created": stamp,
                "repo_dir": str(repo),
                "files": sorted(p.name for p in backup_set.iterdir() if p.suffix == ".gguf"),
            },
        )
        log.info(
            (
                "LM Studio: previous files moved to %s (roll back: python -m tasks.local.lmstudio rollback "
                "--home %s --publisher %s --model %s)"
            ),
            backup_set,
            home,
            publisher,
            model,
        )
    return record


def model_defaults_path(home: Path, publisher: str, model: str, file_name: str) -> Path:
    """Where LM Studio reads the per-model defaults of `file_name` (the file its UI writes)."""
    return (
        home / ".internal" / "user-concrete-model-default-config" / publisher / repo_name(model) / f"{file_name}.json"
    )


def model_defaults(
    system_prompt: str | None, context_length: int | None, prompt_template: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """The per-model config LM Studio reads (system prompt, context length, prompt-template override); None: none."""
    if not system_prompt and not context_length and not prompt_template:
        return None
    load = [{"key": "llm.load.contextLength", "value": int(context_length)}] if context_length else []
    operation = [{"key": "llm.prediction.systemPrompt", "value": system_prompt}] if system_prompt else []
    if prompt_template:
        operation.append({"key": "llm.prediction.promptTemplate", "value": prompt_template})
    return {"preset": "", "operation": {"fields": operation}, "load": {"fields": load}}


def jinja_prompt_template(template: str, bos_token: str, eos_token: str) -> dict[str, Any]:
    """LM Studio's Jinja prompt-template override value (its `LLMPromptTemplate`, type jinja)."""
    return {
        "type": "jinja",
        "jinjaPromptTemplate": {"template": template, "bosToken": bos_token, "eosToken": eos_token},
        "stopStrings": [],
    }


def write_model_defaults(
    home: Path,
    publisher: str,
    model: str,
    file_name: str,
    system_prompt: str | None,
    context_length: int | None,
    prompt_template: dict[str, Any] | None = None,
) -> Path | None:
    """Per-model defaults where LM Studio reads them; None when there is nothing to set."""
    config = model_defaults(system_prompt, context_length, prompt_template)
    if config is None:
        return None
    path = model_defaults_path(home, publisher, model, file_name)
    atomic_write_json(path, config)
    return path


def list_backups(home: Path, publisher: str, model: str) -> list[Path]:
    root = backups_dir(home, publisher, model)
    return sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.name) if root.is_dir() else []


def rollback(home: Path, publisher: str, model: str, to: str | None = None) -> dict[str, Any]:
    """Put a backup set back (the newest, or the one named `to`); the files it replaces become a new backup.

    So a rollback can itself be undone by rolling back again.
    """
    sets = list_backups(home, publisher, model)
    if not sets:
        raise PermanentError(
            f"no LM Studio backups for {publisher}/{repo_name(model)} under {backups_dir(home, publisher, model)}",
            hint="backups are made when a deploy replaces an existing file",
        )
    chosen = next((s for s in sets if s.name == to), None) if to else sets[-1]
    if chosen is None:
        raise PermanentError(f"no backup named {to!r}", hint=f"backups: {', '.join(s.name for s in sets)}")
    repo = models_dir(home) / publisher / repo_name(model)
    undo = backups_dir(home, publisher, model) / f"{_stamp()}-before-rollback"
    restored = []
    for f in sorted(chosen.iterdir()):
        if f.suffix != ".gguf":
            continue
        dest = repo / f.name
        if dest.exists() or dest.is_symlink():
            undo.mkdir(parents=True, exist_ok=True)
            os.replace(dest, undo / f.name)
        repo.mkdir(parents=True, exist_ok=True)
        os.replace(f, dest)
        restored.append(str(dest))
    shutil.rmtree(chosen)
    return {"restored": restored, "from": str(chosen), "previous_saved_to": str(undo) if undo.exists() else None}


def lms_cli(lms: str, repo_key: str, identifier: str, timeout: float = 300.0) -> dict[str, Any]:
    """Load the model in LM Studio through its CLI under `identifier`, then ask for the server status."""
    out: dict[str, Any] = {"cli": lms, "identifier": identifier}
    load = subprocess.run(
        [lms, "load", repo_key, "--identifier", identifier, "--yes"], capture_output=True, text=True, timeout=timeout
    )
    out["load_rc"] = load.returncode
    out["load_output"] = (load.stdout + load.stderr)[-2000:]
    status = subprocess.run([lms, "server", "status"], capture_output=True, text=True, timeout=60)
    out["server_status_rc"] = status.returncode
    out["server_status"] = (status.stdout + status.stderr).strip()[-500:]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tasks.local.lmstudio",
        description="LM Studio backups made by loraship's local_deploy stage: list them, or roll back to one.",
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, text in (("list", "list backup sets"), ("rollback", "restore a backup set (default: the newest)")):
        sp = sub.add_parser(name, help=text)
        sp.add_argument("--home", help="LM Studio home (default: the app's home pointer, else ~/.lmstudio)")
        sp.add_argument("--publisher", default="loraship")
        sp.add_argument("--model", required=True, help="model name (the repo folder is <model>-GGUF)")
        if name == "rollback":
            sp.add_argument("--to", help="backup set name from `list` (default: the newest)")
    args = p.parse_args(argv)
    home = lmstudio_home(args.home)
    try:
        if args.cmd == "list":
            for s in list_backups(home, args.publisher, args.model):
                print(s.name, " ".join(f.name for f in sorted(s.iterdir()) if f.suffix == ".gguf"))
            return 0
        result = rollback(home, args.publisher, args.model, args.to)
    except PermanentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
