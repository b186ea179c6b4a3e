"""quantization.split_max_size: llama.cpp split shards written by gguf-py, checked, loaded by llama.cpp."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from flows.config import parse_config
from tasks.core.artifacts import Artifact
from tasks.core.errors import ConfigError, PermanentError
from tasks.gguf.quantize import QuantizeSettings
from tasks.gguf.split import first_shard, parse_size, split_gguf
from tests.gguf_helpers import tiny_gguf_meta


def _artifact(paths: dict[str, Path], quant: str) -> Artifact:
    meta = tiny_gguf_meta(paths)[quant]
    return Artifact.from_path(paths[quant], name=f"gguf:{quant}", kind="gguf", stage="quantize", meta=meta)


def _fields(path: Path) -> dict[str, object]:
    import gguf

    r = gguf.GGUFReader(str(path), "r")
    return {k: (f.contents(), f.types[0].name) for k, f in r.fields.items() if not k.startswith("GGUF.")}


def _tensors(path: Path) -> list[tuple[str, str, bytes]]:
    import gguf

    r = gguf.GGUFReader(str(path), "r")
    return [(t.name, t.tensor_type.name, bytes(t.data.tobytes())) for t in r.tensors]


@pytest.mark.parametrize(
    "files,quant,limit",
    [("llama_ggufs", "Q8_0", "600KB"), ("llama_ggufs", "F16", "1MB"), ("qwen2_ggufs", "Q4_K_M", "400KiB")],
)
def test_split_into_llama_cpp_shards(files, quant, limit, request, tmp_path):
    from llama_cpp import Llama

    paths = request.getfixturevalue(files)
    src = _artifact(paths, quant)
    art = split_gguf(src, limit, tmp_path, "m", generate_tokens=3)
    assert art is not None and art.kind == "gguf-split" and art.name == f"gguf-split:{quant}" and art.is_dir
    folder = Path(art.path)
    assert folder == tmp_path / f"m-{quant}"
    shards = sorted(folder.iterdir())
    n = len(shards)
    assert n >= 2 and [p.name for p in shards] == [f"m-{quant}-{i:05d}-of-{n:05d}.gguf" for i in range(1, n + 1)]
    assert (
        art.meta["split_count"] == n
        and art.meta["first_shard"] == shards[0].name
        and art.inputs == {src.name: src.sha256}
    )
    assert {f.path for f in art.files} == {p.name for p in shards}
    max_bytes = parse_size(limit)
    assert all(p.stat().st_size <= max_bytes for p in shards)

    source_fields = _fields(Path(src.path))
    source_tensors = _tensors(Path(src.path))
    seen: list[tuple[str, str, bytes]] = []
    for i, p in enumerate(shards):
        f = _fields(p)
        assert (
            f["split.no"] == (i, "UINT16")
            and f["split.count"] == (n, "UINT16")
            and f["split.tensors.count"] == (len(source_tensors), "INT32")
        )
        if i == 0:  # the full metadata (tokenizer, chat template, hyperparameters) in the first shard
            assert {k: v for k, v in f.items() if not k.startswith("split.")} == source_fields
        else:
            assert "tokenizer.ggml.tokens" not in f
        seen += _tensors(p)
    assert seen == source_tensors  # every tensor exactly once, in order, same type and bytes

    # llama.cpp loads the model from the first shard and generates what the unsplit file generates
    def greedy(path: Path) -> list[int]:
        llm = Llama(model_path=str(path), n_ctx=64, n_threads=2, verbose=False, seed=0)
        try:
            out = []
            for tok in llm.generate(llm.tokenize(b"Hello world", add_bos=True), temp=0.0, top_k=1, reset=True):
                out.append(int(tok))
                if len(out) >= 5:
                    break
            return out
        finally:
            llm.close()

    assert greedy(first_shard(art)) == greedy(Path(src.path))
    assert len(art.meta["generation"]["tokens"]) == 3
    assert Path(src.path).is_file()  # the unsplit file is kept


def test_no_split_when_not_above_the_maximum(llama_ggufs, tmp_path):
    src = _artifact(llama_ggufs, "Q4_K_M")
    assert split_gguf(src, src.size, tmp_path, "m") is None
    assert split_gguf(src, "2GB", tmp_path, "m") is None
    assert list(tmp_path.iterdir()) == []


def test_maximum_below_the_largest_tensor_is_refused(llama_ggufs, tmp_path):
    src = _artifact(llama_ggufs, "Q8_0")
    with pytest.raises(PermanentError, match=r"cannot hold tensor .*") as exc:
        split_gguf(src, "100KB", tmp_path, "m")  # the largest Q8_0 tensor is 139 KB
    assert "quantization.split_max_size" in exc.value.message and "at least" in exc.value.hint
    assert list(tmp_path.iterdir()) == []


def test_size_setting_parsed_and_invalid_refused_at_config_load(tmp_path):
    assert (
        parse_size("500MB") == 500_000_000
        and parse_size("2GB") == 2_000_000_000
        and parse_size(" 1.5 gib ") == int(1.5 * 2**30)
    )
    assert parse_size("45gb") == 45 * 10**9 and parse_size(4096) == 4096 and parse_size("300KiB") == 300 * 1024
    assert (
        QuantizeSettings(split_max_size="45GB").split_max_size == "45GB" and QuantizeSettings().split_max_size is None
    )
    base = {"model": {"name": "m"}, "source": {"kind": "local", "path": str(tmp_path)}}
    for bad, why in (
        ("2 parsecs", "is not a size"),
        ("GB", "is not a size"),
        ("-5GB", "is not a size"),
        ("12", "too small"),
        (True, "is not a size"),
    ):
        with pytest.raises(ConfigError, match=rf"quantization.split_max_size.*{why}"):
            parse_config({**base, "quantization": {"split_max_size": bad}})
    assert parse_config({**base, "quantization": {"split_max_size": "2GB"}}).quantization.split_max_size == "2GB"


@pytest.mark.slow
def test_flow_quantize_stage_splits_big_files(prefect_api, llama_ggufs, tmp_path):
    """Through the flow runner: files above the maximum get a gguf-split artifact in the manifest, smaller ones none."""
    from flows.full import full
    from tasks.core.run import RunFolder

    run_dir = tmp_path / "runs" / "tiny" / "t1"
    run = RunFolder(run_dir, "tiny", "t1").ensure()
    run.gguf_dir.mkdir(parents=True, exist_ok=True)
    f16_path = run.gguf_dir / "tiny-F16.gguf"
    shutil.copy2(llama_ggufs["F16"], f16_path)
    meta = tiny_gguf_meta(llama_ggufs)["F16"]
    run.record(
        "convert", "done", [Artifact.from_path(f16_path, name="gguf:F16", kind="gguf", stage="convert", meta=meta)]
    )
    cfg = {
        "model": {"name": "tiny", "version": "t1"},
        "source": {"kind": "local", "path": str(tmp_path / "unused")},
        "quantization": {"types": ["Q4_K_M", "Q8_0"], "generate_tokens": 1, "split_max_size": "1.2MB"},
        "pipeline": {"runs_dir": str(tmp_path / "runs"), "stages": ["quantize"]},
    }
    summary = full(config=cfg)
    stage = {s.stage: s for s in summary.stages}["quantize"]
    assert stage.status == "done", stage
    # F16 2.8 MB and Q8_0 1.5 MB are above 1.2 MB; Q4_K_M 0.86 MB is not
    assert set(stage.artifacts) == {"gguf:Q4_K_M", "gguf:Q8_0", "gguf-split:F16", "gguf-split:Q8_0"}
    manifest = run.load_manifest()
    q8 = manifest.artifacts["gguf-split:Q8_0"]
    assert q8.kind == "gguf-split" and Path(q8.path) == run.gguf_dir / "tiny-Q8_0" and q8.meta["split_count"] >= 2
    assert (run.gguf_dir / "tiny-Q8_0.gguf").is_file() and manifest.artifacts["gguf:Q8_0"].kind == "gguf"
    assert json.loads(json.dumps(q8.meta))["shards"][0]["has_metadata"] is True
    second = full(config=cfg)
    assert {s.stage: s.status for s in second.stages} == {"quantize": "cached"}
