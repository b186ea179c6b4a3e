"""Import paramiko without paying for invoke, which it imports for one rarely used feature.

paramiko.config imports `invoke` at import time, only to run the `Match exec` lines of an ssh_config; loraship
never hands paramiko an ssh_config, yet invoke's import (it pulls in yaml, asyncio and unittest.mock) was 83 ms of
paramiko's 146 ms, inside every download's time to connect. While paramiko is imported, `sys.modules["invoke"]`
holds a stand-in that imports the real invoke on the first attribute read from it; right after, the entry is
removed again, so the stand-in lives on only as paramiko.config's name `invoke`, and any other code importing
invoke gets the real module. (`importlib.util.LazyLoader` does not fit: on Python 3.11 the `import invoke`
statement itself reads the module's `__spec__`, which makes a lazy module load at once.)
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
from types import ModuleType

_lock = threading.Lock()


class _OnFirstUse(ModuleType):
    """Stands in for a module in one importer's namespace; the real module is imported on the first read."""

    def __getattr__(self, attr: str) -> object:
        if sys.modules.get(self.__name__) is self:
            del sys.modules[self.__name__]
        return getattr(importlib.import_module(self.__name__), attr)


def import_paramiko() -> ModuleType:
    """paramiko, imported with invoke deferred to its first use (see the module docstring)."""
    with _lock:
        if "paramiko" not in sys.modules and "invoke" not in sys.modules and importlib.util.find_spec("invoke"):
            stand_in = _OnFirstUse("invoke")
            sys.modules["invoke"] = stand_in
            try:
                import paramiko  # noqa: F401  its config module binds the stand-in
            finally:
                if sys.modules.get("invoke") is stand_in:
                    del sys.modules["invoke"]
    import paramiko

    return paramiko
