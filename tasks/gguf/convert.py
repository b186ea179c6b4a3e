"""Stage 3, convert: merged HF folder -> {model}-F16.gguf with llama.cpp's converter.

The converter is llama.cpp's own `convert_hf_to_gguf.py` from the same commit as the installed
llama-cpp-python (resolved by tasks/gguf/toolchain.py), run as a subprocess through
tasks/gguf/convert_entry.py (which adds the `vocab_pre` choice for unknown BPE tokenizers). Its log goes to
the run log and its last lines into the error on failure. The output is written under a temporary
name and renamed when complete, then validated with GGUFReader, and (by default) the runtime's
tokenization of a test sentence is compared with the HF tokenizer's.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field

from tasks.core.artifacts import Artifact
from tasks.core.atomic import atomic_path
from tasks.core.constants import cache_root
from tasks.core.disk import disk_preflight
from tasks.core.errors import PermanentError
from tasks.core.hashing import AppendHasher, sha256_file, stat_key
from tasks.core.progress import Progress
from tasks.core.settings import GIT_CHECKOUT, StrictModel
from tasks.core.stage import stage_task
from tasks.core.threads import ContextPool, context_thread
from tasks.core.vocab import ArtifactKind, Stage
from tasks.gguf import quant_types

if TYPE_CHECKING:
    from tasks.gguf.toolchain import Converter

STAGE = Stage.CONVERT
log = logging.getLogger("loraship.convert")
ENTRY = Path(__file__).with_name("convert_entry.py")
#: Under cache_root(): transformers' import structure, kept for the converter's process (lean_imports.py).
IMPORT_CACHE = "converter-imports"
TOKENIZER_TEXT = "Hello world! The quick brown fox jumps over the lazy dog; 12 cats, 3 owls."
TOOLS = ("llama-cpp-python", "gguf", "torch", "transformers", "safetensors")


class ConvertSettings(StrictModel):
    """The `convert:` section: how the merged model becomes one GGUF file."""

    outtype: Literal["f16", "bf16", "f32", "q8_0"] = Field(
        "f16", description="tensor type of the converted file (the input of quantize)"
    )
    vocab_pre: str | None = Field(
        None,
        description=(
            "pre-tokenizer to use when llama.cpp does not recognise a BPE tokenizer (e.g. gpt-2, llama-bpe, qwen2)"
        ),
    )
    llama_cpp_dir: Annotated[str | None, GIT_CHECKOUT] = Field(
        None,
        description=(
            "a llama.cpp checkout to take convert_hf_to_gguf.py from (else LLAMA_CPP_DIR, else the sdist of the "
            "installed llama-cpp-python)"
        ),
    )
    check_tokenizer: bool = Field(
        True,
        description=(
            "compare llama.cpp's tokenization of a test sentence with the HF tokenizer's (a mismatch fails the stage)"
        ),
    )
    timeout_s: int = Field(7200, ge=60, description="give up on the converter after this many seconds")
    lora_adapter: bool = Field(
        False,
        description=(
            "also convert the adapter alone to a GGUF LoRA ({model}-LoRA-F16.gguf) for runtimes that apply adapters"
        ),
    )


_SRC_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


class UnsupportedArchitecture(PermanentError):
    """llama.cpp's converter has no support for the model's architecture (a speech or vision model): the
    GGUF stages skip with this reason and the merged repo is what gets published."""


def gguf_name(model: str, quant: str) -> str:
    return f"{model}-{quant.upper()}.gguf"


def estimate_gguf_bytes(merged_dir: Path, outtype: str) -> int:
    """Expected size of the converted file, from the safetensors sizes and the source dtype."""
    weights = sum(p.stat().st_size for p in merged_dir.glob("*.safetensors")) or sum(
        p.stat().st_size for p in merged_dir.glob("*.bin")
    )
    src = 2
    cfg = merged_dir / "config.json"
    if cfg.is_file():
        data = json.loads(cfg.read_text())
        src = _SRC_BYTES.get(str(data.get("torch_dtype") or data.get("dtype") or "float16"), 2)
    per_weight = (quant_types.bits_per_weight(outtype) or 16.0) / 8  # the table's nominal bits: q8_0 is 8.5
    return int(weights * per_weight / src) + 16 * 1024 * 1024


@contextlib.contextmanager
def file_progress(path: Path, total: int, description: str, interval: float = 0.5) -> Iterator[Progress]:
    """Report a growing output file's size as progress while the block runs (llama.cpp has no callback)."""
    progress = Progress(description, total)
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(interval):
            try:
                progress.update_to(min(path.stat().st_size, total))
            except OSError:
                pass

    t = context_thread(watch, name=f"progress-{path.name}")
    t.start()
    try:
        yield progress
    finally:
        stop.set()
        t.join(timeout=5)
    progress.close()


@contextlib.contextmanager
def converter_view(src: Path) -> Iterator[Path]:
    """The model folder as llama.cpp's converter should see it (usually `src` itself).

    transformers 5 keeps added tokens (chat markup such as <|im_start|>) only in tokenizer.json, while
    this converter's SentencePiece path learns which tokens are special from tokenizer_config.json's
    `added_tokens_decoder` (or added_tokens.json): without it they are written as normal text tokens and
    llama.cpp tokenizes the chat markup as text. Then the converter gets a temporary folder of links to
    `src` with a tokenizer_config.json that carries `added_tokens_decoder` from tokenizer.json; `src`
    (an artifact with a digest) is never changed.
    """
    cfg, tj = src / "tokenizer_config.json", src / "tokenizer.json"
    if not ((src / "tokenizer.model").is_file() and cfg.is_file() and tj.is_file()):
        yield src
        return
    data = json.loads(cfg.read_text())
    added = json.loads(tj.read_text()).get("added_tokens") or []
    if data.get("added_tokens_decoder") or (src / "added_tokens.json").is_file() or not added:
        yield src
        return
    keys = ("content", "lstrip", "normalized", "rstrip", "single_word", "special")
    data["added_tokens_decoder"] = {str(t["id"]): {k: t[k] for k in keys if k in t} for t in added}
    with tempfile.TemporaryDirectory(prefix="loraship-convert-view-") as tmpd:
        view = Path(tmpd) / src.name
        view.mkdir()
        for p in src.iterdir():
            if p.name != cfg.name:
                (view / p.name).symlink_to(p.resolve())
        (view / cfg.name).write_text(json.dumps(data, indent=2))
        log.info("added tokens of %s passed to the converter from tokenizer.json (%d tokens)", src.name, len(added))
        yield view


def entry_command(conv: Converter, *options: str) -> list[str]:
    """How every converter run starts (the convert stage, the fused merge's shared read, the benchmarks): this
    interpreter, convert_entry.py on `conv`'s tree, the import cache, then `options` (convert_entry's own)."""
    return [sys.executable, str(ENTRY), "--llama-cpp", str(conv.root), "--import-cache", str(import_cache()), *options]


def import_cache() -> Path:
    return cache_root() / IMPORT_CACHE


def _run_converter(cmd: list[str], env: dict[str, str], timeout_s: int) -> tuple[int, list[str], bool]:
    """Run the converter, streaming its log to ours; return (exit code, last lines, unknown-BPE flag)."""
    tail: collections.deque[str] = collections.deque(maxlen=25)
    unknown_bpe = False
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, bufsize=1)
    timer = threading.Timer(timeout_s, proc.kill)
    timer.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            if not line:
                continue
            tail.append(line)
            if "LORASHIP_UNKNOWN_BPE_PRE" in line or "BPE pre-tokenizer was not recognized" in line:
                unknown_bpe = True
            if line.startswith("ERROR") or "Traceback" in line or "Error" in line.split(":", 1)[0]:
                log.warning("converter: %s", line)
            elif line.startswith("WARNING"):  # upstream's notes (unknown RoPE type, separators): informative
                log.info("converter: %s", line)
            else:
                log.debug("converter: %s", line)
        rc = proc.wait()
    finally:
        timer.cancel()
    return rc, list(tail), unknown_bpe


def hf_tokenize(model_dir: Path, text: str) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    return list(tok.encode(text, add_special_tokens=False))


def convert(merged: Artifact, settings: ConvertSettings, out_dir: Path, model_name: str) -> Artifact:
    """Convert the merged HF folder `merged` into `out_dir/{model_name}-{OUTTYPE}.gguf` and validate it.

    A merged/ that holds a fused.json recipe instead of weights (merge.fused_convert) is converted from the
    base and the adapter in one pass: the converter reads a folder of links to the base's shards and the
    recipe's side files, through the fused tensor source (tasks/merge/fused.py). A merged/ whose record names a
    GGUF the merge stage already wrote with these settings (the shared read, `premade_gguf`) reuses that file,
    checked by its digest, and runs only the checks after converting.
    """
    from tasks.merge.fused import converter_folder, is_fused

    src = Path(merged.path)
    premade = reusable_premade(merged, settings, out_dir, model_name)
    if premade is not None:
        return _reuse(merged, src, settings, model_name, *premade)
    if not is_fused(src):
        return _convert(merged, src, settings, out_dir, model_name)
    with converter_folder(src) as view:
        return _convert(merged, view, settings, out_dir, model_name, fused=src)


def _check_source(src: Path) -> None:
    if not (src / "config.json").is_file():
        raise PermanentError(
            f"{src} has no config.json: it is not a Hugging Face model folder",
            hint="the merge stage must write a full HF model folder (config, safetensors, tokenizer)",
        )
    if not any(src.glob("*.safetensors")) and not any(src.glob("*.bin")):
        raise PermanentError(f"{src} has no *.safetensors weights", hint="re-run the merge stage")


def _hf_ids(src: Path, settings: ConvertSettings) -> concurrent.futures.Future | None:
    """The HF side of the tokenizer check needs transformers (~5 s to import and load): done on a thread, while
    the converter subprocess runs, on the core it leaves idle."""
    if not settings.check_tokenizer:
        return None
    pool = ContextPool(max_workers=1, thread_name_prefix="hf-tokenize")
    fut = pool.submit(hf_tokenize, src, TOKENIZER_TEXT)
    pool.shutdown(wait=False)
    return fut


def _run_conversion(
    src: Path,
    settings: ConvertSettings,
    out_file: Path,
    model_name: str,
    expected: int,
    fused: Path | None = None,
    write_merged: Path | None = None,
) -> tuple[str | None, dict | None, Any]:
    """Run the converter on `src` into `out_file` (a temporary name the caller renames), hashing as it writes.

    Returns (the sha256, or None when the file must be hashed again; the fused source's report; the converter)."""
    from tasks.gguf.toolchain import resolve_converter

    conv = resolve_converter(settings.llama_cpp_dir)
    log.info("converting %s with %s", src, conv.describe())
    cmd = entry_command(conv)
    if settings.vocab_pre:
        cmd += ["--vocab-pre", settings.vocab_pre]
    report_file = out_file.with_name(out_file.name + ".fused.json")
    if fused is not None:
        cmd += ["--fused", str(fused), "--fused-report", str(report_file)]
        if write_merged is not None:
            cmd += ["--write-merged", str(write_merged)]
    # GGUFWriter only appends: the output is hashed as it is written, on the core the converter leaves idle
    hasher = AppendHasher(out_file).start()
    try:
        with converter_view(src) as view, file_progress(out_file, expected, f"convert {out_file.name}"):
            cmd += ["--", str(view), "--outfile", str(out_file), "--outtype", settings.outtype]
            cmd += ["--model-name", model_name]
            rc, tail, unknown_bpe = _run_converter(cmd, conv.env(), settings.timeout_s)
        fused_meta = _fused_report(report_file, rc, tail) if fused is not None else None
        if rc != 0:
            raise _converter_error(rc, tail, unknown_bpe, src, settings)
        return hasher.finish(), fused_meta, conv
    finally:
        hasher.close()


def _convert(
    merged: Artifact, src: Path, settings: ConvertSettings, out_dir: Path, model_name: str, fused: Path | None = None
) -> Artifact:
    """`convert` on the folder `src` the converter reads (merged/, or the fused path's view of the base)."""
    _check_source(src)
    final = Path(out_dir) / gguf_name(model_name, settings.outtype.upper())
    expected = estimate_gguf_bytes(src, settings.outtype)
    disk_preflight(Path(out_dir), expected, final.name)
    hf_ids = _hf_ids(src, settings)
    started = time.monotonic()
    with atomic_path(final) as tmp:
        digest, fused_meta, conv = _run_conversion(src, settings, tmp, model_name, expected, fused)
    seconds = time.monotonic() - started
    extra = {"fused": fused_meta} if fused_meta is not None else {}
    return _checked(merged, final, digest, settings, conv, seconds, hf_ids, extra)


def convert_with_merged(
    recipe_dir: Path,
    merged_dir: Path,
    settings: ConvertSettings,
    out_file: Path,
    model_name: str,
    view_name: str | None = None,
) -> dict[str, Any]:
    """The shared read (merge.fused_convert when a later stage needs merged/'s weights; called by the merge
    stage): one converter run writes `out_file` (the GGUF, under a name the caller renames) and merged/'s shards
    and index into `merged_dir`, each merged tensor made once for both. Returns the record of the GGUF the
    convert stage then reuses (`reusable_premade`), without `path`, `size` and `mtime_ns` (the caller's, once
    the file has its final name)."""
    from tasks.merge.fused import converter_folder

    started = time.monotonic()
    with converter_folder(recipe_dir, name=view_name) as view:  # named as merged/ is: what the converter sees
        _check_source(view)
        expected = estimate_gguf_bytes(view, settings.outtype)
        disk_preflight(out_file.parent, expected, out_file.name)
        digest, fused_meta, conv = _run_conversion(
            view, settings, out_file, model_name, expected, fused=recipe_dir, write_merged=merged_dir
        )
    return {
        "file": gguf_name(model_name, settings.outtype.upper()),
        "sha256": digest or sha256_file(out_file),
        "outtype": settings.outtype,
        "vocab_pre": settings.vocab_pre,
        "llama_cpp_dir": settings.llama_cpp_dir,
        "llama_cpp_commit": conv.commit,
        "model_name": model_name,
        "seconds": round(time.monotonic() - started, 2),
        "fused": fused_meta,
    }


def reusable_premade(
    merged: Artifact, settings: ConvertSettings, out_dir: Path, model_name: str
) -> tuple[Path, dict[str, Any], Any] | None:
    """(the GGUF, its record, the converter) when the merge stage wrote this GGUF in its converter run (the
    shared read) with the settings asked for now and the file still holds the bytes recorded (size and mtime
    unchanged, else its sha256 again); else None, and the convert stage converts merged/ as usual."""
    from tasks.gguf.toolchain import resolve_converter

    rec = merged.meta.get("premade_gguf")
    if not rec:
        return None
    final = Path(out_dir) / gguf_name(model_name, settings.outtype.upper())
    why = None
    if (rec.get("outtype"), rec.get("vocab_pre"), rec.get("llama_cpp_dir"), rec.get("model_name")) != (
        settings.outtype,
        settings.vocab_pre,
        settings.llama_cpp_dir,
        model_name,
    ):
        why = "it was made with other convert settings"
    elif str(final.resolve()) != rec.get("path"):
        why = f"it is {rec.get('path')}, not {final}"
    elif not final.is_file():
        why = f"{final} is gone"
    else:
        size, mtime = stat_key(final)
        if size != rec.get("size") or (mtime != rec.get("mtime_ns") and sha256_file(final) != rec.get("sha256")):
            why = f"{final.name} changed since the merge stage wrote it"
    conv = None
    if why is None:
        conv = resolve_converter(settings.llama_cpp_dir)
        if conv.commit != rec.get("llama_cpp_commit"):
            why = f"the converter is llama.cpp {conv.commit}, the file was made by {rec.get('llama_cpp_commit')}"
    if why is not None:
        log.info("the GGUF the merge stage wrote is not reused (%s): converting merged/", why)
        return None
    return final, rec, conv


def _reuse(merged: Artifact, src: Path, settings: ConvertSettings, model_name: str, final: Path, rec: dict, conv: Any):
    """The convert stage on the GGUF the merge stage wrote (the shared read): the checks after converting only."""
    log.info("reusing %s, written by the merge stage's converter run (sha256 %s)", final.name, rec["sha256"][:12])
    hf_ids = _hf_ids(src, settings)
    extra = {"reused_from_merge": True, "fused": rec.get("fused")}
    return _checked(merged, final, rec["sha256"], settings, conv, float(rec.get("seconds") or 0), hf_ids, extra)


def _checked(
    merged: Artifact,
    final: Path,
    digest: str | None,
    settings: ConvertSettings,
    conv: Any,
    seconds: float,
    hf_ids: concurrent.futures.Future | None,
    extra: dict[str, Any],
) -> Artifact:
    """Validate the converted file (header, runtime tokenization, a few generated tokens) and make its record."""
    from tasks.gguf.validate import runtime_check, validate_gguf

    quant = settings.outtype.upper()
    # The runtime checks (one llama.cpp load: tokenization and a few generated tokens) run beside the header
    # validation; the pool's exit waits for them whatever happens.
    with ContextPool(max_workers=1, thread_name_prefix="runtime-check") as pool:
        runtime = pool.submit(
            runtime_check,
            final,
            tokenize=TOKENIZER_TEXT if settings.check_tokenizer else None,
            threads=check_threads(),
        )
        info = validate_gguf(final)
        checked = runtime.result()
    log.info(
        "converted %s: %d tensors, %.1f MB in %.1fs (%.0f MB/s)",
        final.name,
        info["tensor_count"],
        info["size"] / 1e6,
        seconds,
        info["size"] / 1e6 / max(seconds, 1e-6),
    )
    meta = {
        "quant": quant,
        "outtype": settings.outtype,
        "llama_cpp_commit": conv.commit,
        "converter_origin": conv.origin,
        "architecture": info["architecture"],
        "tensor_count": info["tensor_count"],
        "tensor_types": info["tensor_types"],
        "n_params": info["n_params"],
        "bits_per_weight": info["bits_per_weight"],
        "has_chat_template": info["has_chat_template"],
        "tokenizer_model": info["tokenizer_model"],
        "tokenizer_pre": info["tokenizer_pre"],
        "vocab_pre_used": bool(settings.vocab_pre) and info["tokenizer_pre"] == settings.vocab_pre,
        "seconds": round(seconds, 2),
        "notes": list(conv.notes),
        **{k: v for k, v in extra.items() if v is not None},
    }
    if settings.check_tokenizer:
        assert hf_ids is not None
        ours, theirs = checked["tokens"], hf_ids.result()
        meta["tokenizer_check"] = {"text": TOKENIZER_TEXT, "matches": ours == theirs}
        if ours != theirs:
            final.unlink(missing_ok=True)
            hint = (
                (
                    "set convert.vocab_pre to the pre-tokenizer your tokenizer was built like (gpt-2, llama-bpe, "
                    "qwen2, ...)"
                )
                if info["tokenizer_model"] == "gpt2"
                else "check the tokenizer files in the merged folder"
            )
            at = next((i for i, (x, y) in enumerate(zip(ours, theirs)) if x != y), min(len(ours), len(theirs)))
            raise PermanentError(
                f"llama.cpp tokenizes {TOKENIZER_TEXT!r} differently from the HF tokenizer (pre-tokenizer "
                f"{info['tokenizer_pre']!r}): "
                f"from token {at}: {ours[at : at + 6]} vs {theirs[at : at + 6]}",
                hint=hint,
            )
    meta["generation"] = checked["generation"]
    meta["hashed_while_writing"] = digest is not None
    return Artifact.from_path(
        final,
        name=f"gguf:{quant}",
        kind=ArtifactKind.GGUF,
        stage=STAGE,
        inputs=[merged],
        settings=settings,
        tools=TOOLS,
        meta=meta,
        known={final.name: digest} if digest else None,
    )


def _fused_report(path: Path, rc: int, tail: list[str]) -> dict:
    """What the fused tensor source did (tasks/merge/fused.py); raises when its per-tensor check failed."""
    from tasks.merge.fused import CHECK_FAILED

    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        report = None
    finally:
        path.unlink(missing_ok=True)
    failed = (report or {}).get("tensor_check") or {}
    line = next((x for x in tail if CHECK_FAILED in x), None)
    if failed.get("failed") or line:
        what = "; ".join(failed.get("failed") or []) or str(line).split(CHECK_FAILED + ":", 1)[-1].strip()
        raise PermanentError(
            f"fused convert: merged tensor(s) differ from W + s·B·A recomputed from the base and adapter files: {what}",
            hint="set merge.fused_convert: false and report the adapter",
        )
    if report is None:
        if rc == 0:
            raise PermanentError(f"fused convert: the converter wrote no report ({path.name})")
        return {}
    log.info(
        "fused convert: %d tensors merged while converting (%.1f s), %s",
        report["tensors_merged"],
        report["merge_seconds"],
        "per-tensor check: %d tensors, worst %s ulps" % (failed["tensors_checked"], failed["max_err_ulps"])
        if failed
        else "no per-tensor check (merge.verify: never)",
    )
    return report


def check_threads() -> int:
    """Threads for the runtime check after converting: half the cores (at most 4), since the stage's other
    work and the DAG's parallel stages share the machine (ggml's threads spin: oversubscribed they are slower)."""
    return max(1, min(4, (os.cpu_count() or 2) // 2))


def _converter_error(
    rc: int, tail: list[str], unknown_bpe: bool, src: Path, settings: ConvertSettings
) -> PermanentError:
    last = "\n    ".join(tail[-12:])
    if unknown_bpe:
        return PermanentError(
            f"llama.cpp does not recognise the BPE pre-tokenizer of {src} (BPE pre-tokenizer was not recognized)",
            hint=(
                "set convert.vocab_pre to the pre-tokenizer the tokenizer was built like, e.g. 'gpt-2' "
                "(byte-level BPE), 'llama-bpe' (Llama 3) or 'qwen2'; "
                "the convert stage then checks llama.cpp's tokenization against the HF tokenizer"
            ),
        )
    m = next((re.search(r"Model (\S+) is not supported", line) for line in tail if "is not supported" in line), None)
    if m:
        return UnsupportedArchitecture(
            f"llama.cpp's converter cannot convert the architecture {m.group(1)} (from {src / 'config.json'})",
            hint=(
                "use a model architecture llama.cpp supports, or a llama.cpp checkout that adds it "
                "(convert.llama_cpp_dir)"
            ),
        )
    if rc in (-9, 137):
        return PermanentError(
            (
                f"the converter was killed (exit {rc}): out of memory or past convert.timeout_s "
                f"({settings.timeout_s}s)\n    {last}"
            ),
            hint="free memory, or raise convert.timeout_s",
        )
    return PermanentError(
        f"llama.cpp's converter failed (exit {rc}); its last lines:\n    {last}", hint="see the converter's log above"
    )


def convert_lora(
    adapter: Artifact, base_dir: Path, settings: ConvertSettings, out_dir: Path, model_name: str
) -> Artifact:
    """The peft adapter alone -> `{model}-LoRA-F16.gguf` with llama.cpp's convert_lora_to_gguf.py.

    `base_dir` only lends the model's config (the merged folder has the base's config).
    """
    from tasks.gguf.toolchain import resolve_converter
    from tasks.gguf.validate import read_gguf

    src = Path(adapter.path)
    if not (src / "adapter_config.json").is_file():
        raise PermanentError(
            f"{src} has no adapter_config.json: not a peft LoRA adapter",
            hint="convert.lora_adapter needs the downloaded adapter folder",
        )
    outtype = "f16" if settings.outtype == "q8_0" else settings.outtype
    final = Path(out_dir) / f"{model_name}-LoRA-{outtype.upper()}.gguf"
    disk_preflight(Path(out_dir), sum(f.size for f in adapter.files) + 16 * 2**20, final.name)
    conv = resolve_converter(settings.llama_cpp_dir)
    started = time.monotonic()
    with atomic_path(final) as tmp:
        cmd = [
            *entry_command(conv, "--script", "convert_lora_to_gguf.py"),
            "--",
            str(src),
            "--base",
            str(base_dir),
            "--outfile",
            str(tmp),
            "--outtype",
            outtype,
        ]
        rc, tail, _ = _run_converter(cmd, conv.env(), settings.timeout_s)
        if rc != 0:
            raise PermanentError(
                "llama.cpp's convert_lora_to_gguf failed (exit %d); its last lines:\n    %s"
                % (rc, "\n    ".join(tail[-12:])),
                hint="see the converter's log above",
            )
    info = read_gguf(final)
    if not info["tensor_count"]:
        final.unlink(missing_ok=True)
        raise PermanentError(f"{final.name} holds no LoRA tensors")
    meta = {
        "quant": outtype.upper(),
        "llama_cpp_commit": conv.commit,
        "architecture": info["architecture"],
        "tensor_count": info["tensor_count"],
        "tensor_types": info["tensor_types"],
        "seconds": round(time.monotonic() - started, 2),
    }
    return Artifact.from_path(
        final,
        name=f"gguf-lora:{outtype.upper()}",
        kind=ArtifactKind.GGUF_LORA,
        stage=STAGE,
        inputs=[adapter],
        settings=settings,
        tools=TOOLS,
        meta=meta,
    )


@stage_task(STAGE)
def convert_lora_task(
    adapter: Artifact, base_dir: Path, settings: ConvertSettings, out_dir: Path, model_name: str
) -> Artifact:
    """Prefect task: the adapter alone to a GGUF LoRA (cached by the adapter's digest and the settings)."""
    return convert_lora(adapter, base_dir, settings, out_dir, model_name)


@stage_task(STAGE)
def convert_task(merged: Artifact, settings: ConvertSettings, out_dir: Path, model_name: str) -> Artifact:
    """Prefect task: the merged folder to one GGUF (cached by the merged folder's digest and the settings)."""
    return convert(merged, settings, out_dir, model_name)
