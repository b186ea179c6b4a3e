"""evaluate: perplexity and KL-divergence as llama-perplexity computes them, the report files and the card's numbers.

The comparison with llama.cpp's own `llama-perplexity` runs the real tool, built from the vendored llama.cpp
source of the installed llama-cpp-python (`./setup.sh --test` builds it once; tasks/gguf/llama_tools.py).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tasks.core.errors import PermanentError
from tasks.evaluate.evaluation import EvalSettings, evaluate, load_samples
from tasks.evaluate.kl import KlSums, encode_base, read_base_header, row_width, scored_per_chunk
from tasks.evaluate.windows import plan_windows
from tasks.evaluate.worker import score_against, score_reference
from tests.deploy_helpers import gguf_artifacts

HELDOUT = (Path(__file__).resolve().parents[1] / "tasks" / "data" / "heldout.txt").read_text()


def _score_all(ggufs: dict[str, Path], text: str, n_ctx: int, work: Path) -> dict[str, dict]:
    ref = work / "base.kld"
    out = {"F16": score_reference(str(ggufs["F16"]), text, n_ctx, ref)}
    for q in ("Q8_0", "Q5_K_M", "Q4_K_M"):
        out[q] = score_against(str(ggufs[q]), ref)
    return out


def test_kl_divergence_orders_the_quants(llama_ggufs, tmp_path):
    r = _score_all(llama_ggufs, HELDOUT * 4, 128, tmp_path)
    same = score_against(str(llama_ggufs["F16"]), tmp_path / "base.kld")
    assert same["kl_div"] < 1e-6 and same["top1_agreement"] == 1.0  # F16 against itself (up to uint16 storage)
    assert 0 < r["Q8_0"]["kl_div"] < r["Q5_K_M"]["kl_div"] < r["Q4_K_M"]["kl_div"]
    for q in ("Q8_0", "Q5_K_M", "Q4_K_M"):
        assert r[q]["ref_ppl"] == pytest.approx(r["F16"]["ppl"], rel=1e-4)  # the same F16 numbers every time
        assert 0 < r[q]["kl_div_se"] < r[q]["kl_div"] <= r[q]["kl_div_p99"] <= r[q]["kl_div_max"]
        assert r[q]["scored_tokens"] == r["F16"]["scored_tokens"] == 7 * scored_per_chunk(128)


def test_windows_are_llama_perplexitys():
    w = plan_windows(list(range(1000)), 128)
    assert (w.n_ctx, w.n_chunk) == (128, 7)  # 1000 // 128; the remainder is dropped
    assert list(w.chunk(1)[:2]) == [128, 129]
    assert list(w.targets(0)) == list(range(65, 128))  # positions 64..126 predict tokens 65..127
    short = plan_windows(list(range(100)), 512)  # shorter than two windows: half its length
    assert (short.n_ctx, short.n_chunk) == (50, 2)
    with pytest.raises(ValueError, match="at least"):
        plan_windows(list(range(20)), 512)


def test_chunked_kl_equals_a_float64_computation():
    """The row-block code against the textbook formula on the same stored reference (KL, NLL, top-1)."""
    rng = np.random.default_rng(0)
    n, vocab = 77, 1001  # odd vocabulary: the padded row width
    ref_logits = rng.normal(0, 3, (n, vocab)).astype(np.float32)
    q_logits = (ref_logits + rng.normal(0, 0.3, (n, vocab))).astype(np.float32)
    targets = rng.integers(0, vocab, n)
    rows, nll_ref = encode_base(ref_logits, targets)
    assert rows.shape == (n, row_width(vocab)) == (n, 1006)
    sums = KlSums()
    sums.add(q_logits[:40], rows[:40], targets[:40])  # two chunks, as the worker feeds them
    sums.add(q_logits[40:], rows[40:], targets[40:])
    got = sums.report()

    def log_softmax(x):
        x = x.astype(np.float64)
        return x - x.max(1, keepdims=True) - np.log(np.exp(x - x.max(1, keepdims=True)).sum(1, keepdims=True))

    lp, lq = log_softmax(ref_logits), log_softmax(q_logits)
    keep = lp > lp.max(1, keepdims=True) - 16  # llama-perplexity's 16-nat window of the reference
    kl = np.where(keep, np.exp(lp) * (lp - lq), 0).sum(1)
    assert got["kl_div"] == pytest.approx(kl.mean(), rel=2e-3)  # uint16 storage of the reference
    assert got["kl_div_se"] == pytest.approx(kl.std() / np.sqrt(n - 1), rel=2e-2)
    assert got["kl_div_p99"] == pytest.approx(np.percentile(kl, 99), rel=5e-3)
    assert got["top1_agreement"] == pytest.approx((lp.argmax(1) == lq.argmax(1)).mean())
    nll_q = -lq[np.arange(n), targets]
    assert got["ppl"] == pytest.approx(np.exp(nll_q.mean()), rel=1e-5)
    assert nll_ref == pytest.approx(-lp[np.arange(n), targets], rel=1e-5)
    assert got["ppl_ratio"] == pytest.approx(np.exp(nll_q.mean() + lp[np.arange(n), targets].mean()), rel=2e-3)


def _llama_perplexity(*args: str, expect: str) -> str:
    """Run the tool; its last lines come from llama.cpp's background log thread, which on a busy machine can lose
    them at exit (seen here under load: three runs in a row while llama-cpp-python compiled beside them), so a
    run whose output lacks `expect` is repeated, up to six times."""
    from tasks.gguf.llama_tools import llama_tool

    tool = llama_tool("llama-perplexity", build=False)  # ./setup.sh --test built it
    for _ in range(6):
        out = subprocess.run([str(tool), *args], capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
        if re.search(expect, out.stdout + out.stderr):
            break
    return out.stdout + out.stderr


def _num(pattern: str, text: str) -> tuple[float, float]:
    m = re.search(pattern + r"\s*:?\s*([-\d.]+)\s*(?:±|\+/-)\s*([-\d.]+)", text)
    assert m, f"{pattern!r} not in llama-perplexity's output:\n{text[-3000:]}"
    return float(m[1]), float(m[2])


def test_numbers_match_llama_perplexity(llama_ggufs, tmp_path):
    """Same files, text and context as llama.cpp's own tool: PPL within 2%, KLD within 3 standard errors (or 3%).

    Also both ways of the reference file: llama-perplexity reads ours, and its own tokens equal ours.
    """
    text = tmp_path / "heldout.txt"
    text.write_text(HELDOUT * 4)
    ours = _score_all(llama_ggufs, text.read_text(), 128, tmp_path)
    theirs_base = tmp_path / "lp-base.kld"
    out = _llama_perplexity("-m", str(llama_ggufs["F16"]), "-f", str(text), "-c", "128", "-t", "2",
                            "--kl-divergence-base", str(theirs_base), expect="Final estimate")  # fmt: skip
    lp_ppl, _ = _num(r"Final estimate: PPL =", out)
    assert ours["F16"]["ppl"] == pytest.approx(lp_ppl, rel=0.02)
    np.testing.assert_array_equal(read_base_header(theirs_base).tokens, read_base_header(tmp_path / "base.kld").tokens)
    for q in ("Q8_0", "Q5_K_M", "Q4_K_M"):
        for base in (theirs_base, tmp_path / "base.kld"):  # its reference, and ours read by the tool
            out = _llama_perplexity("-m", str(llama_ggufs[q]), "-c", "128", "-t", "2", "--kl-divergence",
                                    "--kl-divergence-base", str(base), expect=r"Same top p:")  # fmt: skip
            kld, kld_se = _num(r"Mean\s+KLD", out)
            ppl_q, _ = _num(r"Mean PPL\(Q\)", out)
            ratio, _ = _num(r"Mean PPL\(Q\)/PPL\(base\)", out)
            m = ours[q]
            assert abs(m["kl_div"] - kld) <= max(3 * kld_se, 0.03 * kld), (q, m["kl_div"], kld, kld_se)
            assert m["ppl"] == pytest.approx(ppl_q, rel=0.02) and m["ppl_ratio"] == pytest.approx(ratio, rel=0.02)
            p99 = float(re.search(r"99\.0%\s+KLD:\s*([\d.]+)", out)[1])
            assert m["kl_div_p99"] == pytest.approx(p99, rel=0.1)


@pytest.mark.slow
def test_long_heldout_text(llama_ggufs, tmp_path):
    """A user's held-out text of 100k+ tokens: scored in full (no cap), reference file on disk, chunk by chunk.

    (Memory that stays flat as the text grows is measured in benchmarks/eval_bench.py.)"""
    words = HELDOUT.split()
    rng = np.random.default_rng(1)
    text = " ".join(rng.choice(words, 36_000))  # shuffled words: ~3 tokens each for this tokenizer
    ref = tmp_path / "base.kld"
    f16 = score_reference(str(llama_ggufs["F16"]), text, 128, ref, threads=1)
    assert f16["heldout_tokens"] >= 100_000 and f16["ppl_chunks"] >= 100_000 // 128
    q = score_against(str(llama_ggufs["Q4_K_M"]), ref, threads=1)
    assert q["scored_tokens"] == f16["scored_tokens"] == f16["ppl_chunks"] * 63 and 0 < q["kl_div"] < 1
    assert ref.stat().st_size == read_base_header(ref).file_size()


def test_eval_report(llama_ggufs, tmp_path):
    art = evaluate(gguf_artifacts(llama_ggufs), EvalSettings(max_tokens=8, n_ctx=256), tmp_path / "eval", "demo")
    assert art.name == "report:eval" and art.kind == "report" and art.is_dir
    quants = art.meta["quants"]
    assert list(quants) == ["F16", "Q8_0", "Q5_K_M", "Q4_K_M"]  # F16 first, then by size
    assert quants["F16"]["ppl_delta"] == 0 and quants["F16"]["kl_div"] == 0 and quants["F16"]["ppl_ratio"] == 1
    assert 0 < quants["Q8_0"]["kl_div"] < quants["Q4_K_M"]["kl_div"]
    assert 0 < quants["Q4_K_M"]["kl_div_se"] < quants["Q4_K_M"]["kl_div"] < quants["Q4_K_M"]["kl_div_p99"]
    for row in quants.values():
        assert row["tokens_per_s"] > 0 and row["latency_p95_ms"] >= row["latency_p50_ms"] > 0 and row["peak_rss_mb"] > 0
        assert 0 <= row["accuracy"] <= 1 and row["size_mb"] > 0
    assert quants["Q4_K_M"]["size_mb"] < quants["F16"]["size_mb"]
    assert art.meta["ppl_ctx"] == 126  # the bundled text (252 tokens) is shorter than two windows of 256
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert len(report["results"]["Q4_K_M"]["samples"]) == len(load_samples(EvalSettings()))
    assert (tmp_path / "eval" / "quality_vs_size.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "eval" / "eval.md").read_text()
    assert "| Q4_K_M |" in md and "kl_div" in md and "llama-perplexity -c 126" in md
    assert not list(tmp_path.glob(".eval-work-*"))  # the reference file is removed with its folder


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


def test_a_bf16_convert_is_the_kl_reference(llama_ggufs, tmp_path):
    """convert.outtype bf16 makes no F16: the BF16 GGUF is the reference (before, no KL was reported at all)."""
    from tasks.gguf.quantize import QuantizeSettings, quantize

    f16 = gguf_artifacts(llama_ggufs, ("F16",))[0]
    bf16 = quantize(f16, "BF16", QuantizeSettings(), tmp_path / "q", "demo", threads=2)
    assert bf16.meta["quant"] == "BF16"
    ggufs = [bf16, *gguf_artifacts(llama_ggufs, ("Q4_K_M",))]
    art = evaluate(ggufs, EvalSettings(max_tokens=4, n_ctx=128), tmp_path / "eval", "demo")
    quants = art.meta["quants"]
    assert art.meta["reference"] == "BF16" and list(quants) == ["BF16", "Q4_K_M"]
    assert quants["BF16"]["kl_div"] == 0 and quants["BF16"]["ppl_delta"] == 0
    assert 0 < quants["Q4_K_M"]["kl_div"] and quants["Q4_K_M"]["ppl_ratio"] > 0
    assert "KL-divergence against BF16" in (tmp_path / "eval" / "eval.md").read_text()
