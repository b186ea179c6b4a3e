"""hub.repos: the merged, GGUF and LoRA repos as the Hub's conventions expect them, each in one commit.

Pushed to the local Hub-compatible server (tests/hub_server.py) with the real huggingface_hub client, and read
back with it: the files each repo holds (and what it never holds), the cards' YAML (library_name, base_model,
base_model_relation, model-index) and their links to each other, one commit per repo, a resumed push, the
files a later run dropped deleted in the same commit, and a dry run's staged folders.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from pydantic import SecretStr, ValidationError

from tasks.core.artifacts import Artifact
from tasks.core.errors import PermanentError, TransientError
from tasks.publish.allowlist import scrub_local_paths
from tasks.publish.card import CardSettings, card
from tasks.publish.hub_push import HubSettings, hub_push_repos
from tests.hub_fixtures import eval_artifact, gguf_artifacts

WRITE = SecretStr("hf_write_alice")
READ = "hf_read_alice"
ALL = ["gguf", "merged", "adapter"]


def merged_artifact(folder: Path, base_dir: Path) -> Artifact:
    """A merged model folder as the merge stage leaves it: real safetensors, configs (one naming the local base
    folder, as transformers writes `_name_or_path`), tokenizer files, the chat template, and files that must
    never be published (a pickle, a marker)."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({"lm_head.weight": np.arange(64, dtype=np.float32).reshape(8, 8)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "_name_or_path": str(base_dir)}))
    (folder / "generation_config.json").write_text(json.dumps({"max_new_tokens": 32}))
    (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE"}}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}))
    (folder / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    (folder / "pytorch_model.bin").write_bytes(b"pickle")
    (folder / ".complete").write_text("")
    return Artifact.from_path(folder, name="merged", kind="merged", stage="merge", meta={"backend": "streaming"})


def adapter_with_local_base(folder: Path, base_dir: Path) -> Artifact:
    """A trainer's output folder: the adapter config names the base by its folder on the training box, peft's
    own README says the same in its YAML, trainer_state names a local checkpoint, training_args.bin is a pickle."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], "base_model_name_or_path": ""}
    cfg["base_model_name_or_path"] = str(base_dir)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    (folder / "adapter_model.safetensors").write_bytes(b"\0" * 2048)
    (folder / "README.md").write_text(f"---\nbase_model: {base_dir}\nlibrary_name: peft\n---\n# Model Card\n")
    (folder / "training_args.bin").write_bytes(b"pickle with hub_token")
    state = {"global_step": 60, "best_model_checkpoint": f"{folder}/checkpoint-60", "log_history": [{"loss": 1.5}]}
    (folder / "trainer_state.json").write_text(json.dumps(state))
    (folder / "all_results.json").write_text(json.dumps({"train_runtime": 12.0, "train_loss": 1.5}))
    files = {n: str(folder / n) for n in ("adapter_config.json", "trainer_state.json", "all_results.json")}
    return Artifact.from_path(folder, name="adapter", kind="adapter", stage="download", meta={"metadata_files": files})


@pytest.fixture
def run(tmp_path):
    base_dir = tmp_path / "boxes" / "train" / "tiny-base"
    base_dir.mkdir(parents=True)
    return {
        "ggufs": gguf_artifacts(tmp_path / "gguf"),
        "adapter": adapter_with_local_base(tmp_path / "adapter", base_dir),
        "merged": merged_artifact(tmp_path / "merged", base_dir),
        "eval": eval_artifact(tmp_path / "eval.json", {"F16": {"ppl": 9.5}, "Q4_K_M": {"ppl": 10.25, "kl_div": 0.04}}),
        "base_dir": base_dir,
    }


def _push(tmp_path: Path, hub, run, repos=ALL, token=WRITE, sub="a", space_id=None, **kw) -> dict[str, Artifact]:
    """hub_push_repos' records by repo kind."""
    made = hub_push_repos(
        run["ggufs"],
        HubSettings(endpoint=hub.url, repos=repos, **kw),
        CardSettings(),
        tmp_path / sub / "publish",
        tmp_path / sub / "reports",
        model_name="tiny",
        version="v1",
        base_model="acme/tiny-base",
        adapter=run["adapter"],
        merged=run["merged"],
        eval_report=run["eval"],
        token=token,
        space_id=space_id,
    )
    return {a.meta["repo_kind"]: a for a in made}


def _card(repo_id: str, hub):
    """The repo's README read back from the Hub and parsed as huggingface_hub parses a model card."""
    import tempfile

    from huggingface_hub import ModelCard, hf_hub_download

    with tempfile.TemporaryDirectory() as tmp:
        path = hf_hub_download(repo_id, "README.md", endpoint=hub.url, token=READ, cache_dir=tmp)
        return ModelCard(Path(path).read_text())


def _download(repo_id: str, name: str, hub, tmp_path: Path) -> Path:
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo_id, name, endpoint=hub.url, token=READ, cache_dir=str(tmp_path / "dl")))


def test_three_repos_each_in_one_commit_read_back_from_the_hub(tmp_path, hub_server, run):
    made = _push(tmp_path, hub_server, run)
    ids = {"merged": "alice/tiny", "gguf": "alice/tiny-GGUF", "adapter": "alice/tiny-LoRA"}
    assert {k: a.name for k, a in made.items()} == {
        "merged": "publish:hub:merged",
        "gguf": "publish:hub",
        "adapter": "publish:hub:adapter",
    }
    assert all(a.meta["repos"] == ids for a in made.values()), "every record knows the run's repos"
    for kind, rid in ids.items():
        repo = hub_server.state.repo(rid)
        assert len(repo.commits) == 2, f"{rid}: the initial commit and exactly one push commit"
        assert repo.tags == {"v1": repo.head.oid}
        assert made[kind].meta["commit"] == repo.head.oid and made[kind].meta["repo_id"] == rid
    merged = set(hub_server.state.repo("alice/tiny").files()) - {".gitattributes"}  # the initial commit's
    assert merged == {
        "README.md",
        "loraship.json",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "training/adapter_config.json",
        "training/trainer_state.json",
        "training/all_results.json",
    }  # fmt: skip  no pickle, no marker
    lora = set(hub_server.state.repo("alice/tiny-LoRA").files()) - {".gitattributes"}
    assert lora == {
        "README.md",
        "loraship.json",
        "adapter_config.json",
        "adapter_model.safetensors",
        "training/trainer_state.json",
        "training/all_results.json",
    }  # fmt: skip  no training_args.bin, and peft's README is replaced by the card
    gguf = set(hub_server.state.repo("alice/tiny-GGUF").files())
    assert {"tiny-F16.gguf", "tiny-Q4_K_M.gguf", "training/trainer_state.json"} <= gguf
    assert not any(f.startswith("adapter/") for f in gguf), "the LoRA repo holds the adapter: no copy in the GGUF repo"
    assert not any(f.endswith(".bin") for f in gguf | merged | lora)

    weights = _download("alice/tiny", "model.safetensors", hub_server, tmp_path)
    want = next(f.sha256 for f in run["merged"].files if f.path == "model.safetensors")
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == want

    # no local path of the training box in anything published
    base = str(run["base_dir"])
    cfg = json.loads(_download("alice/tiny-LoRA", "adapter_config.json", hub_server, tmp_path).read_text())
    assert cfg["base_model_name_or_path"] == "acme/tiny-base", "peft loads the base by its Hub id"
    config = json.loads(_download("alice/tiny", "config.json", hub_server, tmp_path).read_text())
    assert config["_name_or_path"] == "acme/tiny-base" and config["model_type"] == "llama"
    state = json.loads(_download("alice/tiny", "training/trainer_state.json", hub_server, tmp_path).read_text())
    assert state["best_model_checkpoint"] == "checkpoint-60"
    for rid in ids.values():
        for name, f in hub_server.state.repo(rid).files().items():
            if not f.lfs:
                assert base not in hub_server.state.blob(f.sha256).decode(), f"{rid}/{name} names {base}"


def test_the_cards_follow_the_hubs_conventions_and_link_each_other(tmp_path, hub_server, run):
    _push(tmp_path, hub_server, run)
    merged, gguf, lora = (_card(r, hub_server) for r in ("alice/tiny", "alice/tiny-GGUF", "alice/tiny-LoRA"))
    assert (merged.data.library_name, merged.data.base_model, merged.data.base_model_relation) == (
        "transformers",
        "acme/tiny-base",
        "finetune",
    )
    assert (gguf.data.library_name, gguf.data.base_model, gguf.data.base_model_relation) == (
        "gguf",
        "alice/tiny",
        "quantized",
    ), "the GGUFs are quantized from the merged repo"
    assert (lora.data.library_name, lora.data.base_model, lora.data.base_model_relation) == (
        "peft",
        "acme/tiny-base",
        "adapter",
    )
    results = merged.data.eval_results
    assert [(r.metric_type, r.metric_value) for r in results] == [("perplexity", 9.5)], "the F16 row: the model itself"
    assert "gguf" not in (merged.data.tags or []) and "gguf" in gguf.data.tags
    for c, this in ((merged, "alice/tiny"), (gguf, "alice/tiny-GGUF"), (lora, "alice/tiny-LoRA")):
        others = {"alice/tiny", "alice/tiny-GGUF", "alice/tiny-LoRA"} - {this}
        for other in others:
            assert f"[{other}]({hub_server.url}/{other})" in c.text, f"{this}'s card links {other}"
        assert f"**{this}** (this repo)" in c.text
    assert 'AutoModelForCausalLM.from_pretrained("alice/tiny")' in merged.text
    assert 'AutoPeftModelForCausalLM.from_pretrained("alice/tiny-LoRA")' in lora.text
    assert "llama-cli --hf-repo alice/tiny-GGUF" in gguf.text and "llama-cli" not in merged.text + lora.text


def test_an_unchanged_second_push_makes_no_commit_and_a_dropped_file_is_deleted_in_one(tmp_path, hub_server, run):
    _push(tmp_path, hub_server, run)
    before = len(hub_server.state.requests)
    again = _push(tmp_path, hub_server, run, sub="b")
    assert hub_server.state.calls("POST", r"/commit/", since=before) == []
    assert all(a.meta["uploaded"] == [] for a in again.values())

    folder = Path(run["merged"].path)
    (folder / "generation_config.json").unlink()
    run["merged"] = Artifact.from_path(folder, name="merged", kind="merged", stage="merge")
    repo = hub_server.state.repo("alice/tiny")
    commits = len(repo.commits)
    third = _push(tmp_path, hub_server, run, sub="c")
    assert third["merged"].meta["deleted"] == ["generation_config.json"]
    assert "generation_config.json" not in repo.files() and len(repo.commits) == commits + 1
    assert len(hub_server.state.repo("alice/tiny-GGUF").commits) == 2, "the unchanged GGUF repo gets no commit"


def test_adding_the_lora_repo_moves_the_adapter_out_of_the_gguf_repo_in_one_commit(tmp_path, hub_server, run):
    _push(tmp_path, hub_server, run, repos=["gguf"])
    gguf = hub_server.state.repo("alice/tiny-GGUF")
    assert "adapter/adapter_model.safetensors" in gguf.files(), "hub.include_adapter: the GGUF repo's adapter/"
    commits = len(gguf.commits)
    made = _push(tmp_path, hub_server, run, sub="b")
    assert len(gguf.commits) == commits + 1 and not any(f.startswith("adapter/") for f in gguf.files())
    assert sorted(made["gguf"].meta["deleted"]) == ["adapter/adapter_config.json", "adapter/adapter_model.safetensors"]
    assert "README.md" in made["gguf"].meta["uploaded"], "the card now links the LoRA repo, in the same commit"
    assert f"[alice/tiny-LoRA]({hub_server.url}/alice/tiny-LoRA)" in _card("alice/tiny-GGUF", hub_server).text


def test_a_failed_commit_resumes_without_sending_stored_files_again(tmp_path, hub_server, run):
    hub_server.state.fail_next("POST", r"/api/models/alice/tiny/commit/", status=500)
    with pytest.raises(TransientError):
        _push(tmp_path, hub_server, run)
    assert ("model", "alice/tiny-GGUF") not in hub_server.state.repos, "merged goes first; nothing after a failure"
    weights = next(f.sha256 for f in run["merged"].files if f.path == "model.safetensors")
    assert any(weights in r.path for r in hub_server.state.calls("PUT", r"/lfs-upload/")), "stored before the commit"
    before = len(hub_server.state.requests)
    art = _push(tmp_path, hub_server, run)  # what the stage task's retry does
    puts = [r.path for r in hub_server.state.calls("PUT", r"/lfs-upload/", since=before)]
    assert not any(weights in p for p in puts) and len(hub_server.state.repo("alice/tiny").commits) == 2
    assert art["merged"].meta["commit"] == hub_server.state.repo("alice/tiny").head.oid


def test_a_dry_run_stages_each_repos_exact_folder(tmp_path, hub_server, run):
    dry = _push(tmp_path, hub_server, run, token=None)
    assert hub_server.state.requests == [], "a dry run sends nothing"
    staged = {}
    for kind, a in dry.items():
        folder = Path(a.path)
        assert folder == Path(a.meta["staged"]) and folder.parent == tmp_path / "a" / "publish" / "hub"
        assert a.meta["dry_run"] and a.meta["reason"] == "no hub.token configured"
        staged[kind] = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        assert sorted(f.path for f in a.files) == staged[kind]
    real = _push(tmp_path, hub_server, run, sub="real")
    for kind, names in staged.items():
        assert sorted(real[kind].meta["uploaded"]) == names, kind


def test_repo_ids_and_the_merged_repo_alone(tmp_path, hub_server, run):
    made = _push(tmp_path, hub_server, run, repos=["merged"], repo_ids={"merged": "alice/tiny-chat"})
    assert list(made) == ["merged"] and made["merged"].meta["repo_id"] == "alice/tiny-chat"
    assert [r.path for r in hub_server.state.calls("POST", r"/api/repos/create")] == ["/api/repos/create"]
    assert "## This model on the Hub" not in _card("alice/tiny-chat", hub_server).text, "nothing to link"
    run["merged"] = None
    with pytest.raises(PermanentError, match="merged repo: no merged model"):
        _push(tmp_path, hub_server, run, repos=["merged"], sub="b")


def test_a_base_without_a_hub_id_is_named_never_linked(tmp_path, hub_server, run):
    """Only a local base folder is known: no card claims a base_model (the Hub would reject a relation
    without one), the GGUFs still point at the merged repo, and the LoRA card says how to load it by hand."""
    made = hub_push_repos(
        run["ggufs"],
        HubSettings(endpoint=hub_server.url, repos=ALL),
        CardSettings(base_model_name="Tiny Base 1B"),
        tmp_path / "publish",
        tmp_path / "reports",
        model_name="tiny",
        version="v1",
        base_model=str(run["base_dir"]),
        adapter=run["adapter"],
        merged=run["merged"],
        token=WRITE,
    )
    assert len(made) == 3
    merged, gguf, lora = (_card(r, hub_server) for r in ("alice/tiny", "alice/tiny-GGUF", "alice/tiny-LoRA"))
    assert merged.data.base_model is None and "base_model_relation" not in merged.data.to_dict()
    assert (gguf.data.base_model, gguf.data.base_model_relation) == ("alice/tiny", "quantized")
    assert lora.data.base_model is None and 'from_pretrained("path/to/Tiny Base 1B")' in lora.text
    cfg = json.loads(_download("alice/tiny-LoRA", "adapter_config.json", hub_server, tmp_path).read_text())
    assert "base_model_name_or_path" not in cfg, "no Hub id to put in place of the training box's folder"
    for c in (merged, gguf, lora):
        assert str(run["base_dir"]) not in c.content


def test_a_local_path_inside_a_published_text_refuses_the_push(tmp_path, hub_server, run):
    """A path the scrubbing cannot see (inside a longer string: a chat template here) is the last check's."""
    folder = Path(run["merged"].path)
    (folder / "chat_template.jinja").write_text(f"{{# exported from {run['base_dir']} #}}{{{{ messages }}}}")
    run["merged"] = Artifact.from_path(folder, name="merged", kind="merged", stage="merge")
    with pytest.raises(PermanentError, match=r"alice/tiny: staged files name local folders: chat_template.jinja"):
        hub_push_repos(
            run["ggufs"],
            HubSettings(endpoint=hub_server.url, repos=ALL),
            CardSettings(),
            tmp_path / "publish",
            tmp_path / "reports",
            model_name="tiny",
            version="v1",
            base_model=str(run["base_dir"]),
            adapter=run["adapter"],
            merged=run["merged"],
            token=WRITE,
        )
    assert hub_server.state.calls("POST", r"/commit/") == [], "refused before anything was sent"


def test_every_repo_kind_keeps_the_contract(tmp_path):
    """Conformance over HUB_REPOS: a kind has a distinct suffix, a card (library, title), a layout on the
    allow-list, and says why an empty run cannot publish it instead of failing later."""
    from tasks.publish.allowlist import repo_file_allowed
    from tasks.publish.card import REPO_LIBRARIES, REPO_TITLES
    from tasks.publish.repos import HUB_REPOS, RepoJob

    assert len({r.suffix for r in HUB_REPOS.values()}) == len(HUB_REPOS)
    for name, repo in HUB_REPOS.items():
        assert repo.name == name and repo.title and repo.description
        assert name in REPO_LIBRARIES and name in REPO_TITLES
        assert repo_file_allowed("README.md", name) and repo_file_allowed("loraship.json", name)
        assert not repo_file_allowed("training_args.bin", name) and not repo_file_allowed("training/args.bin", name)
        why = repo.unavailable(RepoJob())
        assert isinstance(why, str) and why, f"{name}: an empty run names what is missing"
        assert repo.publishable(RepoJob()) == []


def test_a_speech_models_merged_card(tmp_path):
    """A fine-tuned Whisper: the merged card is an ASR card (the pipeline usage, WER in the model-index)."""
    import yaml

    from tasks.publish.card import build_card

    ev = eval_artifact(tmp_path / "eval.json", {"merged": {"wer": 0.125, "seconds": 3.0}})
    text = build_card(
        [],
        model_name="whisper-tiny-ft",
        version="v1",
        repo_id="alice/whisper-tiny-ft",
        settings=CardSettings(pipeline_tag="automatic-speech-recognition", language=["fr"]),
        base_model="openai/whisper-tiny",
        eval_report=ev,
        kind="merged",
    )
    header = yaml.safe_load(text[4 : text.index("\n---", 4)])
    assert header["pipeline_tag"] == "automatic-speech-recognition" and header["library_name"] == "transformers"
    result = header["model-index"][0]["results"][0]
    assert result["task"]["type"] == "automatic-speech-recognition"
    assert result["metrics"] == [{"type": "wer", "value": 0.125, "name": "word error rate"}], "not the timing"
    assert 'pipeline("automatic-speech-recognition", model="alice/whisper-tiny-ft")' in text
    assert "AutoModelForCausalLM" not in text and "| word error rate | 0.125 |" in text
    lora = build_card(
        [],
        model_name="whisper-tiny-ft",
        version="v1",
        repo_id="alice/whisper-tiny-ft-LoRA",
        settings=CardSettings(pipeline_tag="automatic-speech-recognition"),
        base_model="openai/whisper-tiny",
        kind="adapter",
    )
    assert 'AutoModelForSpeechSeq2Seq.from_pretrained("openai/whisper-tiny")' in lora and "CausalLM" not in lora


def test_hub_repos_is_validated_against_the_registry():
    with pytest.raises(ValidationError, match="did you mean 'gguf'"):
        HubSettings(repos=["ggfu"])
    with pytest.raises(ValidationError, match="twice"):
        HubSettings(repos=["gguf", "gguf"])
    with pytest.raises(ValidationError, match="hub.repos is empty"):
        HubSettings(repos=[])
    with pytest.raises(ValidationError, match="unknown hub repo kind 'lora'"):
        HubSettings(repo_ids={"lora": "a/b"})
    assert HubSettings(repos=["adapter", "gguf", "merged"]).repos == ["merged", "gguf", "adapter"], "merged first"


def _space_record(run, hub, space_id: str = "alice/tiny-demo", dry_run: bool = False) -> Artifact:
    """The space stage's record as the card stage reads it (its id, page, whether it was deployed)."""
    return Artifact.from_path(
        run["eval"].path,
        name="publish:space",
        kind="publish",
        stage="space",
        meta={"space_id": space_id, "url": f"{hub.url}/spaces/{space_id}", "dry_run": dry_run},
    )


def _card_stage(tmp_path: Path, hub, run, pushed, space):
    return card(
        run["ggufs"],
        CardSettings(),
        tmp_path / "reports" / "README.md",
        model_name="tiny",
        version="v1",
        repo_id="alice/tiny-GGUF",
        base_model="acme/tiny-base",
        adapter=run["adapter"],
        eval_report=run["eval"],
        pushed=list(pushed.values()),
        endpoint=hub.url,
        token=WRITE,
        space=space,
    )


def test_the_spaces_embed_snippet_is_in_the_one_commit_and_kept_in_sync(tmp_path, hub_server, run):
    ids = ("alice/tiny", "alice/tiny-GGUF", "alice/tiny-LoRA")
    pushed = _push(tmp_path, hub_server, run, space_id="")  # the space stage runs after, with its default id
    for rid in ids:
        text = _card(rid, hub_server).text
        # a local Hub serves no <owner>-<name>.hf.space: the card embeds the Space page (the artifact's embed_url)
        assert f'<iframe src="{hub_server.url}/spaces/alice/tiny-demo"' in text, rid
        assert f"[alice/tiny-demo]({hub_server.url}/spaces/alice/tiny-demo)" in text
    made = _card_stage(tmp_path, hub_server, run, pushed, _space_record(run, hub_server))
    assert set(made.meta["cards"]) == set(ALL) and (tmp_path / "reports" / "README-merged.md").is_file()
    assert all(len(hub_server.state.repo(r).commits) == 2 for r in ids), "the deployed Space: the same cards"
    _card_stage(tmp_path, hub_server, run, pushed, _space_record(run, hub_server, dry_run=True))
    for rid in ids:
        assert len(hub_server.state.repo(rid).commits) == 3, f"{rid}: the Space did not deploy; one card commit"
        assert "iframe" not in _card(rid, hub_server).text
    _card_stage(tmp_path, hub_server, run, pushed, _space_record(run, hub_server, "alice/Tiny_Chat.v2"))
    assert f'<iframe src="{hub_server.url}/spaces/alice/Tiny_Chat.v2"' in _card("alice/tiny-LoRA", hub_server).text


def test_local_paths_are_scrubbed_from_published_json():
    data = {
        "base_model_name_or_path": "/home/u/models/base",
        "output_dir": "/home/u/runs/x/",
        "chat_template": "{{ '/' }} {% if a %}/x{% endif %}",
        "nested": [{"_name_or_path": "~/base"}, "C:\\runs\\ckpt"],
        "url": "https://huggingface.co/acme/base",
    }
    assert scrub_local_paths(data, "acme/base") == {
        "base_model_name_or_path": "acme/base",
        "output_dir": "x",
        "chat_template": "{{ '/' }} {% if a %}/x{% endif %}",
        "nested": [{"_name_or_path": "acme/base"}, "ckpt"],
        "url": "https://huggingface.co/acme/base",
    }
    assert "base_model_name_or_path" not in scrub_local_paths(data), "no Hub id: the key is dropped, not guessed"


# --- through the flow -----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.prefect
def test_the_flow_publishes_loadable_merged_and_lora_repos(tmp_path, hub_server, prefect_api, monkeypatch):
    """The demo model through download, merge, convert, quantize, hub_push and card with every repo kind:
    transformers loads the merged repo and gives the run's merged logits, peft loads the LoRA repo onto the
    base; a second run without them leaves their records superseded."""
    import shutil

    import torch
    from huggingface_hub import snapshot_download
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from flows.demo import demo_inputs
    from flows.full import full

    monkeypatch.setenv("LORASHIP_TEST_HUB_TOKEN", "hf_write_alice")
    base, adapter = demo_inputs()
    shutil.copytree(adapter, tmp_path / "adapter")
    stages = ["download", "merge", "convert", "quantize", "hub_push", "card"]

    def cfg(repos: list[str]) -> dict:
        return {
            "model": {"name": "repodemo", "version": "v1", "base_model": str(base)},
            "source": {"kind": "local", "path": str(tmp_path / "adapter")},
            "merge": {"base_model": str(base)},
            "quantization": {"types": ["Q8_0"]},
            "hub": {"token": "env:LORASHIP_TEST_HUB_TOKEN", "endpoint": hub_server.url, "repos": repos},
            "pipeline": {"runs_dir": str(tmp_path / "runs"), "stages": stages},
        }

    state = full(config=cfg(ALL), return_state=True)
    assert state.is_completed(), state.message
    run_dir = tmp_path / "runs" / "repodemo" / "v1"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert {"publish:hub", "publish:hub:merged", "publish:hub:adapter"} <= set(manifest["artifacts"])
    for rid in ("alice/repodemo", "alice/repodemo-GGUF", "alice/repodemo-LoRA"):
        assert len(hub_server.state.repo(rid).commits) == 2, f"{rid}: one push commit, the card stage added none"

    merged_dir = snapshot_download("alice/repodemo", endpoint=hub_server.url, token=READ, cache_dir=tmp_path / "dl")
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(merged_dir).eval()(ids).logits
        want = AutoModelForCausalLM.from_pretrained(run_dir / "merged").eval()(ids).logits
        assert torch.equal(got, want), "the merged repo is the run's merged model"
        lora_dir = snapshot_download(
            "alice/repodemo-LoRA", endpoint=hub_server.url, token=READ, cache_dir=tmp_path / "dl"
        )
        lora = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), lora_dir).eval()
        assert (lora(ids).logits - want).abs().max() < 1e-3, "the LoRA repo on the base gives the merged model"
    assert str(base) not in (Path(lora_dir) / "adapter_config.json").read_text()

    state = full(config=cfg(["gguf"]), return_state=True)
    assert state.is_completed(), state.message
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert "publish:hub:merged" in manifest["superseded"] and "publish:hub:merged" not in manifest["artifacts"]
