"""Constants in one place: where the project's files are, where it caches, the names it writes.

Paths are computed from this file, so they hold in a checkout, an editable install and a wheel alike.
"""

from __future__ import annotations

import os
from pathlib import Path

#: The folder holding the importable packages (flows/, tasks/, templates/ ...): a checkout's root.
PROJECT_ROOT: Path = Path(__file__).resolve().parents[2]
#: Data files shipped with the stages (eval samples, held-out text, quantize costs, the demo's toy task).
TASKS_DATA: Path = PROJECT_ROOT / "tasks" / "data"
#: jinja2 templates (model card, Space apps, Ollama Modelfile), shipped as package data.
TEMPLATES_DIR: Path = PROJECT_ROOT / "templates"
#: Environment variable naming the loraship cache/home folder.
CACHE_ENV = "LORASHIP_CACHE"


def cache_root() -> Path:
    """Where built fixtures, the llama.cpp converter and other reusable downloads live (`$LORASHIP_CACHE`)."""
    base = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "loraship"
    )
    return Path(base)
