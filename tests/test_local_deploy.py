"""local_deploy: LM Studio placement with backups and rollback, Ollama Modelfile, the CLI branches.

LM Studio's desktop app and the `lms`/`ollama` CLIs cannot run here: a temporary folder is the LM
Studio home, and the CLI branches use a tiny fake executable on PATH that records its arguments (it
stands in for the desktop CLI; see tests/deploy_helpers.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.core.errors import PermanentError
from tasks.core.hashing import sha256_file
from tasks.local import lmstudio
from tasks.local.stage import LocalDeploySettings, local_deploy
from tests.deploy_helpers import calls_of, fake_cli, gguf_artifacts, path_with

ROOT = Path(__file__).resolve().parent.parent


def _version(tmp: Path, name: str, files: dict[str, Path]) -> dict[str, Path]:
    """A run's GGUF folder: copies of fixture files under the names a run would give them."""
    d = tmp / name
    d.mkdir()
    out = {}
    for q, src in files.items():
        out[q] = d / f"demo-{q}.gguf"
        shutil.copyfile(src, out[q])
    return out


def _settings(home: Path, **kw) -> LocalDeploySettings:
    return LocalDeploySettings(lmstudio_home=str(home), lms_path=None, ollama_enabled=False, **kw)


def test_symlink_backup_and_rollback(tmp_path, llama_ggufs, monkeypatch):
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # no lms here
    home = tmp_path / "lmstudio"
    v1 = _version(tmp_path, "v1", {"Q4_K_M": llama_ggufs["Q4_K_M"], "Q8_0": llama_ggufs["Q8_0"]})
    v2 = _version(
        tmp_path, "v2", {"Q4_K_M": llama_ggufs["Q5_K_M"], "Q8_0": llama_ggufs["Q8_0"]}
    )  # a different Q4_K_M file
    out = tmp_path / "out"
    local_deploy(gguf_artifacts(v1), _settings(home), "demo", out)
    repo = home / "models" / "loraship" / "demo-GGUF"
    dest = repo / "demo-Q4_K_M.gguf"
    assert dest.is_symlink() and dest.resolve() == v1["Q4_K_M"].resolve()
    rec = json.loads((out / "lmstudio.json").read_text())
    assert rec["files"]["demo-Q4_K_M.gguf"]["action"] == "placed" and rec["backup"] is None
    assert "not on PATH" in rec["lms"]["skipped"]

    local_deploy(gguf_artifacts(v2), _settings(home), "demo", out)
    rec = json.loads((out / "lmstudio.json").read_text())
    assert rec["files"]["demo-Q4_K_M.gguf"]["action"] == "replaced"
    assert rec["files"]["demo-Q8_0.gguf"]["action"] == "replaced"  # a link to another run's file
    assert sha256_file(dest) == sha256_file(v2["Q4_K_M"])
    backups = lmstudio.list_backups(home, "loraship", "demo")
    assert len(backups) == 1 and not str(backups[0]).startswith(str(home / "models"))  # LM Studio must not list backups
    assert (backups[0] / "demo-Q4_K_M.gguf").resolve() == v1["Q4_K_M"].resolve()

    # Roll back with the command a user would run.
    proc = subprocess.run(
        [sys.executable, "-m", "tasks.local.lmstudio", "rollback", "--home", str(home), "--model", "demo"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert sha256_file(dest) == sha256_file(v1["Q4_K_M"])
    after = lmstudio.list_backups(home, "loraship", "demo")
    assert len(after) == 1 and after[0].name.endswith("before-rollback")
    assert sha256_file(after[0] / "demo-Q4_K_M.gguf") == sha256_file(v2["Q4_K_M"])  # the rollback can be undone


def test_unchanged_copy_hardlink_and_models_folder_from_settings(tmp_path, llama_ggufs, monkeypatch):
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    home = tmp_path / "lmstudio"
    home.mkdir()
    elsewhere = tmp_path / "big-disk" / "models"
    (home / "settings.json").write_text(json.dumps({"downloadsFolder": str(elsewhere)}))
    v1 = _version(tmp_path, "v1", {"Q4_K_M": llama_ggufs["Q4_K_M"]})
    out = tmp_path / "out"
    local_deploy(
        gguf_artifacts(v1),
        _settings(home, link_mode="copy", system_prompt="Be brief.", context_length=256),
        "demo",
        out,
    )
    dest = elsewhere / "loraship" / "demo-GGUF" / "demo-Q4_K_M.gguf"
    assert dest.is_file() and not dest.is_symlink() and sha256_file(dest) == sha256_file(v1["Q4_K_M"])
    defaults = json.loads(
        (
            home
            / ".internal"
            / "user-concrete-model-default-config"
            / "loraship"
            / "demo-GGUF"
            / "demo-Q4_K_M.gguf.json"
        ).read_text()
    )
    assert {"key": "llm.load.contextLength", "value": 256} in defaults["load"]["fields"]
    assert {"key": "llm.prediction.systemPrompt", "value": "Be brief."} in defaults["operation"]["fields"]

    dest.unlink()
    local_deploy(gguf_artifacts(v1), _settings(home, link_mode="hardlink"), "demo", out)
    assert os.path.samefile(dest, v1["Q4_K_M"])
    local_deploy(gguf_artifacts(v1), _settings(home, link_mode="hardlink"), "demo", out)
    assert json.loads((out / "lmstudio.json").read_text())["files"]["demo-Q4_K_M.gguf"]["action"] == "unchanged"
    assert lmstudio.list_backups(home, "loraship", "demo") == []


def test_lms_cli_loads_with_identifier(tmp_path, llama_ggufs, monkeypatch):
    bin_dir = tmp_path / "bin"
    lms = fake_cli(bin_dir, "lms", output="Server: ON (port: 1234)")
    monkeypatch.setenv("PATH", path_with(bin_dir))
    arts = local_deploy(gguf_artifacts(llama_ggufs), _settings(tmp_path / "home"), "demo", tmp_path / "out")
    calls = calls_of(lms)
    assert calls[0].startswith("load loraship/demo-GGUF/") and "Q4_K_M.gguf --identifier demo-q4_k_m --yes" in calls[0]
    assert calls[1] == "server status"
    lmrec = next(a for a in arts if a.name == "local:lmstudio")
    assert lmrec.meta["lms"]["load_rc"] == 0 and "Server: ON" in lmrec.meta["lms"]["server_status"]
    assert "F16" not in " ".join(lmrec.meta["files"])  # quantized files only by default


def test_ollama_modelfile_and_create(tmp_path, llama_ggufs, monkeypatch):
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    s = LocalDeploySettings(
        lmstudio_enabled=False,
        system_prompt="You answer colors.",
        context_length=512,
        ollama_parameters={"temperature": 0.2},
    )
    arts = local_deploy(gguf_artifacts(llama_ggufs), s, "demo", tmp_path / "out")
    text = (tmp_path / "out" / "ollama" / "Modelfile").read_text()
    assert f"FROM {llama_ggufs['Q4_K_M'].resolve()}" in text or f"FROM {llama_ggufs['Q4_K_M']}" in text
    # the ChatML family's Go template (tasks/chat/families.py), detected from the GGUF's template
    assert "<|im_start|>{{ .Role }}\n{{ .Content }}" in text and "range $i, $m := .Messages" in text
    assert (
        'SYSTEM """You answer colors."""' in text
        and "PARAMETER num_ctx 512" in text
        and "PARAMETER temperature 0.2" in text
    )
    assert 'PARAMETER stop "<|im_end|>"' in text
    rec = arts[0].meta
    assert rec["chat_format"] == "chatml" and "ollama create demo:q4_k_m -f" in rec["create"]["skipped"]

    bin_dir = tmp_path / "bin"
    ollama = fake_cli(bin_dir, "ollama", output="success")
    monkeypatch.setenv("PATH", path_with(bin_dir))
    arts = local_deploy(gguf_artifacts(llama_ggufs), s, "demo", tmp_path / "out")
    assert calls_of(ollama) == [f"create demo:q4_k_m -f {tmp_path / 'out' / 'ollama' / 'Modelfile'}"]
    assert arts[0].meta["create"]["rc"] == 0

    fake_cli(bin_dir, "ollama", output="Error: could not connect to ollama app", rc=1)
    with pytest.raises(PermanentError, match="ollama serve"):
        local_deploy(gguf_artifacts(llama_ggufs), s, "demo", tmp_path / "out")


def test_dry_run_touches_nothing_outside_the_run(tmp_path, llama_ggufs, monkeypatch):
    bin_dir = tmp_path / "bin"
    ollama = fake_cli(bin_dir, "ollama")
    lms = fake_cli(bin_dir, "lms")
    monkeypatch.setenv("PATH", path_with(bin_dir))
    home = tmp_path / "home"
    arts = local_deploy(
        gguf_artifacts(llama_ggufs),
        LocalDeploySettings(lmstudio_home=str(home)),
        "demo",
        tmp_path / "out",
        dry_run=True,
    )
    assert not home.exists() and calls_of(ollama) == [] and calls_of(lms) == []
    plan = json.loads((tmp_path / "out" / "lmstudio.json").read_text())
    assert plan["dry_run"] and all(f["action"] == "would place" for f in plan["files"].values())
    assert (tmp_path / "out" / "ollama" / "Modelfile").is_file() and arts[1].meta["create"]["skipped"].startswith(
        "dry run"
    )


def test_rollback_without_backups_says_so(tmp_path):
    with pytest.raises(PermanentError, match="no LM Studio backups"):
        lmstudio.rollback(tmp_path, "loraship", "demo")
