"""Loopback ports for the test servers (sshd, Prefect, Gradio apps, llama.cpp servers), in one place.

`free_port()` asks the kernel for a port nobody holds right now (bind to port 0, read it, release it): the
server started next binds it. `silent_listener()` is a socket that accepts connections and never answers,
for the timeouts tests (an SSH box without a banner, a Hub that never replies).
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def free_port_range(span: int) -> int:
    """The first of `span` ports that are probably free: a kernel-chosen port low enough that the range
    stays below the ephemeral end (above 60000 the range would run out, so 20000 is taken instead)."""
    port = free_port()
    return port if port + span < 60000 else 20000


@contextlib.contextmanager
def silent_listener(port: int = 0, backlog: int = 16) -> Iterator[socket.socket]:
    """A listening socket on `port` (0: any) that accepts and never says a word; closed on exit."""
    sock = socket.socket()
    # as servers do: a connection of an earlier server in TIME_WAIT does not make the port busy, a listener does
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((HOST, port))
        sock.listen(backlog)
        yield sock
    finally:
        sock.close()
