"""A real OpenSSH server on 127.0.0.1 for the download tests and benchmark.

Debian's `/usr/sbin/sshd -D -f <generated config>` on a free port, with a host key and a user key
generated into a temporary folder. Key-only login for the current user (root in CI: PermitRootLogin
prohibit-password), `UsePAM no`, `StrictModes no` (the temp folder is not the user's home) and a PidFile
in the folder. `known_hosts` holds the host key under `[127.0.0.1]:PORT`, the way ssh writes it.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tests.ports import free_port

SSHD = "/usr/sbin/sshd"


def keygen(path: Path, kind: str = "ed25519") -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", "loraship-test", "-f", str(path)], check=True)
    return path


class SshServer:
    """Start with `start()`, stop with `stop()`; `user`, `port`, `user_key`, `known_hosts` describe it."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root or tempfile.mkdtemp(prefix="loraship-sshd-"))
        self.root.mkdir(parents=True, exist_ok=True)
        self.user = getpass.getuser()
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.host_key = keygen(self.root / "ssh_host_ed25519_key")
        self.user_key = keygen(self.root / "id_ed25519")
        self.other_key = keygen(self.root / "id_other")  # a key the server does not accept
        (self.root / "authorized_keys").write_text((self.root / "id_ed25519.pub").read_text())
        os.chmod(self.root / "authorized_keys", 0o600)
        self.known_hosts = self.root / "known_hosts"
        self.log = self.root / "sshd.log"

    @property
    def host_pub_line(self) -> str:
        kind, b64 = (self.root / "ssh_host_ed25519_key.pub").read_text().split()[:2]
        return f"[127.0.0.1]:{self.port} {kind} {b64}"

    def start(self, timeout: float = 20.0) -> SshServer:
        if not Path(SSHD).exists():
            raise RuntimeError(f"{SSHD} is missing: install openssh-server (./setup.sh --test)")
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # privilege separation folder sshd insists on
        self.port = free_port()
        config = self.root / "sshd_config"
        config.write_text(
            "\n".join(
                [
                    f"Port {self.port}",
                    "ListenAddress 127.0.0.1",
                    f"HostKey {self.host_key}",
                    f"PidFile {self.root / 'sshd.pid'}",
                    f"AuthorizedKeysFile {self.root / 'authorized_keys'}",
                    "PermitRootLogin prohibit-password",
                    "PubkeyAuthentication yes",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "UsePAM no",
                    "StrictModes no",
                    "Subsystem sftp internal-sftp",
                    "MaxStartups 50",
                    "MaxSessions 50",
                    "LogLevel ERROR",
                    "",
                ]
            )
        )
        self.known_hosts.write_text(self.host_pub_line + "\n")
        self.proc = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(config)], stdout=subprocess.DEVNULL, stderr=open(self.log, "ab")
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    if s.recv(64).startswith(b"SSH-"):
                        return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("sshd did not answer in time")

    def ssh(self, *command: str) -> subprocess.CompletedProcess:
        """Run a command on the server with the real ssh client (for test set-up and checks)."""
        argv = [
            "ssh",
            "-p",
            str(self.port),
            "-i",
            str(self.user_key),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            f"UserKnownHostsFile={self.known_hosts}",
            "-o",
            "BatchMode=yes",
            f"{self.user}@127.0.0.1",
            *command,
        ]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
