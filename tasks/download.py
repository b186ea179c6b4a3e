"""Stage 1, download: bring the adapter and training metadata into the run folder.

Sources: a local folder (training ran here; the demo uses it), an SSH host (from the settings or a
saved TrainingHost block), or a vast.ai instance id (resolved to its SSH address through vast.ai's API).
Every file is verified by sha256 against the source's digest; files that already match are not copied
again, so a re-run after a finished download transfers nothing. The task is deliberately not cached
by Prefect: the remote can change between runs, and the digest comparison is the cache.

Modules: download_ssh.py (paramiko: host keys, discovery, remote sha256), download_transfer.py (rsync
and the SFTP fallback), download_vastai.py (instance lookup), download_remote.py (the remote pull).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import Field, model_validator

from tasks.core.artifacts import Artifact
from tasks.core.atomic import atomic_path, atomic_write_json
from tasks.core.errors import PermanentError
from tasks.core.hashing import iter_files, sha256_file
from tasks.core.progress import Progress
from tasks.core.settings import SecretRef, StrictModel
from tasks.core.stage import stage_task

STAGE = "download"
log = logging.getLogger("loraship.download")
METADATA_FILES = (
    "adapter_config.json", "trainer_state.json", "training_args.json", "training_args.bin",
    "all_results.json", "train_results.json", "eval_results.json", "results.json",
)  # fmt: skip
DEFAULT_EXCLUDE = ["optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state*.pth", "global_step*/*"]


class DownloadSettings(StrictModel):
    """Where the finished training run is: `local` (a folder here), `ssh` (a host) or `vastai` (an instance)."""

    kind: Literal["local", "ssh", "vastai"] = Field("local", description="local folder, SSH host, or vast.ai instance")
    path: str = Field("", description="the run's output folder: a local path, or the path on the remote (default: the TrainingHost block's remote_path, else /workspace/output)")
    include: list[str] = Field(default_factory=lambda: ["*"], description="glob patterns (matched from the right of the relative path) of files to fetch")
    exclude: list[str] = Field(default_factory=lambda: list(DEFAULT_EXCLUDE), description="glob patterns of files not to fetch (optimizer and RNG state of checkpoints by default)")
    final_glob: str = Field("final*", description="remote: when `path` holds no adapter_config.json, the newest folder matching this glob holding one is fetched")
    checkpoint_glob: str = Field("checkpoint-*", description="remote: else the matching checkpoint folder with the highest step")
    # SSH
    host_block: str | None = Field(None, description="name of a saved TrainingHost block giving host, port, user, key and known_hosts entry; the fields below override it")
    host: str | None = Field(None, description="SSH host name or address")
    port: int | None = Field(None, ge=1, le=65535, description="SSH port (default 22)")
    user: str | None = Field(None, description="SSH user (default root)")
    private_key: SecretRef | None = Field(None, description="reference to the private key's text: env:VAR, secret:NAME or block:training-host/NAME")
    key_file: str | None = Field(None, description="path of a private key file (instead of private_key); neither: ssh-agent and ~/.ssh keys")
    known_hosts: str = Field("~/.ssh/known_hosts", description="known_hosts file the host key is checked against")
    known_hosts_entry: str | None = Field(None, description="one extra known_hosts line for this host, e.g. '[1.2.3.4]:2222 ssh-ed25519 AAAA...'")
    trust_on_first_use: bool = Field(False, description="accept an UNKNOWN host key once (logged with its fingerprint, appended to known_hosts); a changed key is always refused")
    connect_timeout_s: float = Field(20.0, gt=0, description="seconds to wait for the SSH connection")
    io_timeout_s: int = Field(120, ge=10, description="rsync gives up (and the task retries) after this many seconds without data")
    # vast.ai
    instance_id: int | None = Field(None, description="vast.ai instance id (kind: vastai)")
    vastai_api_key: SecretRef = Field(default_factory=lambda: SecretRef.model_validate("env:VAST_API_KEY"), description="reference to the vast.ai API key")
    vastai_url: str = Field("https://console.vast.ai/api/v0", description="vast.ai API base URL")
    vastai_via: Literal["auto", "direct", "proxy"] = Field("auto", description="direct: the instance's public address; proxy: vast.ai's ssh proxy; auto: direct when it has one")
    # transfer
    transfer: Literal["auto", "rsync", "sftp"] = Field("auto", description="auto: rsync over ssh when both sides have rsync, else SFTP with resume")
    remote_rsync: str = Field("rsync", description="rsync program on the remote (rsync --rsync-path)")
    bwlimit_kbps: int | None = Field(None, ge=1, description="bandwidth limit in KiB/s (rsync --bwlimit)")
    compress: bool = Field(False, description="compress on the wire: zstd when both rsyncs support it, else zlib (adapters barely compress: off by default)")

    @model_validator(mode="after")
    def _check(self) -> "DownloadSettings":
        if self.kind == "local" and not self.path:
            raise ValueError("source.path is required for kind: local (the folder holding adapter_config.json)")
        if self.kind == "ssh" and not (self.host or self.host_block):
            raise ValueError("kind: ssh needs source.host or source.host_block (a saved TrainingHost block)")
        if self.kind == "vastai" and self.instance_id is None:
            raise ValueError("kind: vastai needs source.instance_id")
        if self.private_key is not None and self.key_file:
            raise ValueError("give source.private_key or source.key_file, not both")
        return self


BytesHook = Callable[[int], None]


def download(settings: DownloadSettings, dest: Path, *, on_bytes: BytesHook | None = None) -> Artifact:
    """Bring the run into `dest` (verified) and return it as the 'adapter' artifact.

    `on_bytes` is called with the bytes transferred so far (tests and benchmarks use it to interrupt).
    """
    if settings.kind == "local":
        return download_local(settings, dest)
    from tasks.download_remote import download_remote

    return download_remote(settings, dest, on_bytes=on_bytes)


def download_local(settings: DownloadSettings, dest: Path) -> Artifact:
    src = Path(settings.path).expanduser().resolve()
    if not src.is_dir():
        raise PermanentError(f"source.path {src} is not a folder", hint="point source.path at the training output folder (with adapter_config.json)")
    files = [f for f in iter_files(src) if any(f.match(p) for p in settings.include) and not any(f.match(p) for p in settings.exclude)]
    if not files:
        raise PermanentError(f"source.path {src} holds no files matching {settings.include}", hint="check source.path and source.include")
    if not any(f.name == "adapter_config.json" for f in files):
        raise PermanentError(f"no adapter_config.json under {src}", hint="point source.path at the adapter folder (the one save_pretrained wrote)")
    started = time.monotonic()
    total = sum((src / f).stat().st_size for f in files)
    dest.mkdir(parents=True, exist_ok=True)
    known: dict[str, str] = {}
    copied = 0
    fetched = 0
    with Progress(f"download {src.name}", total) as progress:
        for rel in files:
            s, d = src / rel, dest / rel
            digest = sha256_file(s)
            if not (d.is_file() and d.stat().st_size == s.stat().st_size and sha256_file(d) == digest):
                with atomic_path(d) as tmp:
                    shutil.copyfile(s, tmp)
                if sha256_file(d) != digest:
                    raise PermanentError(f"{d} does not match {s} after copying", hint="check the disk")
                copied += s.stat().st_size
                fetched += 1
            known[rel.as_posix()] = digest
            progress.advance(s.stat().st_size)
    removed = remove_extraneous(dest, set(known))
    seconds = time.monotonic() - started
    files_rec = {k: {"sha256": v, "size": (src / k).stat().st_size} for k, v in known.items()}
    training = training_summary(dest)
    record = {"source": "local", "path": str(src), "files": files_rec, "bytes_total": total, "bytes_copied": copied, "removed": removed, "seconds": round(seconds, 3), "training": training}
    atomic_write_json(dest.parent / "download.json", record)
    return Artifact.from_path(
        dest, name="adapter", kind="adapter", stage=STAGE, settings=settings, known=known,
        meta={"source": str(src), "method": "copy" if copied else "none", "metadata_files": metadata_files(dest), "bytes_copied": copied, "files_fetched": fetched, "training": training},
    )  # fmt: skip


def remove_extraneous(dest: Path, keep: set[str]) -> list[str]:
    """Delete files in `dest` that the source no longer has (the artifact must be exactly the source)."""
    removed = []
    for rel in iter_files(dest):
        if rel.as_posix() not in keep:
            (dest / rel).unlink()
            removed.append(rel.as_posix())
    if removed:
        log.info("removed %d file(s) the source no longer has: %s", len(removed), ", ".join(removed[:5]))
    return removed


def metadata_files(dest: Path) -> dict[str, str]:
    return {name: str(dest / name) for name in METADATA_FILES if (dest / name).exists()}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() and path.stat().st_size < 64 << 20 else None
    except (OSError, ValueError):
        return None


def training_summary(folder: Path, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the model card wants to know about the training run (artifact meta `training`).

    Read from adapter_config.json, trainer_state.json, training_args.json and *results.json in `folder`;
    `extra` holds the same files' parsed content found beside the run (e.g. the output root when the run
    folder is a checkpoint). Only small JSON values are kept.
    """
    docs = dict(extra or {})
    for name in METADATA_FILES:
        if name.endswith(".json"):
            doc = _read_json(folder / name)
            if doc is not None:
                docs[name] = doc
    out: dict[str, Any] = {}
    ac = docs.get("adapter_config.json") or {}
    if isinstance(ac, dict):
        out["adapter"] = {k: ac[k] for k in ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "target_modules", "base_model_name_or_path", "use_dora", "use_rslora") if k in ac}
    st = docs.get("trainer_state.json") or {}
    if isinstance(st, dict):
        state = {k: st[k] for k in ("global_step", "epoch", "max_steps", "num_train_epochs", "best_metric", "train_batch_size") if st.get(k) is not None}
        logs = st.get("log_history") or []
        train = [e for e in logs if isinstance(e, dict) and "loss" in e]
        evals = [e for e in logs if isinstance(e, dict) and "eval_loss" in e]
        if train:
            state["final_train_loss"] = train[-1]["loss"]
        if evals:
            state["final_eval_loss"] = evals[-1]["eval_loss"]
        if state:
            out["trainer_state"] = state
    ta = docs.get("training_args.json") or {}
    if isinstance(ta, dict):
        keys = ("learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "lr_scheduler_type", "warmup_ratio", "weight_decay", "optim", "bf16", "fp16", "seed")
        out["training_args"] = {k: ta[k] for k in keys if k in ta}
    results: dict[str, Any] = {}
    for name in ("all_results.json", "train_results.json", "eval_results.json", "results.json"):
        doc = docs.get(name)
        if isinstance(doc, dict):
            results.update({k: v for k, v in doc.items() if isinstance(v, (int, float, str, bool)) and len(str(v)) < 200})
    if results:
        out["results"] = results
    return {k: v for k, v in out.items() if v}


@stage_task(STAGE, cache=False)
def download_task(settings: DownloadSettings, dest: Path) -> Artifact:
    """Not cached: the remote may change; unchanged files are recognised by digest and not re-sent."""
    return download(settings, dest)
