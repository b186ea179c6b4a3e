"""Render Ollama TEMPLATEs with the real Go text/template engine: a tiny Go program, built once and cached.

Ollama prompts are Go `text/template`s executed with Ollama's own values (.System, .Messages, .Prompt,
.Response ...). No Python library implements Go's template language, and a look-alike would prove nothing,
so `ollama_render.go` (standard library only, beside this file) mirrors Ollama's prompt step and is
compiled with Debian's `golang-go`. The binary is built once into `<loraship cache>/go/` (by
`./setup.sh`, or on first use), keyed by the source's digest, with Go's build cache and GOPATH inside the
loraship cache and no network (GOPROXY=off, GOTOOLCHAIN=local). At run time only the binary is needed:
where neither the binary nor Go is there, `GoUnavailable` says what to install and the caller degrades.

`python -m tasks.chat.gorender build` builds it (setup.sh runs this); `... render` reads a request on stdin.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from tasks.core.atomic import atomic_dir, atomic_write_json
from tasks.core.constants import cache_root
from tasks.core.errors import PermanentError

SOURCE = Path(__file__).with_name("ollama_render.go")
BINARY_NAME = "ollama-render"
GO_ENV = "LORASHIP_GO"  # the `go` executable, when it is not on PATH
#: Debian installs Go here; PATH may not include it.
_GO_CANDIDATES = ("/usr/lib/go/bin/go", "/usr/local/go/bin/go")


class GoUnavailable(PermanentError):
    """Neither a built renderer nor a Go toolchain to build one: the Ollama template cannot be rendered."""


@dataclass(frozen=True)
class GoRendering:
    """One conversation rendered by the Go program: the prompt text, or Go's error."""

    prompt: str | None
    error: str | None = None


def source_digest() -> str:
    return hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]


def build_dir() -> Path:
    """Where this source's binary lives: keyed by the source digest and the platform."""
    return cache_root() / "go" / f"ollama-render-{source_digest()}-{platform.system().lower()}-{platform.machine()}"


def find_go(go: str | None = None) -> str | None:
    """The `go` executable: the one given, $LORASHIP_GO, PATH, then Debian's and the usual install folders."""
    for candidate in (go, os.environ.get(GO_ENV), shutil.which("go"), *_GO_CANDIDATES):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def go_env() -> dict[str, str]:
    """Go's caches inside the loraship cache, no network, no toolchain download, no cgo."""
    root = cache_root() / "go"
    return {
        **os.environ,
        "GOCACHE": str(root / "build-cache"),
        "GOPATH": str(root / "gopath"),
        "GOMODCACHE": str(root / "gopath" / "pkg" / "mod"),
        "GOTOOLCHAIN": "local",
        "GOPROXY": "off",
        "GOFLAGS": "",
        "GO111MODULE": "on",
        "GOTELEMETRY": "off",
        "CGO_ENABLED": "0",
    }


def binary(go: str | None = None, build: bool = True) -> Path:
    """The built renderer, building it first (under a lock, into a folder renamed into place) if needed."""
    folder = build_dir()
    exe = folder / BINARY_NAME
    if exe.is_file():
        return exe
    if not build:
        raise GoUnavailable(f"the Ollama template renderer is not built ({exe})", hint="run ./setup.sh")
    go_exe = find_go(go)
    if go_exe is None:
        raise GoUnavailable(
            "Go is not installed, so the Ollama template cannot be rendered with Go's text/template",
            hint=(
                "install Debian's golang-go (apt-get install golang-go; ./setup.sh does it when run as root) or set "
                f"{GO_ENV} to a go executable; then `python -m tasks.chat.gorender build`"
            ),
        )
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if exe.is_file():
            return exe
        with atomic_dir(folder) as tmp:
            shutil.copyfile(SOURCE, tmp / SOURCE.name)
            (tmp / "go.mod").write_text("module loraship/ollamarender\n\ngo 1.19\n")
            proc = subprocess.run(
                [go_exe, "build", "-trimpath", "-o", BINARY_NAME, "."],
                cwd=tmp,
                env=go_env(),
                capture_output=True,
                text=True,
                timeout=600,
            )
            if proc.returncode != 0:
                output = (proc.stderr or proc.stdout)[-800:]
                raise PermanentError(
                    f"building the Ollama template renderer with {go_exe} failed: {output}",
                    hint="the Go program needs Go 1.19 or newer (Debian 12's golang-go)",
                )
            version = subprocess.run([go_exe, "version"], capture_output=True, text=True, env=go_env()).stdout
            atomic_write_json(tmp / "build.json", {"go": version.strip(), "source_sha256": source_digest()})
    return exe


def go_version() -> str | None:
    """The Go version the cached binary was built with (None before it is built)."""
    info = build_dir() / "build.json"
    return json.loads(info.read_text()).get("go") if info.is_file() else None


def render(template: str, conversations: list[list[dict[str, str]]], timeout: float = 60.0) -> list[GoRendering]:
    """Render each conversation (a list of {"role", "content"} messages) with the Ollama `template`.

    A template that does not parse raises PermanentError with Go's message; an execution error of one
    conversation comes back as that conversation's `error`.
    """
    exe = binary()
    request = {"template": template, "requests": [{"messages": msgs} for msgs in conversations]}
    proc = subprocess.run(
        [str(exe)], input=json.dumps(request), capture_output=True, text=True, timeout=timeout, env=go_env()
    )
    try:
        out = json.loads(proc.stdout)
    except ValueError:
        raise PermanentError(f"the Ollama template renderer failed (rc {proc.returncode}): {proc.stderr[-500:]}")
    if out.get("error"):
        raise PermanentError(
            f"the Ollama TEMPLATE does not parse as a Go template: {out['error']}",
            hint="fix deployment.ollama_template (Go text/template syntax)",
        )
    return [GoRendering(prompt=r.get("prompt"), error=r.get("error")) for r in out.get("results", [])]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["build"]:
        try:
            exe = binary()
        except GoUnavailable as exc:
            print(f"ollama template renderer not built: {exc}", file=sys.stderr)
            return 1
        print(f"ollama template renderer: {exe} ({go_version()})")
        return 0
    if args[:1] == ["render"]:
        req = json.loads(sys.stdin.read())
        results = render(req["template"], [r["messages"] for r in req["requests"]])
        print(json.dumps([r.__dict__ for r in results], indent=2))
        return 0
    print("usage: python -m tasks.chat.gorender build | render < request.json", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
