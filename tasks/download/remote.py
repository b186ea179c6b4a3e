"""The remote pull (kind: ssh and kind: vastai): discover, hash remotely, skip what matches, transfer,
verify, re-fetch a bad file once, record download.json and return the 'adapter' artifact.

Settings resolution: explicit source fields win over a saved TrainingHost block (`source.host_block`);
a vast.ai instance id fills host and port. The private key is resolved here, inside the stage, and only
ever lives in a SecretStr or a private temporary file (see download_ssh.py).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.core.artifacts import Artifact
from tasks.core.atomic import atomic_write_json
from tasks.core.errors import PermanentError
from tasks.core.hashing import sha256_file
from tasks.core.progress import Progress
from tasks.core.scrub import register_secret
from tasks.core.threads import context_thread
from tasks.core.vocab import ArtifactKind
from tasks.download.metadata import metadata_files, remove_extraneous, training_summary
from tasks.download.method import Puller
from tasks.download.ssh import RemoteFile, RemoteSession, SshTarget, fingerprint, local_target
from tasks.download.transfer import SFTP_PARTIAL, TransferStats, clean_partials
from tasks.download.vocab import ADAPTER_MARKER, METADATA_FILES, STAGE, BytesHook

if TYPE_CHECKING:
    from tasks.download.settings import DownloadSettings

log = logging.getLogger("loraship.download")
DEFAULT_REMOTE_PATH = "/workspace/output"


def resolve_target(settings: DownloadSettings) -> tuple[SshTarget, str, dict[str, Any]]:
    """(SSH target, remote path, facts for the record) from the settings, a TrainingHost block, vast.ai."""
    block: Any = None
    facts: dict[str, Any] = {"source": settings.kind}
    if settings.host_block:
        from blocks.training_host import TrainingHost

        try:
            block = TrainingHost.load(settings.host_block)
        except ValueError:
            raise PermanentError(
                f"no saved TrainingHost block named {settings.host_block!r}",
                hint="create it in the Prefect UI or with TrainingHost(...).save(name), or fix source.host_block",
            ) from None
        facts["host_block"] = settings.host_block
    host = settings.host or (block.host if block else None)
    port = settings.port or (block.port if block else 22)
    if settings.kind == "vastai":
        from tasks.download.vastai import resolve_instance

        inst = resolve_instance(
            settings.instance_id, settings.vastai_api_key.resolve(), settings.vastai_url, via=settings.vastai_via
        )
        host, port = inst.host, inst.port
        facts["vastai"] = {"instance_id": inst.instance_id, "status": inst.status, "via": inst.via}
    if not host:
        raise PermanentError("no SSH host to download from", hint="set source.host or source.host_block")
    key_text = None
    if settings.private_key is not None:
        key_text = settings.private_key.resolve()
    elif not settings.key_file and block is not None and block.private_key is not None:
        key_text = block.private_key
        register_secret(key_text)
    entries = [e for e in (settings.known_hosts_entry, block.known_hosts_entry if block else None) if e]
    target = SshTarget(
        host=host,
        port=int(port),
        user=settings.user or (block.user if block else "root"),
        key_text=key_text,
        key_file=Path(settings.key_file).expanduser() if settings.key_file else None,
        known_hosts=Path(settings.known_hosts).expanduser() if settings.known_hosts else None,
        known_hosts_entries=entries,
        trust_on_first_use=settings.trust_on_first_use,
        connect_timeout=settings.connect_timeout_s,
    )
    path = settings.path or (block.remote_path if block else "") or DEFAULT_REMOTE_PATH
    return target, path, facts


class _Background:
    """A call on its own thread (paramiko opens a channel per remote command, so remote questions can be
    asked side by side): the remote sha256 overlaps the local hashing and, on a fresh pull, the transfer
    itself. `result()` waits and re-raises the call's error."""

    def __init__(self, name: str, fn: Callable[[], Any]):
        self._out: Any = None
        self._err: BaseException | None = None

        def work() -> None:
            try:
                self._out = fn()
            except BaseException as exc:  # handed to the caller in result()
                self._err = exc

        self._thread = context_thread(work, name=name)
        self._thread.start()

    def result(self) -> Any:
        self._thread.join()
        if self._err is not None:
            raise self._err
        return self._out


def _local_digests(dest: Path, files: list[RemoteFile]) -> dict[str, str]:
    """sha256 of the local copies that exist with the remote's size (candidates for no transfer)."""
    out = {}
    for f in files:
        p = local_target(dest, f.rel)
        if p.is_file() and p.stat().st_size == f.size:
            out[f.rel] = sha256_file(p)
    return out


def _parent_metadata(session: RemoteSession, root: str, run_dir: str) -> dict[str, Any]:
    """Small training JSON files in the output root when the run folder is below it (e.g. all_results.json)."""
    out: dict[str, Any] = {}
    if root.rstrip("/") == run_dir.rstrip("/"):
        return out
    for name in METADATA_FILES:
        if not name.endswith(".json"):
            continue
        try:
            st = session.sftp.stat(f"{root}/{name}")
            if not stat.S_ISREG(st.st_mode or 0) or (st.st_size or 0) > 4 << 20:
                continue
            with session.sftp.open(f"{root}/{name}", "rb") as fh:
                out[name] = json.loads(fh.read().decode("utf-8"))
        except (OSError, ValueError):
            continue
    return out


def download_remote(settings: DownloadSettings, dest: Path, *, on_bytes: BytesHook | None = None) -> Artifact:
    """Pull the run folder over SSH into `dest`: only files whose sha256 differs from the remote's travel, every
    file is verified against the remote's sha256 (a mismatch is fetched once more from scratch), and what is
    not part of the run is removed. Writes download.json beside `dest`; returns the `adapter` artifact."""
    started_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    t0 = time.monotonic()
    target, path, facts = resolve_target(settings)
    dest.mkdir(parents=True, exist_ok=True)
    early = settings.io_timeout_s if settings.transfer != "sftp" else None
    with RemoteSession(target, openssh_early=early) as session:
        root = session.realpath(path)
        run_dir, how, files = _select_run(session, settings, target, root)
        rels = [f.rel for f in files]
        hashing = _Background("remote-sha256", lambda: session.sha256(run_dir, rels))
        local = _local_digests(dest, files)
        verified: dict[str, str] = {}
        expected: dict[str, str] = {}
        if local:  # something is here already: compare before deciding what to send
            expected = hashing.result()
            verified = {rel: d for rel, d in local.items() if expected[rel] == d}
        todo = [f for f in files if f.rel not in verified]
        removed = remove_extraneous(dest, {f.rel for f in files})
        stats_list: list[TransferStats] = []
        refetched: list[str] = []
        method = "none"
        if todo:
            pull = Puller(session, settings, run_dir, dest, on_bytes)
            label = f"download {Path(run_dir).name} from {target.host}"
            stats_list, refetched = _fetch_verified(
                pull, todo, dest, lambda: expected or hashing.result(), verified, label
            )
            method = pull.method
        else:
            log.info("all %d file(s) already here with matching sha256: nothing to transfer", len(files))
        expected = expected or hashing.result()
        clean_partials(dest)
        removed += remove_extraneous(dest, set(verified))  # only verified files may end up in the artifact
        parent_meta = _parent_metadata(session, root, run_dir)
        host_fp = fingerprint(session.host_key)
    seconds = time.monotonic() - t0
    wire = sum(s.bytes_received for s in stats_list)
    training = training_summary(dest, parent_meta)
    record = {
        **facts,
        "host": target.host,
        "port": target.port,
        "user": target.user,
        "host_key": host_fp,
        "remote_path": run_dir,
        "selected": how,
        "method": method,
        "started_at": started_at,
        **_transfer_record(files, expected, stats_list, seconds),
        "refetched": refetched,
        "removed": removed,
        "training": training,
        "training_metadata_beside_run": parent_meta,
    }
    atomic_write_json(dest.parent / "download.json", record)
    log.info(
        "download: %s, %d file(s) fetched (%.1f MB over the wire) in %.1f s",
        method,
        len(record["files_fetched"]),
        wire / 1e6,
        seconds,
    )
    return Artifact.from_path(
        dest,
        name="adapter",
        kind=ArtifactKind.ADAPTER,
        stage=STAGE,
        settings=settings,
        known=verified,
        tools=["paramiko"],
        meta={
            "source": f"{target.label}:{run_dir}",
            "selected": how,
            "method": method,
            "host_key": host_fp,
            "bytes_received": wire,
            "files_fetched": len(record["files_fetched"]),
            "metadata_files": metadata_files(dest),
            "training": training,
            "download_record": str(dest.parent / "download.json"),
            **({"vastai": facts["vastai"]} if "vastai" in facts else {}),
        },
    )


def _select_run(
    session: RemoteSession, settings: DownloadSettings, target: SshTarget, root: str
) -> tuple[str, str, list[RemoteFile]]:
    """(run folder, how it was chosen, its selected files) below `root`; it must hold the adapter's config."""
    run_dir, how = session.find_run(root, settings.final_glob, settings.checkpoint_glob)
    files = session.list_files(run_dir, settings.include, settings.exclude)
    if not files:
        raise PermanentError(
            (
                f"{run_dir} on {target.host} holds no files matching include {settings.include} / exclude "
                f"{settings.exclude}"
            ),
            hint="check source.path, source.include and source.exclude",
        )
    if not any(f.rel == ADAPTER_MARKER for f in files):
        raise PermanentError(
            f"{run_dir} on {target.host} has no {ADAPTER_MARKER} among the selected files",
            hint="check source.include / source.exclude",
        )
    log.info("run folder %s (%s): %d file(s), %.1f MB", run_dir, how, len(files), sum(f.size for f in files) / 1e6)
    return run_dir, how, files


def _fetch_verified(
    pull: Callable[[list[RemoteFile], Progress], TransferStats],
    todo: list[RemoteFile],
    dest: Path,
    expected_digests: Callable[[], dict[str, str]],
    verified: dict[str, str],
    label: str,
) -> tuple[list[TransferStats], list[str]]:
    """Pull `todo`, check every file against the remote's sha256 (into `verified`), and pull the mismatches once
    more from scratch; a second mismatch is a PermanentError. Returns the transfers' stats and the re-fetched."""
    stats_list: list[TransferStats] = []
    refetched: list[str] = []
    for attempt in (1, 2):
        with Progress(label, sum(f.size for f in todo)) as progress:
            st = pull(todo, progress)
        stats_list.append(st)
        expected = expected_digests()
        bad = []
        for f in todo:
            got = st.digests.get(f.rel) or sha256_file(local_target(dest, f.rel))
            if got == expected[f.rel]:
                verified[f.rel] = got
            else:
                bad.append(f)
        if not bad:
            break
        names = ", ".join(f.rel for f in bad)
        if attempt == 2:
            raise PermanentError(
                f"sha256 of {names} still differs from the remote after a re-fetch",
                hint="is training still writing to that folder? check the disk here and on the box",
            )
        log.warning("sha256 mismatch after transfer: %s; fetching again from scratch", names)
        refetched = [f.rel for f in bad]
        for f in bad:
            local_target(dest, f.rel).unlink(missing_ok=True)
            (dest / SFTP_PARTIAL / f.rel).unlink(missing_ok=True)
        clean_partials(dest)
        todo = bad
    return stats_list, refetched


def _transfer_record(
    files: list[RemoteFile], expected: dict[str, str], stats_list: list[TransferStats], seconds: float
) -> dict[str, Any]:
    """download.json's account of what travelled: per-file digests and sizes, bytes, rsync's numbers, speed."""
    fetched = {r for s in stats_list for r in s.files}
    fetched_bytes = sum(f.size for f in files if f.rel in fetched)
    return {
        "files": {f.rel: {"sha256": expected[f.rel], "size": f.size} for f in files},
        "bytes_total": sum(f.size for f in files),
        "bytes_fetched": fetched_bytes,
        "bytes_received": sum(s.bytes_received for s in stats_list),
        "literal_bytes": sum(s.literal_bytes for s in stats_list),
        "matched_bytes": sum(s.matched_bytes for s in stats_list),
        "compression": next((s.compression for s in stats_list if s.compression), None),
        "files_fetched": sorted(fetched),
        "hashed_on_arrival": sorted({r for s in stats_list for r in s.digests}),
        "seconds": round(seconds, 3),
        "throughput_mb_s": round(fetched_bytes / 1e6 / seconds, 2) if fetched_bytes and seconds else None,
    }
