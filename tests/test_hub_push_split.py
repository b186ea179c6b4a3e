"""A quant split into shards (quantization.split_max_size) is published as its shard folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.core.artifacts import Artifact
from tasks.publish.card import CardSettings
from tasks.publish.hub_push import HubSettings, hub_push

pytestmark = pytest.mark.slow


def test_dry_run_stages_shards_instead_of_the_single_file(llama_ggufs, tmp_path):
    from tasks.gguf.split import split_gguf

    q8 = Artifact.from_path(
        llama_ggufs["Q8_0"], name="gguf:Q8_0", kind="gguf", stage="quantize", meta={"quant": "Q8_0"}
    )
    q4 = Artifact.from_path(
        llama_ggufs["Q4_K_M"], name="gguf:Q4_K_M", kind="gguf", stage="quantize", meta={"quant": "Q4_K_M"}
    )
    split = split_gguf(q8, "600KB", tmp_path / "gguf", "tiny")
    assert split is not None and len(split.files) >= 2
    art = hub_push(
        [q8, q4],
        HubSettings(),
        CardSettings(),
        tmp_path / "publish",
        tmp_path / "reports",
        model_name="tiny",
        version="v1",
        dry_run=True,
        splits=[split],
    )
    staged = Path(art.meta["staged"])
    shard_dir = staged / Path(split.path).name
    assert sorted(p.name for p in shard_dir.iterdir()) == sorted(f.path for f in split.files)
    assert not (staged / Path(q8.path).name).exists(), "the unsplit file is not published when shards exist"
    assert (staged / Path(q4.path).name).exists(), "quants that were not split are published as files"
    published = {f.path: f.sha256 for f in art.files}
    for f in split.files:
        assert published[f"{shard_dir.name}/{f.path}"] == f.sha256
    # the card's file table names what the repo holds: the first shard in its folder, not the unsplit file
    card = (staged / "README.md").read_text()
    first = f"{shard_dir.name}/{split.meta['first_shard']}"
    assert f"[{first}](" in card and f"/tree/main/{shard_dir.name})" in card
    assert f"first of {len(split.files)} shards" in card
    assert f"[{Path(q8.path).name}](" not in card
    assert f"[{Path(q4.path).name}](" in card
