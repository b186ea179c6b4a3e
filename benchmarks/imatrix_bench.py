"""What the importance matrix buys: KL-divergence against the F16, with and without an imatrix, per type.

    python -m benchmarks.imatrix_bench [--types Q4_K_M IQ4_XS] [--calibration FILE] [--eval-text FILE]

A Llama built here (tasks/support/tiny_models.py, random weights: no real model can be downloaded here;
hidden 512, 4 layers, K-quant-sized rows) is converted to F16 by the convert stage, then each type is
quantized by the quantize stage twice: plainly, and with `compute_imatrix` on the calibration text
(llama.cpp's llama-imatrix, tasks/gguf/imatrix.py). Each file is scored on a *different* text than the
calibration, chunk by chunk as `llama-perplexity --kl-divergence` does (tasks/evaluate/worker.py: the F16's
log-probabilities in llama-perplexity's base format, then each quant against them): mean KLD ± its standard
error, the 99th percentile and same-top-token %. Defaults: calibration = Debian's GPL-3 text, evaluation =
the Apache-2.0 text (both in /usr/share/common-licenses). KL is not a timing: no bench lock needed.
Results: benchmarks/results/imatrix_bench.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import machine, save, table

LICENSES = Path("/usr/share/common-licenses")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", nargs="+", default=["Q4_K_M", "IQ4_XS"])
    ap.add_argument("--calibration", type=Path, default=LICENSES / "GPL-3")
    ap.add_argument("--eval-text", type=Path, default=LICENSES / "Apache-2.0")
    ap.add_argument("--n-ctx", type=int, default=256, help="window of the KL scoring (llama-perplexity's -c)")
    ap.add_argument("--max-tokens", type=int, default=4096, help="held-out tokens scored at most")
    ap.add_argument(
        "--chunks", type=int, default=64, help="calibration windows at most (quantization.calibration_chunks)"
    )
    args = ap.parse_args()

    from tasks.core.artifacts import Artifact
    from tasks.evaluate.worker import score_against, score_reference
    from tasks.gguf.convert import ConvertSettings, convert
    from tasks.gguf.quantize import QuantizeSettings, quantize
    from tasks.support.tiny_models import tiny_model

    base = tiny_model("llama", hidden=512, layers=4, heads=8, kv_heads=2, intermediate=1536)
    work = Path(tempfile.mkdtemp(prefix="loraship-imatrix-bench-"))
    merged = Artifact.from_path(base, name="merged", kind="merged", stage="merge")
    f16 = convert(merged, ConvertSettings(), work, "imb")
    text = args.eval_text.read_text()
    ref = work / "f16.kld"
    reference = score_reference(f16.path, text, args.n_ctx, ref, max_tokens=args.max_tokens)
    rows: list[dict[str, Any]] = []
    imatrix: dict[str, Any] = {}
    for q in args.types:
        for with_im in (False, True):
            s = QuantizeSettings(
                compute_imatrix=with_im, calibration=str(args.calibration), calibration_chunks=args.chunks
            )
            started = time.monotonic()
            a = quantize(f16, q, s, work / ("im" if with_im else "plain"), "imb")
            seconds = time.monotonic() - started
            if with_im:
                imatrix = a.meta["imatrix_info"]
            kl = score_against(a.path, ref)
            rows.append(
                {
                    "type": q,
                    "imatrix": "yes" if with_im else "no",
                    "mean_kld": f"{kl['kl_div']:.5f} ± {kl['kl_div_se']:.5f}",
                    "kld_p99": round(kl["kl_div_p99"], 5),
                    "same_top_pct": f"{100 * kl['top1_agreement']:.2f} ± {100 * kl['top1_agreement_se']:.2f}",
                    "ppl_ratio": round(kl["ppl_ratio"], 5),
                    "bpw": a.meta["bits_per_weight"],
                    "quantize_s": round(seconds, 1),
                    "raw": kl,
                }
            )
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "raw"}), flush=True)
    out = save(
        "imatrix_bench",
        {
            "machine": machine(),
            "command": " ".join(["python -m benchmarks.imatrix_bench", *sys.argv[1:]]),
            "model": str(base),
            "calibration": str(args.calibration),
            "eval_text": str(args.eval_text),
            "reference": reference,
            "imatrix": imatrix,
            "rows": rows,
        },
    )
    print(table(rows, ["type", "imatrix", "mean_kld", "kld_p99", "same_top_pct", "ppl_ratio", "bpw"]))
    print(f"scored {reference.get('heldout_tokens')} tokens of {args.eval_text.name}; written {out}")


if __name__ == "__main__":
    main()
