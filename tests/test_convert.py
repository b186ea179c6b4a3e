"""Convert stage: llama.cpp's real converter (same commit as the runtime) on the tiny real models.

The converter tree comes from the user cache (filled once from the llama-cpp-python sdist through pip;
the sdist download itself is not repeated in the tests: it takes minutes and is network).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from tasks.core.artifacts import Artifact
from tasks.core.errors import PermanentError
from tasks.core.hashing import AppendHasher
from tasks.gguf.convert import TOKENIZER_TEXT, ConvertSettings, convert, hf_tokenize
from tasks.gguf.toolchain import KNOWN_COMMITS, resolve_converter
from tasks.gguf.validate import generate_check, llama_tokenize, read_gguf, validate_gguf
from tests.gguf_helpers import tiny_gguf_meta

SENTENCES = [TOKENIZER_TEXT, "Once upon a time, 42 owls said: 'hello'!", "system You are a helpful assistant."]


def _merged(folder: Path) -> Artifact:
    return Artifact.from_path(folder, name="merged", kind="merged", stage="merge")


def test_converter_is_the_runtime_commit():
    conv = resolve_converter()
    assert conv.script.is_file() and (conv.root / "gguf-py" / "gguf").is_dir()
    assert conv.commit == KNOWN_COMMITS["0.3.36"]
    # the converter's own gguf-py comes first on its PYTHONPATH (PyPI gguf is too old to run it)
    assert conv.env({})["PYTHONPATH"].split(":")[0] == str(conv.root / "gguf-py")


def test_checkout_setting_is_used_and_checked(tmp_path):
    conv = resolve_converter()
    fake = tmp_path / "llama.cpp"
    for name in ("convert_hf_to_gguf.py", "gguf-py", "conversion"):
        src = conv.root / name
        shutil.copytree(src, fake / name) if src.is_dir() else (
            fake.mkdir(exist_ok=True),
            shutil.copy2(src, fake / name),
        )
    got = resolve_converter(str(fake))
    assert got.origin == "checkout" and got.root == fake.resolve()
    got_env = resolve_converter(environ={"LLAMA_CPP_DIR": str(fake)})
    assert got_env.origin == "checkout"
    with pytest.raises(PermanentError, match="convert.llama_cpp_dir=.* is not a llama.cpp checkout"):
        resolve_converter(str(tmp_path / "nothing"))


@pytest.mark.slow
def test_llama_sentencepiece_converts_with_chat_template_and_same_tokens(llama_ggufs, llama_base):
    f16 = llama_ggufs["F16"]
    info = read_gguf(f16)
    assert info["architecture"] == "llama"
    assert info["tokenizer_model"] == "llama"  # SentencePiece vocabulary
    assert info["has_chat_template"]
    assert set(info["tensor_types"]) == {"F16", "F32"}
    meta = tiny_gguf_meta(llama_ggufs)["F16"]
    assert meta["llama_cpp_commit"] == KNOWN_COMMITS["0.3.36"]
    assert meta["tokenizer_check"]["matches"] is True
    for text in SENTENCES:
        assert llama_tokenize(f16, text) == hf_tokenize(llama_base, text), text


@pytest.mark.slow
def test_output_is_hashed_while_written_and_both_runtime_checks_share_one_load(llama_base, tmp_path):
    art = convert(_merged(llama_base), ConvertSettings(), tmp_path, "h")
    f16 = tmp_path / "h-F16.gguf"
    assert art.meta["hashed_while_writing"] is True
    assert art.sha256 == art.files[0].sha256 == hashlib.sha256(f16.read_bytes()).hexdigest()
    assert art.meta["tokenizer_check"]["matches"] is True
    assert art.meta["generation"] == generate_check(f16)  # what a load of its own generates
    assert len(art.meta["generation"]["tokens"]) == 4


def _append_slowly(path: Path, parts: list[bytes], pause: float = 0.01) -> None:
    with open(path, "wb") as fh:
        for part in parts:
            fh.write(part)
            fh.flush()
            time.sleep(pause)


def test_append_hasher_follows_a_growing_file_and_refuses_what_it_cannot_vouch_for(tmp_path):
    parts = [os.urandom(300_000) for _ in range(12)]
    whole = b"".join(parts)
    grown = tmp_path / "grown.gguf"
    hasher = AppendHasher(grown, poll_s=0.002).start()  # started before the writer creates the file
    writer = threading.Thread(target=_append_slowly, args=(grown, parts))
    writer.start()
    writer.join()
    assert hasher.finish() == hashlib.sha256(whole).hexdigest()

    # a writer that starts over (truncates) is not append-only: no digest, the caller hashes the file
    redone = tmp_path / "redone.gguf"
    redone.write_bytes(whole)
    hasher = AppendHasher(redone, poll_s=0.002).start()
    deadline = time.monotonic() + 10
    while hasher.done < len(whole) and time.monotonic() < deadline:
        time.sleep(0.005)
    _append_slowly(redone, parts[:3])
    time.sleep(0.05)
    assert hasher.finish() is None

    # another file renamed over the followed one: not the inode that was hashed
    swapped = tmp_path / "swapped.gguf"
    swapped.write_bytes(whole)
    hasher = AppendHasher(swapped, poll_s=0.002).start()
    other = tmp_path / "other"
    other.write_bytes(whole)
    while hasher.done < len(whole) and time.monotonic() < deadline:
        time.sleep(0.005)
    os.replace(other, swapped)
    assert hasher.finish() is None


@pytest.mark.slow
def test_qwen2_bpe_needs_vocab_pre_and_then_tokenizes_like_hf(qwen2_ggufs, qwen2_base, tmp_path):
    info = read_gguf(qwen2_ggufs["F16"])
    assert info["architecture"] == "qwen2" and info["tokenizer_model"] == "gpt2"
    assert info["tokenizer_pre"] == "qwen2"
    for text in SENTENCES:
        assert llama_tokenize(qwen2_ggufs["F16"], text) == hf_tokenize(qwen2_base, text), text
    # without vocab_pre the converter refuses the unknown hash; our error names the setting
    with pytest.raises(PermanentError) as err:
        convert(_merged(qwen2_base), ConvertSettings(check_tokenizer=False), tmp_path, "q")
    assert "BPE pre-tokenizer was not recognized" in str(err.value) and "convert.vocab_pre" in str(err.value)
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".partial-*"))


@pytest.mark.slow
def test_wrong_vocab_pre_is_caught_by_the_tokenizer_check(qwen2_base, tmp_path):
    # gpt-2's pre-tokenizer keeps ' 12' together; the Qwen2 tokenizer splits digits: the check sees it
    with pytest.raises(PermanentError, match="tokenizes .* differently from the HF tokenizer") as err:
        convert(_merged(qwen2_base), ConvertSettings(vocab_pre="gpt-2"), tmp_path, "q")
    assert "convert.vocab_pre" in str(err.value)
    assert not (tmp_path / "q-F16.gguf").exists()


@pytest.mark.slow
def test_unsupported_architecture_is_named(llama_base, tmp_path):
    model = tmp_path / "weird"
    shutil.copytree(llama_base, model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["architectures"] = ["FrobnicatorForCausalLM"]
    (model / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PermanentError, match="FrobnicatorForCausalLM"):
        convert(_merged(model), ConvertSettings(), tmp_path / "out", "w")


def test_not_a_model_folder_fails_before_work(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "x.txt").write_text("x")
    with pytest.raises(PermanentError, match="config.json"):
        convert(_merged(tmp_path / "m"), ConvertSettings(), tmp_path / "out", "x")


def test_truncated_gguf_is_refused(llama_ggufs, tmp_path):
    src = llama_ggufs["Q8_0"]
    data = src.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 4096])
    validate_gguf(src)  # the intact file passes
    with pytest.raises(PermanentError, match="truncated|not a readable GGUF"):
        validate_gguf(cut)
    head = tmp_path / "head.gguf"
    head.write_bytes(data[:100])
    with pytest.raises(PermanentError, match="not a readable GGUF|truncated"):
        validate_gguf(head)


def test_every_file_generates_text(llama_ggufs, qwen2_ggufs):
    for files in (llama_ggufs, qwen2_ggufs):
        assert set(files) == {"F16", "Q8_0", "Q4_K_M", "Q5_K_M"}
        for quant, path in files.items():
            out = generate_check(path, prompt="Hello", n_tokens=4)
            assert len(out["tokens"]) == 4, quant


@pytest.mark.slow
def test_lora_adapter_alone_converts_and_changes_llama_cpp_logits(llama_ggufs, llama_base, llama_adapter, tmp_path):
    import numpy as np
    from llama_cpp import Llama

    from tasks.gguf.convert import convert_lora

    adapter = Artifact.from_path(llama_adapter, name="adapter", kind="adapter", stage="download")
    lora = convert_lora(adapter, llama_base, ConvertSettings(), tmp_path, "tiny")
    assert (
        lora.name == "gguf-lora:F16" and lora.kind == "gguf-lora" and lora.meta["tensor_count"] == 28
    )  # 7 targets x 2 layers x (A, B)
    assert lora.meta["llama_cpp_commit"] == KNOWN_COMMITS["0.3.36"]

    def last_logits(**kw) -> np.ndarray:
        llm = Llama(model_path=str(llama_ggufs["F16"]), n_ctx=64, verbose=False, logits_all=True, **kw)
        toks = llm.tokenize(b"Hello world", add_bos=True)
        llm.eval(toks)
        out = np.array(llm.scores[len(toks) - 1])
        llm.close()
        return out

    plain, adapted = last_logits(), last_logits(lora_path=lora.path)
    assert np.abs(plain - adapted).max() > 1e-3  # llama.cpp loaded and applied the converted adapter


def test_special_tokens_survive_conversion(llama_ggufs, qwen2_ggufs, llama_base, qwen2_base):
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    for files, base in ((llama_ggufs, llama_base), (qwen2_ggufs, qwen2_base)):
        hf = AutoTokenizer.from_pretrained(str(base))
        llm = Llama(model_path=str(files["Q8_0"]), vocab_only=True, verbose=False)
        for special in ("<|im_start|>", "<|im_end|>"):
            ids = llm.tokenize(special.encode(), add_bos=False, special=True)
            assert ids == [hf.convert_tokens_to_ids(special)], (base.name, special, ids)
        llm.close()


def test_disk_preflight_refuses_before_work(tmp_path):
    import shutil as _shutil

    from tasks.core.disk import disk_preflight

    disk_preflight(tmp_path, 1024, "small.gguf")  # fits
    free = _shutil.disk_usage(tmp_path).free
    with pytest.raises(PermanentError, match="not enough disk space .* for huge.gguf"):
        disk_preflight(tmp_path, free * 2, "huge.gguf")
