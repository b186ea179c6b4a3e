"""The publish secret scan (tasks/publish/secret_scan.py) against what a user would run by hand.

    python -m benchmarks.secret_scan_bench --size-mb 512 --repeat 3

A staged repo folder like hub_push makes: one F16-sized GGUF written with gguf-py (random fp16 tensors,
a 32k-token vocabulary in its metadata), a README and loraship.json. Contenders, in one process, each
timed `--repeat` times (median), alternating:

- loraship: `scan_folder` (every registered secret and token shape; the GGUF's metadata only)
- `grep -rE` for Hugging Face token shapes over the whole folder (what one would type), reading every byte

Writes benchmarks/results/secret_scan.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.harness import RESULTS


def make_folder(root: Path, size_mb: int) -> Path:
    from gguf import GGUFWriter

    root.mkdir(parents=True, exist_ok=True)
    w = GGUFWriter(str(root / "m-F16.gguf"), "llama")
    w.add_name("bench")
    w.add_token_list([f"tok{i}" for i in range(32000)])
    rng = np.random.default_rng(0)
    per_tensor = 2048 * 4096 * 2
    for i in range(max(1, size_mb * 1_000_000 // per_tensor)):
        w.add_tensor(f"blk.{i}.w", rng.standard_normal((2048, 4096)).astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    (root / "README.md").write_text("---\nlibrary_name: gguf\n---\n# bench\n" + "text " * 2000)
    (root / "loraship.json").write_text(json.dumps({"artifacts": {}, "published_files": ["m-F16.gguf"]}))
    return root


def time_it(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.secret_scan_bench")
    ap.add_argument("--size-mb", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    from tasks.publish.secret_scan import scan_folder

    work = Path(tempfile.mkdtemp(prefix="loraship-scan-bench-"))
    try:
        folder = make_folder(work / "repo", args.size_mb)
        size = sum(p.stat().st_size for p in folder.iterdir())
        grep = ["grep", "-rEc", "hf_[A-Za-z0-9]{30,}", str(folder)]
        times: dict[str, list[float]] = {"loraship scan_folder": [], "grep -rE (whole files)": []}
        for i in range(args.repeat):
            order = list(times) if i % 2 == 0 else list(reversed(times))
            for name in order:
                if name.startswith("loraship"):
                    times[name].append(time_it(lambda: scan_folder(folder)))
                else:
                    times[name].append(time_it(lambda: subprocess.run(grep, capture_output=True)))
        med = {k: statistics.median(v) for k, v in times.items()}
        base = med["grep -rE (whole files)"]
        result = {
            "folder_mb": round(size / 1e6, 1),
            "repeat": args.repeat,
            "median_s": {k: round(v, 3) for k, v in med.items()},
            "vs_grep": {k: round(v / base, 3) for k, v in med.items()},
        }
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "secret_scan.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
