"""Download sources (`source.kind`): one table, one small contract (tasks/download/sources/base.py).

    local    a folder on this machine (the demo)
    ssh      a training box over SSH: rsync, SFTP fallback (tasks/download/remote.py does the pull)
    vastai   a vast.ai instance id, resolved to its SSH address, then as ssh

Adding a source is one file: a `Source` subclass in this package (name, description, `check(settings)`,
`unavailable()`, `available(settings)`, `fetch(settings, dest, on_bytes)`) and its instance in `SOURCES` below (or
`SOURCES.register(MySource())` from your own package). `source.kind` is validated against this table;
`python -m pytest -q -p no:cacheprovider tests/test_download_sources.py` runs the conformance checks over
every entry.
"""

from __future__ import annotations

from tasks.core.registry import Contract, Registry
from tasks.download.sources.base import Source
from tasks.download.sources.local import LocalSource
from tasks.download.sources.ssh import SshSource
from tasks.download.sources.vastai import VastaiSource

SOURCES: Registry[Source] = Registry(
    "download source",
    "source.kind",
    [LocalSource(), SshSource(), VastaiSource()],
    contract=Contract(Source, run="fetch", unavailable=Source.unavailable),
)

__all__ = ["SOURCES", "Source"]
