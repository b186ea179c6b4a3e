"""The download sources registry (tasks/download/sources/): the contract every entry keeps, config
validation reading the registry, and the local source's rules (no recursive search, no outward links)."""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

import pytest

from tasks.core.errors import ConfigError, PermanentError
from tasks.download.settings import DownloadSettings
from tasks.download.sources import SOURCES, Source
from tasks.download.stage import download

ROOT = Path(__file__).resolve().parents[1]
MINIMAL = {"local": {"path": "/somewhere"}, "ssh": {"host": "box"}, "vastai": {"instance_id": 1}}


@pytest.mark.parametrize("name", SOURCES.names())
def test_every_source_keeps_the_contract(name):
    source = SOURCES[name]
    assert isinstance(source, Source) and source.name == name and source.description
    settings = DownloadSettings(kind=name, **MINIMAL.get(name, {}))  # validates through the entry's check()
    assert source.check(settings) == []
    bare = settings.model_copy(update={"path": "", "host": None, "host_block": None, "instance_id": None})
    problems = source.check(bare)
    assert all(isinstance(p, str) and p for p in problems)
    ok, why = source.available(settings)
    assert isinstance(ok, bool) and isinstance(why, str) and (ok or why)
    params = list(inspect.signature(source.fetch).parameters)
    assert params[:2] == ["settings", "dest"] and "on_bytes" in params
    readme = (ROOT / "README.md").read_text()
    assert f"`{name}`" in readme.split("### download", 1)[1].split("### merge", 1)[0], "documented in the README"


@pytest.mark.parametrize("name", [n for n in SOURCES.names() if MINIMAL.get(n)])
def test_a_missing_required_setting_names_the_field(name):
    from flows.config import parse_config

    with pytest.raises(ConfigError) as err:
        parse_config({"model": {"name": "m"}, "source": {"kind": name}})
    assert "source." in str(err.value)


def test_an_unknown_kind_lists_the_registered_sources():
    from flows.config import parse_config

    with pytest.raises(ConfigError) as err:
        parse_config({"model": {"name": "m"}, "source": {"kind": "sssh", "host": "x"}})
    text = str(err.value)
    assert "source.kind" in text and "did you mean 'ssh'" in text and "unknown download source" in text
    assert all(n in text for n in SOURCES.names())


class EchoSource(Source):
    """A source added from outside the package (what a user's plugin would do): copies one JSON file."""

    name = "echo"
    description = "test source"

    def check(self, settings):
        return [] if settings.path else ["source.path is required for kind: echo"]

    def fetch(self, settings, dest, *, on_bytes=None):
        from tasks.core.artifacts import Artifact

        dest.mkdir(parents=True, exist_ok=True)
        (dest / "adapter_config.json").write_text(json.dumps({"from": settings.path}))
        return Artifact.from_path(dest, name="adapter", kind="adapter", stage="download")


def test_a_registered_source_validates_and_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(SOURCES, "_entries", dict(SOURCES._entries))  # registered for this test only
    SOURCES.register(EchoSource())
    art = download(DownloadSettings(kind="echo", path="p"), tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text()) == {"from": "p"}
    assert art.name == "adapter"
    with pytest.raises(ValueError, match="source.path is required for kind: echo"):
        DownloadSettings(kind="echo")


def _adapter(folder: Path, marker: str = "x") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "m": marker}))
    (folder / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    return folder


def test_local_source_takes_a_checkpoint_child_but_never_searches_deeper(tmp_path):
    out = tmp_path / "out"
    _adapter(out / "checkpoint-5", "five")
    _adapter(out / "checkpoint-40", "forty")
    art = download(DownloadSettings(path=str(out)), tmp_path / "a" / "adapter")
    assert art.meta["selected"] == "checkpoint" and art.meta["source"].endswith("checkpoint-40")

    deep = tmp_path / "home"
    _adapter(deep / "projects" / "secret-run")  # two levels down: not found
    with pytest.raises(PermanentError, match="not searched"):
        download(DownloadSettings(path=str(deep)), tmp_path / "b" / "adapter")


def test_local_source_refuses_links_that_leave_the_run_folder(tmp_path):
    outside = tmp_path / "private.txt"
    outside.write_text("not yours")
    run = _adapter(tmp_path / "run")
    (run / "notes.txt").symlink_to(outside)
    with pytest.raises(PermanentError, match="symlink pointing outside"):
        download(DownloadSettings(path=str(run)), tmp_path / "x" / "adapter")
    (run / "notes.txt").unlink()
    (run / "tokenizer.json").write_text("{}")
    (run / "tok-link.json").symlink_to(run / "tokenizer.json")  # inside the run: copied as a file
    os.mkfifo(run / "a-fifo")  # not a regular file: skipped, never read
    art = download(DownloadSettings(path=str(run)), tmp_path / "y" / "adapter")
    assert {f.path for f in art.files} == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "tok-link.json",
    }
    assert not (tmp_path / "y" / "adapter" / "tok-link.json").is_symlink()
