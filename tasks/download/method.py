"""Which transfer carries the files (rsync over the session's ssh, or SFTP with resume) and the fall back.

rsync starts without asking the remote's `rsync --version` first: that is a remote command of its own (a
session, a shell and a process on the box: ~0.15 s on loopback, a round trip more on a real link, and on a
busy box CPU taken from the transfer), needed before the transfer only when compression must pick a codec
both sides know. Only when rsync fails is it asked, and it decides: the remote has no working rsync -> the
same files go over SFTP (`transfer: auto`) or the error says so (`transfer: rsync`); it has one -> rsync's
own error stands.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.core.errors import PermanentError, TransientError
from tasks.core.progress import Progress
from tasks.download.ssh import RemoteFile, RemoteSession
from tasks.download.transfer import TransferStats, local_rsync_info, rsync_pull, sftp_pull
from tasks.download.vocab import BytesHook

if TYPE_CHECKING:
    from tasks.download.settings import DownloadSettings

log = logging.getLogger("loraship.download")


class Puller:
    """`pull(files, progress)` by the chosen method; `method` says which one carried the files."""

    def __init__(
        self,
        session: RemoteSession,
        settings: DownloadSettings,
        run_dir: str,
        dest: Path,
        on_bytes: BytesHook | None = None,
    ) -> None:
        self._session, self._settings, self._run_dir, self._dest = session, settings, run_dir, dest
        self._on_bytes = on_bytes
        self._local: dict[str, Any] | None = None
        self._remote: dict[str, Any] | None = None
        self._asked = False
        self.method = self._first_choice()

    def _first_choice(self) -> str:
        if self._settings.transfer == "sftp":
            return "sftp"
        self._local = local_rsync_info()
        if self._local is None:
            return self._fall_back("rsync is not installed here")
        if self._settings.compress:  # the codec must be one both sides list: ask before starting
            if self._remote_rsync() is None:
                return self._fall_back(self._no_remote())
        return "rsync"

    def _remote_rsync(self) -> dict[str, Any] | None:
        """The remote's rsync (version, compressions) or None, asked once."""
        if not self._asked:
            self._remote, self._asked = self._session.rsync_info(self._settings.remote_rsync), True
        return self._remote

    def _remote_rsync_or(self, failed: BaseException) -> dict[str, Any] | None:
        """The remote's rsync after rsync failed; if asking fails too (the connection is gone), rsync's error."""
        try:
            return self._remote_rsync()
        except (PermanentError, TransientError):
            raise failed from None

    def _no_remote(self) -> str:
        return f"the remote has no working {self._settings.remote_rsync!r}"

    def _fall_back(self, why: str) -> str:
        if self._settings.transfer == "rsync":
            raise PermanentError(
                f"source.transfer is rsync but {why}",
                hint="install rsync on both sides, or set source.transfer: auto (falls back to SFTP)",
            )
        log.warning("%s: falling back to SFTP (resumable, no delta transfer)", why)
        return "sftp"

    def __call__(self, batch: list[RemoteFile], progress: Progress) -> TransferStats:
        if self.method == "rsync":
            try:
                return self._rsync(batch, progress)
            except (PermanentError, TransientError) as failed:
                if self._remote_rsync_or(failed) is not None:
                    raise  # rsync is there: its own error says what went wrong
                self.method = self._fall_back(self._no_remote())
        return sftp_pull(self._session, self._run_dir, batch, self._dest, progress=progress, on_bytes=self._on_bytes)

    def _rsync(self, batch: list[RemoteFile], progress: Progress) -> TransferStats:
        s = self._settings
        assert self._local is not None  # _first_choice chose rsync only with a local rsync
        return rsync_pull(
            self._session,
            self._run_dir,
            batch,
            self._dest,
            local=self._local,
            remote=self._remote or {},
            remote_rsync=s.remote_rsync,
            bwlimit_kbps=s.bwlimit_kbps,
            compress=s.compress,
            io_timeout=s.io_timeout_s,
            progress=progress,
            on_bytes=self._on_bytes,
        )
