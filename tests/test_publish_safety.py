"""Nothing private or unsafe is published: the allow-list of staged files, the secret scan before any
upload, loraship.json's per-kind field allow-list (nothing machine-specific, byte-identical across
unchanged runs) and a card that never shows an absolute local path.

The training host is real (Debian's sshd + rsync on loopback, tests/sshd.py); the Hub is the local
Hub-compatible server driven by the real huggingface_hub client (tests/hub_server.py)."""

from __future__ import annotations

import json
import pickle
import socket
from pathlib import Path

import pytest

from tasks.core.errors import PermanentError
from tasks.download.stage import DownloadSettings, download
from tasks.publish.card import CardSettings
from tasks.publish.hub_push import HubSettings, hub_push
from tests.hub_fixtures import gguf_artifacts
from tests.test_download_ssh import make_run, ssh_settings

FAKE_HUB_TOKEN = "hf_" + "TrainerLeakedThisToken0123456789ab"


def _trainer_output(folder: Path) -> Path:
    """What HF Trainer + peft leave: the adapter, JSON state, and training_args.bin, a pickle of
    TrainingArguments that carries hub_token when one was set."""
    make_run(folder, big=4096)
    args = {"output_dir": "/workspace/out", "hub_token": FAKE_HUB_TOKEN, "learning_rate": 2e-4}
    (folder / "training_args.bin").write_bytes(pickle.dumps(args))
    (folder / "rng_state.pth").write_bytes(pickle.dumps({"seed": 1}))
    (folder / "README.md").write_text("---\nlibrary_name: peft\n---\n# adapter\n")
    (folder / ".complete").write_text("")
    return folder


def _stage(tmp_path: Path, adapter, ggufs, sub: str = "publish", **kw):
    return hub_push(
        ggufs,
        HubSettings(repo_id="alice/tiny-GGUF", **kw.pop("hub", {})),
        CardSettings(**kw.pop("card", {})),
        tmp_path / sub,
        tmp_path / f"{sub}-reports",
        model_name="tiny",
        version="v1",
        adapter=adapter,
        **kw,
    )


def _all_bytes(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())


def test_a_trainer_pickle_with_a_token_never_reaches_the_staged_repo(ssh_server, tmp_path):
    run = _trainer_output(tmp_path / "remote" / "out")
    adapter = download(ssh_settings(ssh_server, run), tmp_path / "run" / "adapter")
    assert not (tmp_path / "run" / "adapter" / "training_args.bin").exists(), "pickles are not even downloaded"
    ggufs = gguf_artifacts(tmp_path / "gguf")
    art = _stage(tmp_path, adapter, ggufs)
    folder = Path(art.path)
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))], names
    assert ".complete" not in {Path(n).name for n in names}
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"} <= set(names)
    assert "adapter/README.md" not in names, "peft's own README can name the local base folder: the card replaces it"
    assert "adapter/tokenizer/tokenizer.json" in names
    assert all(n.endswith(".json") for n in names if n.startswith("training/")), names
    assert FAKE_HUB_TOKEN.encode() not in _all_bytes(folder)
    # nothing about this machine or the training box: host key, hostnames, absolute paths
    published = (folder / "loraship.json").read_text() + (folder / "README.md").read_text()
    assert adapter.meta["host_key"] not in published
    assert socket.gethostname() not in published
    assert str(tmp_path) not in published and "/workspace" not in published


def test_the_pickle_is_not_staged_even_when_it_was_downloaded(tmp_path):
    """A run folder made by an older version still holds training_args.bin: it is never staged."""
    src = _trainer_output(tmp_path / "out")
    adapter = download(
        DownloadSettings(path=str(src), exclude=[]), tmp_path / "run" / "adapter"
    )  # an explicit empty exclude
    art = _stage(tmp_path, adapter, gguf_artifacts(tmp_path / "gguf"))
    assert FAKE_HUB_TOKEN.encode() not in _all_bytes(Path(art.path))


def test_the_secret_scan_refuses_a_staged_file_holding_a_resolved_token(tmp_path, hub_server, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_write_alice")
    from tasks.core.settings import SecretRef

    token = SecretRef.model_validate("env:HF_TOKEN").resolve()  # resolved by the run, as run_hub_push does
    src = _trainer_output(tmp_path / "out")
    (src / "tokenizer_config.json").write_text('{"comment": "pushed with HF_TOKEN=hf_write_alice by mistake"}')
    adapter = download(DownloadSettings(path=str(src)), tmp_path / "run" / "adapter")
    with pytest.raises(PermanentError) as err:
        _stage(tmp_path, adapter, gguf_artifacts(tmp_path / "gguf"), hub={"endpoint": hub_server.url}, token=token)
    assert "adapter/tokenizer_config.json" in str(err.value) and "hf_write_alice" not in str(err.value)
    assert hub_server.state.calls("POST", r"/commit/") == [] and hub_server.state.calls("PUT", r".") == []
    assert "alice/tiny-GGUF" not in {rid for _t, rid in hub_server.state.repos}, "refused before any Hub call"


def test_the_secret_scan_finds_token_shapes_and_private_keys(tmp_path):
    from tasks.publish.secret_scan import scan_folder

    (tmp_path / "training").mkdir()
    (tmp_path / "training" / "trainer_state.json").write_text(json.dumps({"note": "hf_" + "x" * 34}))
    (tmp_path / "README.md").write_text("-----BEGIN RSA PRIVATE KEY-----\nMIIB\n-----END RSA PRIVATE KEY-----\n")
    (tmp_path / "clean.json").write_text("{}")
    found = dict(scan_folder(tmp_path))
    assert found == {"README.md": ["private key"], "training/trainer_state.json": ["Hugging Face token"]}


def test_loraship_json_is_byte_identical_across_unchanged_runs(tmp_path):
    src = _trainer_output(tmp_path / "out")
    dest = tmp_path / "run" / "adapter"
    ggufs = gguf_artifacts(tmp_path / "gguf")
    first = _stage(tmp_path, download(DownloadSettings(path=str(src)), dest), ggufs, sub="one")
    again = download(DownloadSettings(path=str(src)), dest)  # nothing changed: method none, other timings
    ggufs_again = gguf_artifacts(tmp_path / "gguf")  # the same files, hashed anew (new records)
    second = _stage(tmp_path, again, ggufs_again, sub="two")
    a = (Path(first.path) / "loraship.json").read_bytes()
    b = (Path(second.path) / "loraship.json").read_bytes()
    assert a == b
    doc = json.loads(a)
    assert doc["published_files"] == sorted(
        p.relative_to(first.path).as_posix() for p in Path(first.path).rglob("*") if p.is_file()
    )
    adapter_entry = doc["artifacts"]["adapter"]
    assert set(adapter_entry["meta"]) <= {"training"} and "path" not in adapter_entry
    assert set(adapter_entry["files"]) == {f for f in doc["published_files"] if f.startswith("adapter/")} or all(
        ("adapter/" + f) in doc["published_files"] for f in adapter_entry["files"]
    )
    gguf_meta = doc["artifacts"]["gguf:Q4_K_M"]["meta"]
    assert "seconds" not in gguf_meta and "threads" not in gguf_meta


def _local_base(tmp_path: Path, name_or_path: str | None) -> Path:
    base = tmp_path / "models" / "my-local-base"
    base.mkdir(parents=True)
    cfg = {"architectures": ["LlamaForCausalLM"]}
    if name_or_path:
        cfg["_name_or_path"] = name_or_path
    (base / "config.json").write_text(json.dumps(cfg))
    return base


def test_the_card_names_a_local_base_by_its_hub_id_never_by_its_path(tmp_path):
    from tasks.publish.card import build_card
    from tests.hub_fixtures import adapter_artifact

    ggufs = gguf_artifacts(tmp_path / "gguf")
    base = _local_base(tmp_path, "acme/tiny-base-7b")
    adapter = adapter_artifact(tmp_path / "adapter", base=str(base))  # trained against the local folder
    card = build_card(
        ggufs,
        model_name="tiny",
        version="v1",
        repo_id="a/b",
        settings=CardSettings(),
        base_model=str(base),
        adapter=adapter,
    )
    assert str(tmp_path) not in card and "/models/" not in card
    assert "base_model: acme/tiny-base-7b" in card and "acme/tiny-base-7b" in card.split("---", 2)[2]

    nameless = _local_base(tmp_path / "b", None)
    card = build_card(
        ggufs,
        model_name="tiny",
        version="v1",
        repo_id="a/b",
        settings=CardSettings(base_model_name="Our in-house 7B"),
        base_model=str(nameless),
        adapter=adapter_artifact(tmp_path / "adapter2", base=str(nameless)),
    )
    assert str(tmp_path) not in card and "Our in-house 7B" in card
    assert "base_model:" not in card.split("---", 2)[1], "no Hub id known: no base_model metadata"


def test_a_token_in_gguf_metadata_is_found_and_tensor_data_is_not_read(tmp_path, llama_ggufs):
    import numpy as np
    from gguf import GGUFReader, GGUFWriter

    from tasks.publish.secret_scan import _gguf_metadata_end, scan_folder

    for path in llama_ggufs.values():  # the walk over the header agrees with gguf-py's reader
        assert _gguf_metadata_end(path) == GGUFReader(str(path)).data_offset
    w = GGUFWriter(str(tmp_path / "leaky.gguf"), "llama")
    w.add_string("general.source.url", "https://huggingface.co/x?token=" + FAKE_HUB_TOKEN)
    w.add_tensor("w", np.zeros((64, 64), dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert dict(scan_folder(tmp_path)) == {"leaky.gguf": ["Hugging Face token"]}
