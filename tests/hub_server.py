"""A small Hugging Face Hub-compatible HTTP server for tests, driven by the real huggingface_hub client.

No open-source Hub server that accepts uploads runs here (see DESIGN.md), so the tests carry this one.
It implements what huggingface_hub 2.4.0 calls for a push, a download and a Space deploy
(../shared/HUB_API.md): whoami, repo create/info, validate-yaml, preupload, the LFS batch API with the
basic transfer (PUT + verify), NDJSON commits, tree listings, resolve (HEAD/GET), tags and refs, and
Space secrets/variables/hardware/sleep/restart/runtime/logs. It enforces tokens (401 for an unknown
token, 403 for a read token on a write call, 404 for a private repo someone else asks for), models
fine-grained tokens like the Hub's whoami-v2 answer (role `fineGrained`, `global` and per-entity `scoped`
permissions such as repo.content.read / repo.write, which decide what the token may do here), answers
errors with the Hub's `X-Error-Code` header, persists blobs to a folder, and records every request
(with the bytes received) so tests can check what the client sent. Faults can be injected
(`fail_next`), and a Space's runtime can follow a script (`runtime_script`).

Standard library only (http.server): it runs in a thread of the test process.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

LFS_SUFFIXES = (".gguf", ".safetensors", ".bin", ".pt", ".pth", ".onnx", ".zip", ".tar", ".gz", ".png", ".jpg")
LFS_MIN_SIZE = 10 * 1024 * 1024


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class StoredFile:
    oid: str  # sha256 for LFS files, git blob sha1 for regular files
    size: int
    sha256: str
    lfs: bool


@dataclass
class Commit:
    oid: str
    message: str
    files: dict[str, StoredFile]
    parent: str | None


@dataclass
class Repo:
    type: str  # model | dataset | space
    id: str
    private: bool
    sdk: str | None = None
    commits: list[Commit] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)
    secrets: dict[str, dict[str, Any]] = field(default_factory=dict)
    variables: dict[str, dict[str, Any]] = field(default_factory=dict)
    hardware: str = "cpu-basic"
    requested_hardware: str | None = None
    sleep_time: int | None = None
    stage: str = "NO_APP_FILE"
    restarts: int = 0
    volumes: list[dict[str, Any]] | None = None  # Space volumes (Storage Buckets mounted, e.g. at /data)
    duplicated_from: str | None = None

    @property
    def head(self) -> Commit | None:
        return self.commits[-1] if self.commits else None

    def files(self) -> dict[str, StoredFile]:
        return dict(self.head.files) if self.head else {}


@dataclass
class Request:
    method: str
    path: str
    status: int
    body_bytes: int
    authorized_as: str | None


class HubState:
    """Everything the server knows; tests read and script it directly."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.blobs = self.root / "blobs"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()
        self.tokens: dict[str, dict[str, str]] = {}
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[Request] = []
        self.faults: list[dict[str, Any]] = []
        self.runtime_script: dict[str, list[str]] = {}
        self.build_logs: dict[str, list[str]] = {}
        # run logs as (timestamp ISO 8601, line); default: the stage line Spaces' log would show
        self.run_logs: dict[str, list[tuple[str, str]]] = {}
        self.buckets: dict[str, dict[str, Any]] = {}  # Storage Buckets by id: {private}
        self.pending_lfs: dict[str, int] = {}

    # --- test controls ---------------------------------------------------------------------------
    def add_token(
        self,
        token: str,
        user: str,
        role: str = "write",
        *,
        scoped: list[str] | None = None,
        global_: list[str] | None = None,
        entity: str | None = None,
    ) -> str:
        """A token of `user`: role `read`, `write`, or `fineGrained` with permissions like the Hub's
        (`scoped`: on the entity `entity`, default the user, e.g. repo.content.read / repo.write;
        `global_`: account-wide, e.g. post.write, inference.serverless.write)."""
        self.tokens[token] = {"name": user, "role": role}
        if role == "fineGrained":
            self.tokens[token]["fineGrained"] = {
                "canReadGatedRepos": False,
                "global": list(global_ or []),
                "scoped": [
                    {
                        "entity": {"_id": f"id-{entity or user}", "type": "user", "name": entity or user},
                        "permissions": list(scoped or []),
                    }
                ],
            }
        return token

    def fail_next(self, method: str, path_regex: str, status: int = 500, times: int = 1) -> None:
        """The next `times` requests matching method and path answer `status` (with a Hub-like body)."""
        self.faults.append({"method": method.upper(), "re": re.compile(path_regex), "status": status, "left": times})

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        return self.repos[(repo_type, repo_id)]

    def blob(self, sha256: str) -> bytes:
        return (self.blobs / sha256).read_bytes()

    def uploaded_bytes(self, since: int = 0) -> int:
        """Bytes the client sent in request bodies (commits and LFS PUTs) since request number `since`."""
        return sum(r.body_bytes for r in self.requests[since:] if r.method in ("PUT", "POST"))

    def calls(self, method: str, path_regex: str, since: int = 0) -> list[Request]:
        rx = re.compile(path_regex)
        return [r for r in self.requests[since:] if r.method == method and rx.search(r.path)]


def _access_token(user: dict[str, Any]) -> dict[str, Any]:
    """whoami-v2's `auth.accessToken`: role read | write | fineGrained (with its permissions)."""
    out = {"displayName": "test", "role": user["role"], "createdAt": "2026-01-01T00:00:00.000Z"}
    if "fineGrained" in user:
        out["fineGrained"] = user["fineGrained"]
    return out


def _may(user: dict[str, Any], permission: str, entity: str) -> bool:
    """Can this token do `permission` (repo.content.read, repo.write) on `entity`'s repos?"""
    if user["role"] == "write":
        return True
    if user["role"] == "read":
        return permission == "repo.content.read"
    grants = user.get("fineGrained") or {}
    perms = {p for s in grants.get("scoped", []) if s["entity"]["name"] == entity for p in s["permissions"]}
    return permission in perms or (permission == "repo.content.read" and "repo.write" in perms)


class HubError(Exception):
    def __init__(self, status: int, code: str | None, message: str, extra: dict[str, Any] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.extra = status, code, message, extra or {}


_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Buffered writes: the response's last bytes leave only when the handler returns, i.e. after the
    # request was recorded in `state.requests`, so a test that asserts on the log right after a call
    # cannot race the server thread.
    wbufsize = 64 * 1024
    server: HubServer

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    # --- plumbing --------------------------------------------------------------------------------
    @property
    def state(self) -> HubState:
        return self.server.state

    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(
        self,
        status: int,
        body: bytes = b"",
        ctype: str = "application/json",
        headers: dict[str, str] | None = None,
        head: bool = False,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head and self.command != "HEAD":  # a body after a HEAD answer corrupts the kept-alive connection
            self.wfile.write(body)

    def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers=headers)

    def _user(self) -> dict[str, str] | None:
        auth = self.headers.get("Authorization") or ""
        if not auth.startswith("Bearer "):
            return None
        token = auth[len("Bearer ") :].strip()
        user = self.state.tokens.get(token)
        if user is None:
            raise HubError(401, None, "Invalid credentials in Authorization header")
        return user

    def _need_user(self, write: bool = False, owner: str | None = None) -> dict[str, str]:
        user = self._user()
        if user is None:
            raise HubError(401, None, "You must be authenticated to access this resource")
        if write and not _may(user, "repo.write", owner or user["name"]):
            raise HubError(403, None, "You don't have the rights to write to this repository: your token is read-only")
        return user

    def _repo(self, rtype: str, rid: str, write: bool = False) -> Repo:
        user = self._user()
        repo = self.state.repos.get((rtype, rid))
        owner = rid.split("/")[0]
        visible = repo is not None and (
            not repo.private or (user is not None and user["name"] == owner and _may(user, "repo.content.read", owner))
        )
        if not visible:
            raise HubError(
                404 if user is not None or repo is None else 401,
                "RepoNotFound",
                f"Repository Not Found for url: {self.path}.",
            )
        if write:
            user = self._need_user(write=True, owner=owner)
            if user["name"] != owner:
                raise HubError(403, None, f"You don't have the rights to create a commit in {rid}")
        return repo

    def _dispatch(self, method: str) -> None:
        started_at = len(self.state.requests)
        body = self._body() if method in ("POST", "PUT", "DELETE") else b""
        status = 200
        who = None
        try:
            try:
                u = self._user()
                who = u["name"] if u else None
            except HubError:
                who = "<bad token>"
            for f in list(self.state.faults):
                if f["method"] == method and f["re"].search(urlparse(self.path).path) and f["left"] > 0:
                    f["left"] -= 1
                    if f["left"] == 0:
                        self.state.faults.remove(f)
                    raise HubError(f["status"], None, f"injected failure {f['status']}")
            status = self._route(method, body)
        except HubError as e:
            status = e.status
            headers = {"X-Error-Message": e.message}
            if e.code:
                headers["X-Error-Code"] = e.code
            self._json(e.status, {"error": e.message, **e.extra}, headers=headers)
        except Exception as e:  # a server bug: answer 500 so the test sees it
            status = 599
            self._json(500, {"error": f"test server error: {type(e).__name__}: {e}"})
        finally:
            with self.state.lock:
                self.state.requests.append(Request(method, self.path, status, len(body), who))
            del started_at

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    # --- routes ----------------------------------------------------------------------------------
    def _route(self, method: str, body: bytes) -> int:
        url = urlparse(self.path)
        path = unquote(url.path)
        query = parse_qs(url.query)
        data = (
            json.loads(body)
            if body and (self.headers.get("Content-Type") or "").startswith("application/json")
            else None
        )
        st = self.state
        with st.lock:
            if path == "/api/whoami-v2" and method == "GET":
                user = self._need_user()
                self._json(
                    200,
                    {
                        "type": "user",
                        "name": user["name"],
                        "fullname": user["name"],
                        "orgs": [],
                        "auth": {"type": "access_token", "accessToken": _access_token(user)},
                    },
                )
                return 200
            if path == "/api/repos/create" and method == "POST":
                return self._create_repo(data or {})
            if path == "/api/validate-yaml" and method == "POST":
                return self._validate_yaml(data or {})
            m = re.match(r"^/api/buckets/([^/]+)/([^/]+)$", path)
            if m:
                return self._bucket(method, f"{m.group(1)}/{m.group(2)}", data or {})
            m = re.match(r"^/api/spaces/([^/]+/[^/]+)/duplicate$", path)
            if m and method == "POST":
                return self._duplicate(m.group(1), data or {})
            m = re.match(
                r"^/api/spaces/([^/]+/[^/]+)/"
                r"(secrets|variables|hardware|sleeptime|restart|pause|runtime|volumes|logs/build|logs/run)$",
                path,
            )
            if m:
                return self._space(method, m.group(1), m.group(2), data or {}, query)
            m = re.match(r"^/api/(models|datasets|spaces)/([^/]+/[^/]+)/preupload/(.+)$", path)
            if m and method == "POST":
                return self._preupload(_TYPES[m.group(1)], m.group(2), data or {})
            m = re.match(r"^/api/(models|datasets|spaces)/([^/]+/[^/]+)/commit/(.+)$", path)
            if m and method == "POST":
                return self._commit(_TYPES[m.group(1)], m.group(2), body)
            m = re.match(r"^/api/(models|datasets|spaces)/([^/]+/[^/]+)/tree/([^/]+)(/.*)?$", path)
            if m and method == "GET":
                return self._tree(_TYPES[m.group(1)], m.group(2), m.group(3), (m.group(4) or "").strip("/"))
            m = re.match(r"^/api/(models|datasets|spaces)/([^/]+/[^/]+)/tag/(.+)$", path)
            if m and method == "POST":
                return self._tag(_TYPES[m.group(1)], m.group(2), m.group(3), data or {})
            m = re.match(r"^/api/(models|datasets|spaces)/([^/]+/[^/]+)/refs$", path)
            if m and method == "GET":
                repo = self._repo(_TYPES[m.group(1)], m.group(2))
                head = repo.head.oid if repo.head else None
                self._json(
                    200,
                    {
                        "branches": [{"name": "main", "ref": "refs/heads/main", "targetCommit": head}],
                        "tags": [{"name": t, "ref": f"refs/tags/{t}", "targetCommit": c} for t, c in repo.tags.items()],
                        "converts": [],
                    },
                )
                return 200
            m = re.match(r"^/api/(models|datasets|spaces)/([^/]+/[^/]+)(?:/revision/(.+))?$", path)
            if m and method == "GET":
                return self._info(_TYPES[m.group(1)], m.group(2), m.group(3))
            m = re.match(r"^/(datasets/|spaces/)?([^/]+/[^/]+?)\.git/info/lfs/objects/batch$", path)
            if m and method == "POST":
                rtype = {"datasets/": "dataset", "spaces/": "space"}.get(m.group(1) or "", "model")
                return self._lfs_batch(rtype, m.group(2), data or json.loads(body or b"{}"))
            m = re.match(r"^/lfs-upload/([0-9a-f]{64})$", path)
            if m and method == "PUT":
                return self._lfs_put(m.group(1), body)
            m = re.match(r"^/lfs-verify/([0-9a-f]{64})$", path)
            if m and method == "POST":
                exists = (st.blobs / m.group(1)).exists()
                self._json(200 if exists else 404, {"success": exists})
                return 200 if exists else 404
            m = re.match(r"^/(datasets/|spaces/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
            if m and method in ("GET", "HEAD"):
                rtype = {"datasets/": "dataset", "spaces/": "space"}.get(m.group(1) or "", "model")
                return self._resolve(rtype, m.group(2), m.group(3), m.group(4), head=method == "HEAD")
        raise HubError(404, None, f"no route for {method} {path}")

    def _create_repo(self, data: dict[str, Any]) -> int:
        user = self._need_user(write=True)
        rtype = data.get("type") or "model"
        name = data.get("name") or ""
        org = data.get("organization") or user["name"]
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$", name) or "--" in name or ".." in name:
            raise HubError(400, None, f"Repository name {name!r} is invalid: use letters, digits, '-', '_', '.'")
        if org != user["name"]:
            raise HubError(403, None, f"You don't have the rights to create a repo under the namespace {org!r}")
        rid = f"{org}/{name}"
        url = f"{self.server.url}/{_PREFIX[rtype]}{rid}"
        if (rtype, rid) in self.state.repos:
            raise HubError(409, None, "You already created this model repo", extra={"url": url})
        private = bool(data.get("private")) or data.get("visibility") == "private"
        repo = Repo(type=rtype, id=rid, private=private, sdk=data.get("sdk"))
        for s in data.get("secrets") or []:
            repo.secrets[s["key"]] = {"value": s["value"], "description": s.get("description")}
        for v in data.get("variables") or []:
            repo.variables[v["key"]] = {"value": v["value"], "description": v.get("description")}
        if data.get("hardware"):
            repo.requested_hardware = data["hardware"]
        init = {
            ".gitattributes": (
                b"*.gguf filter=lfs diff=lfs merge=lfs -text\n*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
            )
        }
        files = {p: self._store(c, lfs=False) for p, c in init.items()}
        repo.commits.append(
            Commit(oid=uuid.uuid4().hex + uuid.uuid4().hex[:8], message="initial commit", files=files, parent=None)
        )
        self.state.repos[(rtype, rid)] = repo
        self._json(200, {"url": url, "name": rid, "id": rid})
        return 200

    def _store(self, content: bytes, lfs: bool) -> StoredFile:
        sha = hashlib.sha256(content).hexdigest()
        (self.state.blobs / sha).write_bytes(content)
        return StoredFile(oid=sha if lfs else git_blob_sha1(content), size=len(content), sha256=sha, lfs=lfs)

    def _validate_yaml(self, data: dict[str, Any]) -> int:
        import yaml

        content = data.get("content") or ""
        errors = []
        if content.startswith("---"):
            end = content.find("\n---", 3)
            if end < 0:
                errors.append({"message": "YAML front matter is not closed by ---"})
            else:
                try:
                    meta = yaml.safe_load(content[3:end])
                    if meta is not None and not isinstance(meta, dict):
                        errors.append({"message": "YAML metadata must be a mapping"})
                    elif meta:
                        if "license" in meta and not isinstance(meta["license"], str):
                            errors.append({"message": '"license" must be a string'})
                        if "tags" in meta and not isinstance(meta["tags"], list):
                            errors.append({"message": '"tags" must be an array'})
                        relation = meta.get("base_model_relation")
                        if relation is not None and relation not in ("adapter", "merge", "quantized", "finetune"):
                            errors.append(
                                {"message": '"base_model_relation" must be adapter, merge, quantized or finetune'}
                            )
                        if relation is not None and not meta.get("base_model"):
                            errors.append({"message": '"base_model_relation" needs "base_model"'})
                        if "model-index" in meta:
                            for entry in meta["model-index"] or []:
                                if not isinstance(entry, dict) or "name" not in entry or "results" not in entry:
                                    errors.append({"message": '"model-index[0]" must have "name" and "results"'})
                except yaml.YAMLError as e:
                    errors.append({"message": f"Invalid YAML: {e}"})
        status = 400 if errors else 200
        self._json(status, {"errors": errors, "warnings": []})
        return status

    def _info(self, rtype: str, rid: str, rev: str | None) -> int:
        repo = self._repo(rtype, rid)
        commit = self._commit_for(repo, rev or "main")
        siblings = [{"rfilename": p} for p in sorted(commit.files)] if commit else []
        out: dict[str, Any] = {
            "id": rid,
            "_id": rid,
            "private": repo.private,
            "sha": commit.oid if commit else None,
            "siblings": siblings,
            "tags": [],
            "author": rid.split("/")[0],
        }
        if rtype == "space":
            out["sdk"] = repo.sdk
            out["runtime"] = self._runtime(repo)
        self._json(200, out)
        return 200

    def _commit_for(self, repo: Repo, rev: str) -> Commit | None:
        rev = unquote(rev)
        if rev in ("main", "HEAD"):
            return repo.head
        if rev in repo.tags:
            rev = repo.tags[rev]
        for c in repo.commits:
            if c.oid == rev:
                return c
        raise HubError(404, "RevisionNotFound", f"Invalid rev id: {rev}")

    def _preupload(self, rtype: str, rid: str, data: dict[str, Any]) -> int:
        repo = self._repo(rtype, rid, write=True)
        existing = repo.files()
        out = []
        for f in data.get("files") or []:
            sample = base64.b64decode(f.get("sample") or "")
            lfs = f["path"].lower().endswith(LFS_SUFFIXES) or int(f.get("size") or 0) >= LFS_MIN_SIZE or b"\0" in sample
            entry: dict[str, Any] = {
                "path": f["path"],
                "uploadMode": "lfs" if lfs else "regular",
                "shouldIgnore": False,
            }
            if f["path"] in existing and existing[f["path"]].lfs == lfs:
                entry["oid"] = existing[f["path"]].oid
            out.append(entry)
        self._json(200, {"files": out, "commitOid": repo.head.oid if repo.head else None})
        return 200

    def _lfs_batch(self, rtype: str, rid: str, data: dict[str, Any]) -> int:
        self._repo(rtype, rid, write=True)
        objects = []
        for o in data.get("objects") or []:
            oid, size = o["oid"], int(o["size"])
            entry: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if not (self.state.blobs / oid).exists():
                self.state.pending_lfs[oid] = size
                entry["actions"] = {
                    "upload": {"href": f"{self.server.url}/lfs-upload/{oid}", "header": {}},
                    "verify": {"href": f"{self.server.url}/lfs-verify/{oid}", "header": {}},
                }
            objects.append(entry)
        self._send(
            200, json.dumps({"transfer": "basic", "objects": objects}).encode(), ctype="application/vnd.git-lfs+json"
        )
        return 200

    def _lfs_put(self, oid: str, body: bytes) -> int:
        if self.headers.get("Authorization"):
            raise HubError(400, None, "the LFS upload URL is pre-signed: no Authorization header expected")
        if oid not in self.state.pending_lfs:
            raise HubError(403, None, "no upload was requested for this object")
        if hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, None, "uploaded content does not match its oid")
        (self.state.blobs / oid).write_bytes(body)
        self.state.pending_lfs.pop(oid, None)
        self._send(200)
        return 200

    def _commit(self, rtype: str, rid: str, body: bytes) -> int:
        repo = self._repo(rtype, rid, write=True)
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next((x["value"] for x in lines if x.get("key") == "header"), {})
        files = repo.files()
        for item in lines:
            key, value = item.get("key"), item.get("value") or {}
            if key == "file":
                content = (
                    base64.b64decode(value["content"])
                    if value.get("encoding") == "base64"
                    else value["content"].encode()
                )
                files[value["path"]] = self._store(content, lfs=False)
            elif key == "lfsFile":
                oid = value["oid"]
                blob = self.state.blobs / oid
                if not blob.exists():
                    raise HubError(400, None, f"LFS object {oid} for {value['path']} was never uploaded")
                files[value["path"]] = StoredFile(oid=oid, size=int(value["size"]), sha256=oid, lfs=True)
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {p: f for p, f in files.items() if not p.startswith(prefix)}
        if header.get("parentCommit") and repo.head and header["parentCommit"] != repo.head.oid:
            raise HubError(412, None, "A commit has happened since. Please refresh and try again.")
        commit = Commit(
            oid=hashlib.sha1(uuid.uuid4().bytes).hexdigest(),
            message=header.get("summary", ""),
            files=files,
            parent=repo.head.oid if repo.head else None,
        )
        repo.commits.append(commit)
        if rtype == "space":
            repo.stage = "BUILDING"
        self._json(
            200,
            {
                "commitUrl": f"{self.server.url}/{_PREFIX[rtype]}{rid}/commit/{commit.oid}",
                "commitOid": commit.oid,
                "success": True,
            },
        )
        return 200

    def _tree(self, rtype: str, rid: str, rev: str, sub: str) -> int:
        repo = self._repo(rtype, rid)
        commit = self._commit_for(repo, rev)
        entries: list[dict[str, Any]] = []
        dirs: set[str] = set()
        for p, f in sorted((commit.files if commit else {}).items()):
            if sub and not p.startswith(sub + "/"):
                continue
            parts = p.split("/")
            for i in range(1, len(parts)):
                dirs.add("/".join(parts[:i]))
            e: dict[str, Any] = {
                "type": "file",
                "path": p,
                "size": f.size,
                "oid": f.oid if not f.lfs else git_blob_sha1(b"lfs-pointer " + f.oid.encode()),
            }
            if f.lfs:
                e["lfs"] = {"oid": f.oid, "size": f.size, "pointerSize": 134}
            entries.append(e)
        entries += [
            {"type": "directory", "path": d, "oid": hashlib.sha1(d.encode()).hexdigest()}
            for d in sorted(dirs)
            if not sub or d.startswith(sub + "/")
        ]
        self._json(200, entries)
        return 200

    def _tag(self, rtype: str, rid: str, rev: str, data: dict[str, Any]) -> int:
        repo = self._repo(rtype, rid, write=True)
        tag = data.get("tag") or ""
        if tag in repo.tags:
            raise HubError(409, None, f"Tag {tag} already exists")
        commit = self._commit_for(repo, rev)
        repo.tags[tag] = commit.oid if commit else ""
        self._json(200, {"tag": tag})
        return 200

    def _resolve(self, rtype: str, rid: str, rev: str, path: str, head: bool) -> int:
        repo = self._repo(rtype, rid)
        commit = self._commit_for(repo, rev)
        f = (commit.files if commit else {}).get(path)
        if f is None:
            raise HubError(404, "EntryNotFound", f"{path} does not exist on {rev}")
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{f.oid}"', "Accept-Ranges": "bytes"}
        if f.lfs:
            headers["X-Linked-Etag"] = f'"{f.sha256}"'
            headers["X-Linked-Size"] = str(f.size)
        data = b"" if head else self.state.blob(f.sha256)
        if head:
            self.send_response(200)
            for k, v in {**headers, "Content-Length": str(f.size), "Content-Type": "application/octet-stream"}.items():
                self.send_header(k, v)
            self.end_headers()
        else:
            self._send(200, data, ctype="application/octet-stream", headers=headers)
        return 200

    # --- Spaces ----------------------------------------------------------------------------------
    def _runtime(self, repo: Repo) -> dict[str, Any]:
        return {
            "stage": repo.stage,
            "hardware": {
                "current": repo.hardware if repo.stage == "RUNNING" else None,
                "requested": repo.requested_hardware or repo.hardware,
            },
            "gcTimeout": repo.sleep_time,
            "storage": None,  # the discontinued persistent storage tiers; Storage Buckets are volumes now
            "volumes": repo.volumes,
            "replicas": {"current": 1, "requested": 1},
        }

    def _space(self, method: str, rid: str, what: str, data: dict[str, Any], query: dict[str, list[str]]) -> int:
        write = method != "GET" or what in ("secrets",)
        repo = self._repo("space", rid, write=write)
        if what == "secrets":
            if method == "POST":
                repo.secrets[data["key"]] = {"value": data.get("value"), "description": data.get("description")}
            elif method == "DELETE":
                repo.secrets.pop(data.get("key"), None)
            # like the Hub: secret values are never sent back
            self._json(200, {k: {"key": k, "description": v.get("description")} for k, v in repo.secrets.items()})
            return 200
        if what == "variables":
            if method == "POST":
                repo.variables[data["key"]] = {
                    "value": data.get("value"),
                    "description": data.get("description"),
                    "updatedAt": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
                }
            elif method == "DELETE":
                repo.variables.pop(data.get("key"), None)
            self._json(
                200,
                {
                    k: {
                        "value": v["value"],
                        "description": v.get("description"),
                        "updatedAt": v.get("updatedAt") or "2026-01-01T00:00:00.000Z",
                    }
                    for k, v in repo.variables.items()
                },
            )
            return 200
        if what == "hardware" and method == "POST":
            repo.requested_hardware = data.get("flavor")
            if data.get("sleepTimeSeconds") is not None:
                repo.sleep_time = data["sleepTimeSeconds"]
        elif what == "sleeptime" and method == "POST":
            repo.sleep_time = data.get("seconds")
        elif what == "restart" and method == "POST":
            repo.restarts += 1
            repo.stage = "BUILDING"
        elif what == "pause" and method == "POST":
            repo.stage = "PAUSED"
        elif what == "volumes" and method == "PUT":
            for vol in data.get("volumes") or []:
                if vol.get("type") == "bucket" and vol.get("source") not in self.state.buckets:
                    raise HubError(404, "RepoNotFound", f"Bucket {vol.get('source')!r} not found")
            repo.volumes = list(data.get("volumes") or [])
        elif what == "volumes" and method == "DELETE":
            if not repo.volumes:
                raise HubError(400, None, "This Space has no volumes")
            repo.volumes = None
        elif what == "runtime" and method == "GET":
            script = self.state.runtime_script.get(rid)
            if script:
                repo.stage = script.pop(0) if len(script) > 1 else script[0]
            elif repo.stage == "BUILDING":
                repo.stage = "RUNNING"  # no script: a build finishes on the next look
            if repo.stage == "RUNNING":
                repo.hardware = repo.requested_hardware or repo.hardware
        elif what.startswith("logs/"):
            lines = self.state.build_logs.get(
                rid,
                [f"===== Build Queued at {time.strftime('%Y-%m-%d %H:%M:%S')} =====", "installing requirements.txt"],
            )
            stamped = [("2026-01-01T00:00:00Z", line) for line in lines]
            if what == "logs/run":
                stamped = self.state.run_logs.get(rid) or [("2026-01-01T00:00:00Z", f"stage {repo.stage}")]
            body = "".join(
                "data: " + json.dumps({"data": line + "\n", "timestamp": ts}) + "\n\n" for ts, line in stamped
            ).encode()
            self._send(200, body, ctype="text/event-stream")
            return 200
        self._json(200, self._runtime(repo))
        return 200

    def _bucket(self, method: str, bid: str, data: dict[str, Any]) -> int:
        """Storage Buckets: create (POST, 409 when it exists) and info (GET)."""
        if method == "POST":
            user = self._need_user(write=True, owner=bid.split("/")[0])
            if bid.split("/")[0] != user["name"]:
                raise HubError(403, None, f"You don't have the rights to create a bucket under {bid.split('/')[0]!r}")
            if bid in self.state.buckets:
                # like create_repo's 409, the body carries the url (create_bucket(exist_ok=True) reads it)
                raise HubError(409, None, "Bucket already exists", extra={"url": f"{self.server.url}/buckets/{bid}"})
            self.state.buckets[bid] = {"private": data.get("visibility") == "private" or bool(data.get("private"))}
            self._json(200, {"url": f"{self.server.url}/buckets/{bid}", "id": bid})
            return 200
        if method == "GET" and bid in self.state.buckets:
            self._need_user(owner=bid.split("/")[0])
            self._json(200, {"id": bid, "private": self.state.buckets[bid]["private"]})
            return 200
        raise HubError(404, "RepoNotFound", f"Bucket {bid!r} not found")

    def _duplicate(self, from_id: str, data: dict[str, Any]) -> int:
        """Duplicate a Space: its files (one commit), sdk, and the hardware/sleep/secrets/variables/volumes asked."""
        source = self._repo("space", from_id)
        user = self._need_user(write=True)
        to_id = data.get("repository") or f"{user['name']}/{from_id.split('/')[1]}"
        if to_id.split("/")[0] != user["name"]:
            raise HubError(403, None, f"You don't have the rights to create a Space under {to_id.split('/')[0]!r}")
        url = f"{self.server.url}/spaces/{to_id}"
        if ("space", to_id) in self.state.repos:
            raise HubError(409, None, "You already created this space repo", extra={"url": url})
        private = data.get("visibility") == "private" if "visibility" in data else source.private
        repo = Repo(type="space", id=to_id, private=private, sdk=source.sdk, duplicated_from=from_id)
        if source.head:
            repo.commits.append(
                Commit(
                    oid=uuid.uuid4().hex + uuid.uuid4().hex[:8],
                    message=f"Duplicated from {from_id}",
                    files=dict(source.head.files),
                    parent=None,
                )
            )
        repo.requested_hardware = data.get("hardware")
        repo.sleep_time = data.get("sleepTimeSeconds")
        for s in data.get("secrets") or []:
            repo.secrets[s["key"]] = {"value": s["value"], "description": s.get("description")}
        for v in data.get("variables") or []:
            repo.variables[v["key"]] = {"value": v["value"], "description": v.get("description")}
        repo.volumes = data.get("volumes")
        repo.stage = "BUILDING"
        self.state.repos[("space", to_id)] = repo
        self._json(200, {"url": url})
        return 200


class HubServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, root: Path, host: str = "127.0.0.1", port: int = 0):
        super().__init__((host, port), Handler)
        self.state = HubState(root)
        self.url = f"http://{host}:{self.server_address[1]}"
        self._thread: threading.Thread | None = None

    def start(self) -> HubServer:
        self._thread = threading.Thread(target=self.serve_forever, name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


def main() -> None:  # pragma: no cover - handy for poking at it by hand
    import argparse
    import tempfile

    ap = argparse.ArgumentParser(description="a local Hub-compatible server for tests")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--token", action="append", default=[], help="TOKEN:USER[:read]")
    args = ap.parse_args()
    srv = HubServer(Path(tempfile.mkdtemp(prefix="hub-")), port=args.port)
    for t in args.token:
        tok, user, *role = t.split(":")
        srv.state.add_token(tok, user, role[0] if role else "write")
    print(srv.url, flush=True)
    srv.serve_forever()


if __name__ == "__main__":  # pragma: no cover
    main()
