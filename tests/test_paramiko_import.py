"""paramiko is imported without invoke (83 ms of its import), and what paramiko uses invoke for still works."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _fresh(code: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_paramiko_comes_without_invoke_and_match_exec_still_runs_it() -> None:
    out = _fresh(
        """
        import sys
        from tasks.download.paramiko_import import import_paramiko
        paramiko = import_paramiko()
        print("after import:", sorted(m for m in sys.modules if m.split(".")[0] == "invoke"))
        # the one thing paramiko imports invoke for: `Match exec` in an ssh_config
        cfg = paramiko.SSHConfig.from_text("Match exec true\\n  User bob\\nMatch exec false\\n  Port 2222\\n")
        print("lookup:", cfg.lookup("box").get("user"), cfg.lookup("box").get("port"))
        import invoke
        print("real:", type(invoke).__name__ == "module" and hasattr(invoke, "Context"))
        """
    )
    assert "after import: []" in out, out
    assert "lookup: bob None" in out and "real: True" in out, out


def test_invoke_imported_first_is_left_alone() -> None:
    out = _fresh(
        """
        import invoke
        from tasks.download.paramiko_import import import_paramiko
        import paramiko.config
        import_paramiko()
        print(paramiko.config.invoke is invoke)
        """
    )
    assert out.strip() == "True"
