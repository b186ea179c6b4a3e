"""Step 2: the model's files on this machine, from a local folder or a huggingface_hub snapshot.

The snapshot goes into huggingface_hub's cache (or `cache_dir`), which every deployment shares: a
second deployment of the same model and revision finds the files there and downloads nothing.
Progress is counted in bytes: the repo tree gives the total, the cache's blob folder what has arrived
(including partial `.incomplete` files). The whole download runs against one deadline,
`download_timeout_s`, whose error names the setting.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.core.errors import PermanentError, TransientError


@dataclass
class Source:
    """Where the weights are: `path` for a local folder, else the Hub repo id."""

    repo_id: str | None
    path: Path | None

    @property
    def local(self) -> bool:
        return self.path is not None


@dataclass
class Fetched:
    path: Path
    sha: str | None
    pipeline_tag: str | None
    bytes_total: int
    bytes_downloaded: int


def resolve_source(model: str) -> Source:
    """A model folder (config.json), a run folder (its merged/), or a Hub id; anything else names `model`."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    p = Path(model).expanduser()
    if p.is_dir():
        for candidate in (p, p / "merged"):
            if (candidate / "config.json").is_file():
                return Source(None, candidate.resolve())
        raise PermanentError(
            f"model: the folder {p} has no config.json (nor merged/config.json)",
            hint="pass a transformers model folder, a run folder with merged/, or a Hub id",
        )
    if model.startswith((".", "/", "~")) or p.exists():
        raise PermanentError(f"model: {model} is not a folder", hint="pass a model folder or a Hub id (owner/name)")
    try:
        validate_repo_id(model)
    except HFValidationError as exc:
        raise PermanentError(f"model: {model!r} is neither a folder nor a Hub id ({exc})")
    return Source(model, None)


def readme_pipeline_tag(folder: Path) -> str | None:
    """`pipeline_tag` from the model card's YAML header, if there is one."""
    readme = folder / "README.md"
    if not readme.is_file():
        return None
    text = readme.read_text(errors="replace")
    if not text.startswith("---"):
        return None
    import yaml

    try:
        meta = yaml.safe_load(text.split("---", 2)[1]) or {}
    except yaml.YAMLError:
        return None
    tag = meta.get("pipeline_tag") if isinstance(meta, dict) else None
    return str(tag) if tag else None


def _blob_bytes(repo_cache: Path) -> int:
    blobs = repo_cache / "blobs"
    if not blobs.is_dir():
        return 0
    total = 0
    for f in blobs.iterdir():
        try:
            total += f.stat().st_size
        except OSError:
            pass
    return total


def fetch(
    repo_id: str,
    revision: str | None,
    timeout_s: float,
    cache_dir: str | None = None,
    endpoint: str | None = None,
    on_bytes: Callable[[int, int], None] | None = None,
) -> Fetched:
    """Snapshot `repo_id` at `revision` into the shared cache, reporting (done, total) bytes."""
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.hf_api import RepoFile

    cache = Path(cache_dir or constants.HF_HUB_CACHE)
    repo_cache = cache / f"models--{repo_id.replace('/', '--')}"
    before = _blob_bytes(repo_cache)
    out: dict[str, Any] = {}

    def work() -> None:
        try:
            api = HfApi(endpoint=endpoint)
            info = api.model_info(repo_id, revision=revision)
            out["sha"], out["tag"] = info.sha, getattr(info, "pipeline_tag", None)
            tree = api.list_repo_tree(repo_id, revision=info.sha, recursive=True)
            out["total"] = sum(f.size for f in tree if isinstance(f, RepoFile))
            out["path"] = snapshot_download(repo_id, revision=info.sha, cache_dir=str(cache), endpoint=endpoint)
        except BaseException as exc:
            out["error"] = exc

    t = threading.Thread(target=work, name="model-api-download", daemon=True)
    started = time.monotonic()
    t.start()
    while t.is_alive():
        t.join(0.2)
        if on_bytes and "total" in out:
            on_bytes(min(_blob_bytes(repo_cache), out["total"]), out["total"])
        if time.monotonic() - started > timeout_s and t.is_alive():
            got = _blob_bytes(repo_cache) - before
            raise PermanentError(
                f"downloading {repo_id} did not finish within download_timeout_s={timeout_s:g}s "
                f"({got} bytes arrived{', of ' + str(out['total']) if 'total' in out else ''})",
                hint="raise download_timeout_s (--download-timeout-s), or check the network and HF_ENDPOINT",
            )
    if "error" in out:
        exc = out["error"]
        from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

        if isinstance(exc, (RepositoryNotFoundError, RevisionNotFoundError)):
            raise PermanentError(f"model: {repo_id}@{revision or 'main'} not found on the Hub ({exc})")
        if isinstance(exc, HfHubHTTPError) and exc.response is not None and exc.response.status_code in (401, 403):
            raise PermanentError(
                f"model: no access to {repo_id} ({exc})", hint="set HF_TOKEN to a token that can read it"
            )
        raise TransientError(f"downloading {repo_id} failed: {type(exc).__name__}: {exc}")
    total = int(out.get("total") or 0)
    if on_bytes:
        on_bytes(total, total)
    return Fetched(Path(out["path"]), out.get("sha"), out.get("tag"), total, _blob_bytes(repo_cache) - before)
