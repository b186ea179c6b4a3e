"""An importance matrix for the quantize stage, computed from calibration text with llama.cpp's llama-imatrix.

Low-bit types lose least where the model's activations are large: llama.cpp weighs each column's
rounding error by the mean squared activation it saw on some text (the "imatrix"). llama.cpp's own
`llama-imatrix`, built from the same vendored source as the runtime (tasks/gguf/llama_tools.py), runs the
F16 over `quantization.calibration` (default: the evaluation's held-out text) once; the same matrix then
serves every quant type of the run.

Cached by what determines it: the F16's digest, the text's digest, the tool (llama-cpp-python version, the
llama.cpp commit it was built from, the build key) and the window/chunk settings. The file lives in
`<gguf dir>/imatrix/imatrix-<key>.gguf` with a JSON record beside it; a re-run with the same inputs reuses
it, a changed text or F16 makes a new one. Only names (never local paths) go into the quantized files'
metadata, as llama-quantize records them: `quantize.imatrix.file`, `.dataset`, `.entries_count`,
`.chunks_count`.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import re
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from tasks.core.artifacts import Artifact
from tasks.core.atomic import atomic_path, atomic_write_json
from tasks.core.errors import PermanentError
from tasks.core.hashing import sha256_file
from tasks.core.progress import Progress

log = logging.getLogger("loraship.quantize")

#: llama-imatrix's window when the text is long enough (its default); shorter texts get half their length.
MAX_CTX = 512
#: the fewest tokens a calibration text may have (llama-imatrix needs two windows; below 16 tokens a
#: window says little)
MIN_TOKENS = 32
#: bump when the command line below changes what is computed
RECIPE = 1


@dataclass(frozen=True)
class Imatrix:
    """A computed (or given) importance matrix and what the quantized files record about it."""

    path: Path
    sha256: str
    dataset: str  # the calibration file's name (no folder: the metadata gets published)
    entries: int
    chunks: int | None
    computed: bool  # False: taken from the cache (or given by the user)
    seconds: float = 0.0

    def metadata(self) -> dict[str, str | int]:
        """The GGUF keys llama-quantize writes for an imatrix, with the same names and types."""
        out: dict[str, str | int] = {
            "quantize.imatrix.file": self.path.name,
            "quantize.imatrix.entries_count": self.entries,
        }
        if self.dataset:
            out["quantize.imatrix.dataset"] = self.dataset
        if self.chunks:
            out["quantize.imatrix.chunks_count"] = self.chunks
        return out

    def record(self) -> dict[str, Any]:
        """For the quant artifacts' meta."""
        return {
            "file": self.path.name,
            "sha256": self.sha256,
            "dataset": self.dataset,
            "entries": self.entries,
            "chunks": self.chunks,
            "computed": self.computed,
        }


def imatrix_facts(path: Path, *, dataset: str | None = None) -> Imatrix:
    """What an imatrix GGUF holds (entries, chunks, dataset name) without loading its data."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path), "r")
    except Exception as exc:
        raise PermanentError(
            f"{path} is not a GGUF imatrix file ({exc})",
            hint="make one with llama.cpp's llama-imatrix (the legacy .dat format is not read)",
        ) from None
    entries = sum(1 for t in reader.tensors if t.name.endswith(".in_sum2"))
    chunks = _scalar(reader, "imatrix.chunk_count")
    if dataset is None:
        names = _strings(reader, "imatrix.datasets")
        dataset = Path(names[0]).name if names else ""
    del reader
    return Imatrix(
        path=path,
        sha256=sha256_file(path),
        dataset=dataset,
        entries=entries,
        chunks=int(chunks) if chunks else None,
        computed=False,
    )


def _scalar(reader: Any, key: str) -> Any:
    f = reader.get_field(key)
    if f is None or not f.data:
        return None
    return f.parts[f.data[0]].tolist()[0]


def _strings(reader: Any, key: str) -> list[str]:
    f = reader.get_field(key)
    if f is None:
        return []
    return [bytes(f.parts[i]).decode("utf-8", "replace") for i in f.data]


def count_tokens(f16: Path, text: str) -> int:
    """How many tokens llama.cpp makes of `text` with the model's vocabulary (a vocabulary-only load)."""
    from tasks.gguf.validate import _load

    llm = _load(model_path=str(f16), vocab_only=True, verbose=False)
    try:
        return len(llm.tokenize(text.encode("utf-8"), add_bos=True, special=False))
    finally:
        llm.close() if hasattr(llm, "close") else None


def window_for(n_tokens: int) -> int:
    """llama-imatrix's -c for a text of `n_tokens`: 512, or half the text when it is shorter than two windows."""
    if n_tokens < MIN_TOKENS:
        raise PermanentError(
            f"quantization.calibration has {n_tokens} tokens; an importance matrix needs at least {MIN_TOKENS}",
            hint="point quantization.calibration at a longer text (a few thousand tokens of what the model will see)",
        )
    return min(MAX_CTX, n_tokens // 2)


def cache_key(f16_sha256: str, text_sha256: str, tool: dict[str, Any], n_ctx: int, chunks: int) -> str:
    payload = {"f16": f16_sha256, "text": text_sha256, "tool": tool, "n_ctx": n_ctx, "chunks": chunks, "v": RECIPE}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def compute_imatrix(
    f16: Artifact, calibration: Path, out_dir: Path, *, chunks: int = 128, threads: int | None = None
) -> Imatrix:
    """The imatrix of `f16` on the text file `calibration`, from the cache in `out_dir/imatrix/` or computed."""
    from tasks.gguf.llama_tools import build_key, ensure_tools

    calibration = Path(calibration).expanduser()
    if not calibration.is_file():
        raise PermanentError(
            f"quantization.calibration {calibration} does not exist",
            hint="point it at a plain text file like the model's inputs (default: evaluation.heldout_text)",
        )
    src = Path(f16.path)
    text = calibration.read_text(encoding="utf-8", errors="replace")
    n_ctx = window_for(count_tokens(src, text))
    tools = ensure_tools()  # built once (about 5 minutes) unless ./setup.sh --llama-tools did it
    tool = {"version": tools.version, "commit": tools.commit, "build": build_key()}
    key = cache_key(f16.sha256, hashlib.sha256(text.encode("utf-8")).hexdigest(), tool, n_ctx, chunks)
    folder = Path(out_dir) / "imatrix"
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"imatrix-{key}.gguf"
    record = final.with_suffix(".json")
    with FileLock(str(final) + ".lock", timeout=7200):  # mapped quantize tasks ask at the same time
        cached = _cached(final, record)
        if cached is not None:
            log.info("imatrix: %s from the cache (same F16, text and tool)", final.name)
            return cached
        log.info(
            "imatrix: computing with llama-imatrix on %s (windows of %d tokens, at most %d) for %s",
            calibration.name,
            n_ctx,
            chunks,
            src.name,
        )
        started = time.monotonic()
        with atomic_path(final) as tmp:
            cmd = [
                str(tools.path("llama-imatrix")),
                "-m", str(src), "-f", str(calibration), "-o", str(tmp),
                "-c", str(n_ctx), "-b", str(n_ctx), "--chunks", str(chunks),
                "--output-frequency", str(10**6), "--no-ppl", "-ngl", "0",
            ]  # fmt: skip
            if threads:
                cmd += ["-t", str(threads)]
            _run(cmd, calibration, src.name)
        seconds = time.monotonic() - started
        facts = imatrix_facts(final, dataset=calibration.name)
        if not facts.entries:
            final.unlink(missing_ok=True)
            raise PermanentError(f"llama-imatrix wrote no importance data for {src.name} ({final.name})")
        got = Imatrix(**{**facts.__dict__, "computed": True, "seconds": round(seconds, 2)})
        atomic_write_json(record, {"key": key, "tool": tool, "n_ctx": n_ctx, "seconds": got.seconds, **got.record()})
        log.info(
            "imatrix: %d tensors from %d chunk(s) of %d tokens of %s in %.1f s",
            got.entries,
            got.chunks or 0,
            n_ctx,
            calibration.name,
            seconds,
        )
        return got


def _cached(final: Path, record: Path) -> Imatrix | None:
    """The cached imatrix when both files are there and the file is the one recorded (else recompute)."""
    if not (final.is_file() and record.is_file()):
        return None
    try:
        rec = json.loads(record.read_text())
    except ValueError:
        return None
    if sha256_file(final) != rec.get("sha256"):
        return None
    return Imatrix(
        path=final,
        sha256=rec["sha256"],
        dataset=rec.get("dataset") or "",
        entries=int(rec.get("entries") or 0),
        chunks=rec.get("chunks"),
        computed=False,
        seconds=float(rec.get("seconds") or 0.0),
    )


#: llama-imatrix's two lines about its plan (with --no-ppl it prints nothing per chunk)
_CHUNKS = re.compile(r"computing over (\d+) chunks")
_PER_PASS = re.compile(r"([\d.]+) seconds per pass")


class _EstimatedProgress:
    """A progress bar / Prefect progress artifact for llama-imatrix, estimated from its own plan lines.

    Why estimated: with `--no-ppl` (which spares the output layer's logits, a large share of a small model's
    work) the tool prints the number of chunks and the seconds its first pass took, then nothing until it
    ends. So the bar advances by elapsed time over that per-pass time, never past the last chunk before the
    tool has finished, and the log gets the tool's estimate once at INFO."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.chunks: int | None = None
        self.per_pass: float | None = None
        self._progress: Progress | None = None
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    def line(self, line: str) -> None:
        if self.chunks is None and (m := _CHUNKS.search(line)):
            self.chunks = int(m[1])
        elif self.per_pass is None and self.chunks and (m := _PER_PASS.search(line)):
            self.per_pass = max(float(m[1]), 1e-3)
            log.info(
                "imatrix: %d chunk(s) of %s at about %.2f s each (llama-imatrix's estimate: %.1f min)",
                self.chunks,
                self.name,
                self.per_pass,
                self.chunks * self.per_pass / 60,
            )
            self._progress = Progress(f"imatrix {self.name}", self.chunks, unit="chunk")
            self._progress.update_to(1)
            self._ticker = threading.Thread(target=self._tick, name="imatrix-progress", daemon=True)
            self._ticker.start()

    def _tick(self) -> None:
        started = time.monotonic()
        assert self._progress is not None and self.chunks and self.per_pass
        while not self._stop.wait(1.0):
            estimated = 1 + (time.monotonic() - started) / self.per_pass
            self._progress.update_to(min(estimated, self.chunks - 1))

    def close(self, ok: bool) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=5)
        if self._progress is not None:
            self._progress.__exit__(None if ok else RuntimeError, None, None)


def _run(cmd: list[str], calibration: Path, name: str = "") -> None:
    tail: collections.deque[str] = collections.deque(maxlen=20)
    estimate = _EstimatedProgress(name)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace") as proc:
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                line = line.rstrip()
                if line:
                    tail.append(line)
                    estimate.line(line)
                    log.debug("llama-imatrix: %s", line)
        finally:
            proc.wait()
            estimate.close(proc.returncode == 0)
    if proc.returncode != 0:
        raise PermanentError(
            f"llama-imatrix failed on {calibration.name} (exit {proc.returncode}): " + " | ".join(list(tail)[-6:]),
            hint="see the log above; quantization.calibration must be plain text",
        )
