"""The SSH key on every path: never on disk when paramiko alone needs it; when rsync needs a key file,
the file is removed on every exit (authentication failure, refused host key, timeout, Ctrl-C).

Against Debian's sshd on loopback (tests/sshd.py) with real rsync."""

from __future__ import annotations

import socket
import tempfile
import threading
from pathlib import Path

import pytest

from tasks.core.errors import PermanentError, TransientError
from tasks.download import ssh as ssh_module
from tasks.download.stage import DownloadSettings, download
from tests.ports import silent_listener
from tests.test_download_ssh import make_run

pytestmark = pytest.mark.filterwarnings("ignore:Logger 'loraship.download' attempted to send logs")


@pytest.fixture
def private_tmp(tmp_path, monkeypatch) -> Path:
    """Temporary folders of this test go here, so what a download leaves behind can be seen."""
    d = tmp_path / "tmp"
    d.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    return d


def _key_settings(server, path, key_path: Path, monkeypatch, **kw) -> DownloadSettings:
    monkeypatch.setenv("LORASHIP_TEST_SSH_KEY", key_path.read_text())
    base = dict(
        kind="ssh",
        host="127.0.0.1",
        port=server.port,
        user=server.user,
        private_key="env:LORASHIP_TEST_SSH_KEY",
        known_hosts=str(server.known_hosts),
        path=str(path),
    )
    base.update(kw)
    return DownloadSettings(**base)


def _leftovers(private_tmp: Path) -> list[str]:
    return sorted(p.name for p in private_tmp.iterdir())


def test_the_key_file_is_gone_after_an_authentication_failure(ssh_server, tmp_path, private_tmp, monkeypatch):
    run = make_run(tmp_path / "remote", big=1000)
    settings = _key_settings(ssh_server, run, ssh_server.other_key, monkeypatch)
    with pytest.raises(PermanentError, match="authentication"):
        download(settings, tmp_path / "a" / "adapter")
    assert _leftovers(private_tmp) == []


def test_the_key_file_is_gone_after_a_refused_host_key(ssh_server, tmp_path, private_tmp, monkeypatch):
    run = make_run(tmp_path / "remote", big=1000)
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    settings = _key_settings(ssh_server, run, ssh_server.user_key, monkeypatch, known_hosts=str(empty))
    with pytest.raises(PermanentError, match="not in known_hosts"):
        download(settings, tmp_path / "a" / "adapter")
    assert _leftovers(private_tmp) == []


def test_the_key_file_is_gone_after_a_timeout(tmp_path, private_tmp, monkeypatch):
    key = tmp_path / "id"
    from tests.sshd import keygen

    keygen(key)
    monkeypatch.setenv("LORASHIP_TEST_SSH_KEY", key.read_text())
    accepted: list[socket.socket] = []
    with silent_listener(backlog=8) as silent:  # accepts connections and never says a word (no SSH banner)
        threading.Thread(target=lambda: accepted.append(silent.accept()[0]), daemon=True).start()
        settings = DownloadSettings(
            kind="ssh",
            host="127.0.0.1",
            port=silent.getsockname()[1],
            private_key="env:LORASHIP_TEST_SSH_KEY",
            connect_timeout_s=1.0,
            path="/x",
        )
        try:
            with pytest.raises(TransientError):
                download(settings, tmp_path / "a" / "adapter")
        finally:
            for s in accepted:
                s.close()
    assert _leftovers(private_tmp) == []


def test_paramiko_alone_never_writes_the_key(ssh_server, tmp_path, private_tmp, monkeypatch):
    """SFTP transfer: every question and the bytes go through paramiko, which has the key in memory."""
    written: list[str] = []
    real_open = ssh_module.os.open

    def spy(path, *a, **kw):
        written.append(str(path))
        return real_open(path, *a, **kw)

    monkeypatch.setattr(ssh_module.os, "open", spy)
    run = make_run(tmp_path / "remote", big=2000)
    settings = _key_settings(ssh_server, run, ssh_server.user_key, monkeypatch, transfer="sftp")
    art = download(settings, tmp_path / "a" / "adapter")
    assert art.meta["method"] == "sftp"
    assert not [w for w in written if w.endswith("/id")], written
    assert _leftovers(private_tmp) == []


def test_rsync_gets_a_key_file_only_for_the_transfer_and_ctrl_c_removes_it(
    ssh_server, tmp_path, private_tmp, monkeypatch
):
    run = make_run(tmp_path / "remote", big=8_000_000)
    settings = _key_settings(ssh_server, run, ssh_server.user_key, monkeypatch, transfer="rsync", bwlimit_kbps=2000)
    seen: list[list[str]] = []

    def interrupt(done: int) -> None:
        seen.append(_leftovers(private_tmp))
        if done > 0:
            raise KeyboardInterrupt

    from tasks.download.remote import download_remote

    with pytest.raises(KeyboardInterrupt):
        download_remote(settings, tmp_path / "a" / "adapter", on_bytes=interrupt)
    assert seen and seen[0], "a private folder (key file for rsync's ssh) existed during the transfer"
    assert _leftovers(private_tmp) == []
    art = download(settings.model_copy(update={"bwlimit_kbps": None}), tmp_path / "a" / "adapter")
    assert art.meta["method"] == "rsync" and _leftovers(private_tmp) == []
