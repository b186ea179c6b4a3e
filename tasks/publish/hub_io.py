"""The Hub client as the publishing stages use it: one HfApi per endpoint+token, and errors translated.

huggingface_hub does the protocol (preupload, LFS batch, NDJSON commits, Space settings); this module
only decides what an error means for the pipeline. 401/403/404 and bad names fail at once with a message
that says what to change (a read-only token, a wrong namespace, a typo in the repo id); 5xx, 429 and
timeouts are `TransientError`s that the stage task retries with backoff. The token never appears in a
message: huggingface_hub does not echo it, and `_scrub` removes it from anything we re-raise.

The endpoint is passed explicitly to every HfApi (settings or the HubCredentials block), because the
module-level helpers of huggingface_hub read HF_ENDPOINT once, at import time.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tasks.core.errors import PermanentError, TransientError, is_transient
from tasks.core.hashing import iter_files, sha256_file
from tasks.core.progress import Progress

log = logging.getLogger("loraship.hub")

#: The public Hub; a setting or HF_ENDPOINT names another (a local Hub-compatible server in tests).
HUB_ENDPOINT = "https://huggingface.co"
_PUBLIC_HUB = (HUB_ENDPOINT, "https://hf.co")


def hub_endpoint(endpoint: str | None = None) -> str:
    """The endpoint the links name: the setting, else HF_ENDPOINT, else the public Hub; no trailing '/'."""
    return (endpoint or os.environ.get("HF_ENDPOINT") or HUB_ENDPOINT).rstrip("/")


def repo_url(endpoint: str | None, repo_id: str, repo_type: str = "model") -> str:
    """A repo's page: `<endpoint>/<id>` for a model, `<endpoint>/spaces/<id>` for a Space."""
    prefix = {"model": "", "space": "spaces/", "dataset": "datasets/"}[repo_type]
    return f"{hub_endpoint(endpoint)}/{prefix}{repo_id}"


def space_embed_url(space_id: str, endpoint: str | None) -> str:
    """Where a Space's app itself is served, for an embed snippet: https://<owner>-<name>.hf.space on the
    public Hub (lower case, '_' and '.' as '-'); on another endpoint (a local Hub) its Space page."""
    if hub_endpoint(endpoint) in _PUBLIC_HUB:
        return "https://" + re.sub(r"[._]", "-", space_id.replace("/", "-").lower()) + ".hf.space"
    return repo_url(endpoint, space_id, "space")


def hub_api(endpoint: str | None, token: str | None) -> Any:
    """An HfApi for `endpoint` (None: HF_ENDPOINT or huggingface.co) authenticated with `token`."""
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    from huggingface_hub import HfApi

    return HfApi(endpoint=(endpoint or None), token=token or False, library_name="loraship")


def _scrub(text: str, token: str | None) -> str:
    return text.replace(token, "<token>") if token else text


def translate(
    exc: BaseException, *, what: str, repo_id: str, token: str | None = None, repo_type: str = "model"
) -> Exception:
    """The pipeline error for a failed Hub call `what` on `repo_id` (raise it `from exc`)."""
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(exc, (PermanentError, TransientError)):
        return exc
    status = getattr(getattr(exc, "response", None), "status_code", None)
    detail = _scrub(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__, token)
    kind = "Space" if repo_type == "space" else "repo"
    if isinstance(exc, HfHubHTTPError) or status is not None:
        if status == 401:
            return PermanentError(
                f"{what} {repo_id}: the Hub refused the token (401: {detail})",
                hint=(
                    "the token is invalid or expired: create a new one at https://huggingface.co/settings/tokens "
                    "and update the secret it is read from"
                ),
            )
        if status == 403:
            return PermanentError(
                f"{what} {repo_id}: the token has no write access here (403: {detail})",
                hint=(
                    f"use a token with write access to the namespace {repo_id.split('/')[0]!r} (a fine-grained "
                    "token needs 'write' on it), and keep the read-only token for the Space"
                ),
            )
        if status == 404:
            return PermanentError(
                f"{what} {repo_id}: {kind} not found (404: {detail})",
                hint=f"check the {kind} id (owner/name) and that the token's user can see it",
            )
        if status in (400, 422):
            return PermanentError(
                f"{what} {repo_id}: the Hub rejected the request ({status}: {detail})",
                hint=f"check the {kind} name: letters, digits, '-', '_' and '.' only, at most 96 characters",
            )
        if status == 409:
            return PermanentError(
                f"{what} {repo_id}: conflict (409: {detail})",
                hint="another commit or tag with that name exists; re-run to pick up the new state",
            )
        if status == 412:
            return TransientError(f"{what} {repo_id}: the repo changed during the push (412); retrying on the new head")
        if status is not None and (status >= 500 or status in (408, 429)):
            return TransientError(f"{what} {repo_id}: the Hub answered {status} ({detail}); retrying")

    if is_transient(exc):
        return TransientError(f"{what} {repo_id}: {type(exc).__name__}: {detail}; retrying")
    return PermanentError(f"{what} {repo_id}: {type(exc).__name__}: {detail}")


@contextlib.contextmanager
def translated(what: str, repo_id: str, *, token: str | None = None, repo_type: str = "model") -> Iterator[None]:
    """Run the block's Hub calls with their failures raised as pipeline errors (`translate`), token scrubbed."""
    try:
        yield
    except Exception as exc:
        raise translate(exc, what=what, repo_id=repo_id, token=token, repo_type=repo_type) from exc


def hub_caller(repo_id: str, *, token: str | None, repo_type: str = "model") -> Callable[..., Any]:
    """`call(what, fn, *args, **kwargs)`: `fn(*args, **kwargs)` on `repo_id`, its failure translated as above.

    The one wrapper every publishing stage uses around huggingface_hub calls, so a 401/403/404/5xx means the
    same thing (and says the same thing) wherever it happens."""

    def call(what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        with translated(what, repo_id, token=token, repo_type=repo_type):
            return fn(*args, **kwargs)

    return call


def whoami(api: Any, token: str) -> dict[str, Any]:
    """The token's user, checked once before any upload (a bad token fails here, not mid-upload)."""
    with translated("whoami", "(token check)", token=token):
        return api.whoami(token=token)


def validate_card_remote(api: Any, content: str, token: str | None, repo_type: str = "model") -> None:
    """Ask the Hub to validate a README's YAML header (the same check the Hub runs on push)."""
    from huggingface_hub.utils import get_session, hf_raise_for_status

    headers = api._build_hf_headers(token=token) if token else {}
    resp = get_session().post(
        f"{api.endpoint}/api/validate-yaml", json={"content": content, "repoType": repo_type}, headers=headers
    )
    try:
        body = resp.json()
    except ValueError:
        body = {}
    if resp.status_code == 400:
        errors = "; ".join(e.get("message", "") for e in body.get("errors", []))
        raise PermanentError(
            f"the Hub rejected the model card's metadata: {errors}",
            hint="fix the card template or the card settings (license, language, tags)",
        )
    with translated("validate card for", "(card)", token=token):
        hf_raise_for_status(resp)
    for w in body.get("warnings", []):
        log.warning("model card: %s", w.get("message"))


# --- folders to repos: one commit, only changed files ---------------------------------------------


def git_blob_sha1(path: Path) -> str:
    """The git blob id of a file (what the Hub lists as the oid of a non-LFS file)."""
    h = hashlib.sha1()
    h.update(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def remote_files(api: Any, repo_id: str, token: str, repo_type: str = "model") -> dict[str, Any]:
    from huggingface_hub.hf_api import RepoFile

    with translated("list files of", repo_id, token=token, repo_type=repo_type):
        tree = api.list_repo_tree(repo_id, recursive=True, token=token, repo_type=repo_type)
        return {f.path: f for f in tree if isinstance(f, RepoFile)}


def _unchanged(local: Path, sha256: str, remote: Any) -> bool:
    if remote is None or remote.size != local.stat().st_size:
        return False
    if remote.lfs is not None:
        return remote.lfs.sha256 == sha256
    return remote.blob_id == git_blob_sha1(local)


def push_folder(
    folder: Path,
    repo_id: str,
    *,
    token: str,
    endpoint: str | None,
    private: bool,
    commit_message: str,
    commit_description: str = "",
    tag: str | None = None,
    known: dict[str, str] | None = None,
    repo_type: str = "model",
    space_sdk: str | None = None,
    owned_list: str | None = None,
) -> dict[str, Any]:
    """Create the repo if needed and upload `folder` in one commit, sending only changed files.

    The repo is compared with the Hub on every call (its tree listing: LFS sha256, git blob sha1), never
    taken from a record: a deleted or changed repo is pushed again, an unchanged one gets no commit. With
    `owned_list` (the name of a JSON file in the folder whose `published_files` lists every path this
    project put in the repo, `loraship.json`), the files the repo's own copy of that list names and that are no longer
    in `folder` (a dropped quantization) are deleted in the same commit; a file the project did not put
    there is never touched.
    """
    api = hub_api(endpoint, token)
    call = hub_caller(repo_id, token=token, repo_type=repo_type)

    url = str(
        call(
            "create repo" if repo_type == "model" else "create Space",
            api.create_repo,
            repo_id,
            private=private,
            exist_ok=True,
            repo_type=repo_type,
            space_sdk=space_sdk,
        )
    )
    readme = folder / "README.md"
    if readme.is_file():
        validate_card_remote(api, readme.read_text(encoding="utf-8"), token, repo_type=repo_type)
    remote = remote_files(api, repo_id, token, repo_type)
    here = {rel.as_posix() for rel in iter_files(folder)}
    stale = sorted(
        p
        for p in (published_before(api, repo_id, owned_list, token, repo_type) if owned_list in remote else [])
        if p in remote and p not in here
    )
    changed, skipped, sizes = _changed_files(folder, remote, known or {})
    if changed or stale:
        commit_oid = _upload_and_commit(
            api, call, repo_id, changed, stale, sizes, len(skipped), commit_message, commit_description, repo_type
        )
    else:
        log.info("%s already has every file (%d unchanged): nothing to send", repo_id, len(skipped))
        commit_oid = call("read", api.repo_info, repo_id, repo_type=repo_type).sha
    tagged = None
    if tag:
        call(
            f"tag {tag} on",
            api.create_tag,
            repo_id,
            tag=tag,
            revision=commit_oid,
            tag_message=commit_message,
            exist_ok=True,
            repo_type=repo_type,
        )
        tagged = tag
    return {
        "repo_id": repo_id,
        "url": url,
        "commit": commit_oid,
        "uploaded": [op.path_in_repo for op in changed],
        "skipped": skipped,
        "deleted": stale,
        "tag": tagged,
        "bytes_uploaded": sum(sizes[op.path_in_repo] for op in changed),
    }


def _changed_files(folder: Path, remote: dict[str, Any], known: dict[str, str]) -> tuple[list[Any], list[str], dict]:
    """(an upload operation per file that differs from the repo's copy, the unchanged paths, every file's size);
    `known` digests (from the artifacts) spare re-hashing."""
    from huggingface_hub import CommitOperationAdd

    changed: list[CommitOperationAdd] = []
    skipped: list[str] = []
    sizes: dict[str, int] = {}
    for rel in iter_files(folder):
        path_in_repo = rel.as_posix()
        local = folder / rel
        digest = known.get(path_in_repo) or sha256_file(local)
        sizes[path_in_repo] = local.stat().st_size
        if _unchanged(local, digest, remote.get(path_in_repo)):
            skipped.append(path_in_repo)
        else:
            changed.append(CommitOperationAdd(path_in_repo=path_in_repo, path_or_fileobj=str(local)))
    return changed, skipped, sizes


def _upload_and_commit(
    api: Any,
    call: Callable[..., Any],
    repo_id: str,
    changed: list[Any],
    stale: list[str],
    sizes: dict[str, int],
    unchanged: int,
    commit_message: str,
    commit_description: str,
    repo_type: str,
) -> str:
    """Upload the changed files one at a time (progress per file; a retry resumes after the last stored one),
    then one commit that adds them and deletes `stale`; returns the commit id."""
    from huggingface_hub import CommitOperationDelete

    total = sum(sizes[op.path_in_repo] for op in changed)
    log.info(
        "uploading %d changed file(s), %.1f MB, to %s (%d unchanged)", len(changed), total / 1e6, repo_id, unchanged
    )
    with Progress(f"upload to {repo_id}", total) as progress:
        for op in changed:
            call(
                f"upload {op.path_in_repo} to",
                api.preupload_lfs_files,
                repo_id,
                additions=[op],
                repo_type=repo_type,
                free_memory=False,
            )
            progress.advance(sizes[op.path_in_repo])
    if stale:
        log.info("removing %d file(s) earlier pushes put in %s: %s", len(stale), repo_id, ", ".join(stale))
    info = call(
        "commit to",
        api.create_commit,
        repo_id,
        operations=[*changed, *(CommitOperationDelete(path_in_repo=p) for p in stale)],
        commit_message=commit_message,
        commit_description=commit_description,
        repo_type=repo_type,
    )
    return info.oid


def published_before(
    api: Any, repo_id: str, name: str | None, token: str | None, repo_type: str = "model"
) -> list[str]:
    """The `published_files` of the repo's copy of `name` (loraship.json): what earlier pushes put there."""
    import json
    import tempfile

    if not name:
        return []
    with tempfile.TemporaryDirectory(prefix="loraship-owned-") as tmp:
        with translated(f"read {name} of", repo_id, token=token, repo_type=repo_type):
            path = api.hf_hub_download(repo_id, name, repo_type=repo_type, token=token, cache_dir=tmp)
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except ValueError:
            log.warning("%s in %s is not JSON: no earlier files are removed", name, repo_id)
            return []
    files = data.get("published_files") if isinstance(data, dict) else None
    return [str(f) for f in files] if isinstance(files, list) else []


def update_readme(
    repo_id: str, readme: Path, *, endpoint: str | None, token: str, expected_sha256: str | None = None
) -> str | None:
    """Commit README.md alone when it differs from what the repo has (the card stage, after eval)."""
    if expected_sha256 and sha256_file(readme) == expected_sha256:
        return None
    folder = readme.parent
    tmp = folder / ".card-push"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        shutil.copy2(readme, tmp / "README.md")
        result = push_folder(
            tmp, repo_id, token=token, endpoint=endpoint, private=False, commit_message="loraship: update model card"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result["commit"] if result["uploaded"] else None
