"""evaluate: perplexity and KL-divergence from llama.cpp logits, the report files and the card's numbers."""

from __future__ import annotations

import json

import pytest

from tasks.core.errors import PermanentError
from tasks.evaluate.evaluation import EvalSettings, evaluate, load_samples
from tasks.evaluate.kl import compare
from tests.deploy_helpers import gguf_artifacts

TEXT = (
    "The cat is red. The dog is blue. The owl is yellow. Hello world! How are you today? Tell me a story about a fox."
)


def test_kl_divergence_orders_the_quants(llama_ggufs):
    same = compare(llama_ggufs["F16"], llama_ggufs["F16"], TEXT, n_ctx=128)
    assert same["kl_div"] == 0.0 and same["top1_agreement"] == 1.0 and same["ref_ppl"] == same["model_ppl"]
    q8 = compare(llama_ggufs["F16"], llama_ggufs["Q8_0"], TEXT, n_ctx=128)
    q4 = compare(llama_ggufs["F16"], llama_ggufs["Q4_K_M"], TEXT, n_ctx=128)
    assert 0 < q8["kl_div"] < q4["kl_div"]
    assert q8["ref_ppl"] == same["ref_ppl"]  # the same F16 numbers every time


def test_perplexity_windows_cover_long_text(llama_ggufs):
    # n_ctx 16 forces many windows; the result must still be finite and the KL still zero for F16 itself.
    r = compare(llama_ggufs["F16"], llama_ggufs["F16"], TEXT * 3, n_ctx=16)
    assert r["kl_div"] == 0.0 and 1 < r["ref_ppl"] < 1e6


def test_eval_report(llama_ggufs, tmp_path):
    art = evaluate(gguf_artifacts(llama_ggufs), EvalSettings(max_tokens=8, n_ctx=256), tmp_path / "eval", "demo")
    assert art.name == "report:eval" and art.kind == "report" and art.is_dir
    quants = art.meta["quants"]
    assert list(quants) == ["F16", "Q8_0", "Q5_K_M", "Q4_K_M"]  # F16 first, then by size
    assert quants["F16"]["ppl_delta"] == 0 and quants["F16"]["kl_div"] == 0
    assert 0 < quants["Q8_0"]["kl_div"] < quants["Q4_K_M"]["kl_div"]
    for row in quants.values():
        assert row["tokens_per_s"] > 0 and row["latency_p95_ms"] >= row["latency_p50_ms"] > 0 and row["peak_rss_mb"] > 0
        assert 0 <= row["accuracy"] <= 1 and row["size_mb"] > 0
    assert quants["Q4_K_M"]["size_mb"] < quants["F16"]["size_mb"]
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert len(report["results"]["Q4_K_M"]["samples"]) == len(load_samples(EvalSettings()))
    assert (tmp_path / "eval" / "quality_vs_size.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "eval" / "eval.md").read_text()
    assert "| Q4_K_M |" in md and "kl_div" in md


def test_compare_gguf_and_quant_subset(llama_ggufs, tmp_path):
    s = EvalSettings(max_tokens=4, n_ctx=128, quants=["Q4_K_M"], compare_gguf=str(llama_ggufs["Q8_0"]))
    art = evaluate(gguf_artifacts(llama_ggufs), s, tmp_path / "eval", "demo")
    assert set(art.meta["quants"]) == {"F16", "Q4_K_M", "compare"}  # F16 is kept as the reference
    assert art.meta["quants"]["compare"]["ppl"] > 0


def test_bad_samples_fail_with_the_line(tmp_path):
    bad = tmp_path / "samples.jsonl"
    bad.write_text('{"prompt": "hi", "reference": "x"}\n{"prompt": "hi", "metric": "bleu"}\n')
    with pytest.raises(PermanentError, match="samples.jsonl:2"):
        load_samples(EvalSettings(samples=str(bad)))
