"""Stage 7, Space deploy: a Gradio demo of the model from a Space template (tasks/publish/space_templates.py).

The template (space.template, or auto from the model's task and the published repos: gguf_chat for a GGUF
repo, transformers_chat for the merged repo, asr for speech models) is rendered under
publish/space/<owner>__<name>/. Its app is a plain file configured by Space variables (MODEL_REPO,
MODEL_FILE, TITLE, EXAMPLES, ...), so the same app serves any model; only README.md is a template, and
its YAML header is made by huggingface_hub's SpaceCardData (user titles cannot break it).

Deploy: create the Space (sdk gradio), upload the folder in one commit (unchanged files are not sent),
set the variables (add_space_variable) and the read-only token as the HF_TOKEN secret (add_space_secret;
never a variable, never a file, never the write token), request hardware and sleep time, then wait for
RUNNING while streaming the build logs into the run log. BUILD_ERROR / RUNTIME_ERROR: show the logs,
restart (a bounded number of times), then fail with the last log lines.

No write token, --dry-run, or a model repo that was itself only a dry run: the folder is rendered and
the variables it would set are written to publish/space.json; nothing is sent.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from tasks.core.artifacts import Artifact
from tasks.core.atomic import atomic_write_json
from tasks.core.errors import FailedWithReport, PermanentError
from tasks.core.settings import SecretRef, StrictModel, check_hub_id
from tasks.core.stage import stage_task
from tasks.core.vocab import ArtifactKind, Stage
from tasks.gguf import quant_types
from tasks.publish.hub_io import (
    HUB_ENDPOINT,
    hub_api,
    hub_caller,
    hub_endpoint,
    push_folder,
    repo_url,
    space_embed_url,
    whoami,
)
from tasks.publish.secret_scan import refuse_secrets
from tasks.publish.space_costs import duplicate_if_new, ensure_storage, hf_home
from tasks.publish.space_smoke import SmokeFailed, example_input, smoke_line, smoke_test
from tasks.publish.space_templates import (
    AUTO,
    SPACE_TEMPLATES,
    SpaceInputs,
    SpaceTemplate,
    check_template,
    choose_template,
)

STAGE = Stage.SPACE
log = logging.getLogger("loraship.space")

GRADIO_VERSION = SPACE_TEMPLATES["gguf_chat"].manifest.sdk_version  # what the browser test ran the app with
FAILED_STAGES = ("BUILD_ERROR", "RUNTIME_ERROR", "CONFIG_ERROR", "NO_APP_FILE")


class SpaceSettings(StrictModel):
    template: str = Field(
        AUTO,
        description=(
            "the Space template (templates/spaces/<name>/): gguf_chat, transformers_chat, asr, ...; "
            "auto: chosen from the model's task and the repos this run published"
        ),
    )
    space_id: str = Field("", description="owner/name of the Space; empty: <model repo owner>/<model>-demo")
    quant: str = Field(
        default_factory=quant_types.default_quant,
        description="which GGUF the demo runs (must be one of the pushed quant types)",
    )
    hardware: str = Field("cpu-basic", description="Space hardware flavor, e.g. cpu-basic, cpu-upgrade, t4-small")
    sleep_time: int | None = Field(
        None, description="seconds of inactivity before the Space sleeps (not configurable on cpu-basic)"
    )
    read_token: SecretRef | None = Field(
        None, description="read-only token given to the Space as the HF_TOKEN secret (needed for a private model repo)"
    )
    private: bool = Field(False, description="create the Space private")
    title: str = Field("", description="the page title; empty: the model name")
    emoji: str = Field("🦙", description="the Space's emoji")
    examples: list[str] = Field(
        default_factory=lambda: [
            "Hello! Who are you?",
            "Write a haiku about the sea.",
            "Explain LoRA in one sentence.",
        ],
        description="example prompts shown under the chat",
    )
    max_tokens: int = Field(256, ge=1, description="the answer length limit")
    rate_limit_per_minute: int = Field(10, ge=1, description="messages per minute per browser session")
    wait: bool = Field(True, description="wait until the Space is RUNNING")
    timeout: float = Field(1800, gt=0, description="seconds to wait for RUNNING")
    poll_interval: float = Field(10.0, gt=0, description="seconds between runtime checks")
    max_restarts: int = Field(2, ge=0, description="restarts after BUILD_ERROR/RUNTIME_ERROR before the stage fails")
    language: str = Field("auto", description="asr: the language preselected where the model offers a choice")
    smoke_test: bool = Field(True, description="once RUNNING, call the app's API with one example (gradio_client)")
    smoke_timeout: float = Field(600, gt=0, description="seconds the smoke test waits for the answer")
    app_url: str = Field(
        "", description="where the app answers for the smoke test; empty: the Space (gradio_client finds it)"
    )
    storage: Literal["none", "bucket"] = Field(
        "none",
        description=(
            "persistent storage: bucket = a private Storage Bucket mounted at /data, with the model cache there "
            "(HF_HOME=/data/.huggingface) so a restart does not download the model again"
        ),
    )
    storage_bucket: str = Field("", description="owner/name of the bucket; empty: <Space owner>/<Space name>-storage")
    duplicate_from: str = Field(
        "", description="owner/name of an existing Space to start from (copied once, then only configured)"
    )
    idle_hours: float | None = Field(
        None, gt=0, description="the space-idle schedule pauses or downgrades the Space after this many idle hours"
    )
    idle_action: Literal["pause", "downgrade"] = Field("pause", description="what the space-idle schedule does")
    idle_downgrade_to: str = Field("cpu-basic", description="the hardware idle_action downgrade moves the Space to")

    @field_validator("template")
    @classmethod
    def _template(cls, v: str) -> str:
        return check_template(v)

    @field_validator("space_id")
    @classmethod
    def _space_id(cls, v: str) -> str:
        return check_hub_id(v, "space_id", "the model repo")

    @field_validator("storage_bucket", "duplicate_from")
    @classmethod
    def _ids(cls, v: str, info: Any) -> str:
        return check_hub_id(v, info.field_name, "the Space id")

    @field_validator("quant")
    @classmethod
    def _known_quant(cls, v: str) -> str:
        return quant_types.check_quant(v)


def space_inputs(
    settings: SpaceSettings, model_repo: str, model_file: str, title: str, model_url: str = ""
) -> SpaceInputs:
    """What the template's variables and README are set from (public values only; never a secret)."""
    return SpaceInputs(
        model_repo=model_repo,
        model_file=model_file,
        model_url=model_url,
        title=title,
        examples=json.dumps(settings.examples),
        max_tokens=str(settings.max_tokens),
        rate_limit_per_minute=str(settings.rate_limit_per_minute),
        zero_gpu="1" if settings.hardware.startswith("zero-") else "",
        hf_home=hf_home(settings),
        language=settings.language,
    )


def space_variables(
    settings: SpaceSettings, model_repo: str, model_file: str, title: str, template: SpaceTemplate | None = None
) -> dict[str, str]:
    """The Space variables (public configuration; never a secret) the template's app reads."""
    template = template or SPACE_TEMPLATES["gguf_chat"]
    return template.variables(space_inputs(settings, model_repo, model_file, title))


def render_space(
    dest: Path,
    *,
    settings: SpaceSettings,
    model_repo: str,
    model_file: str,
    model_url: str,
    title: str,
    license: str,
    template: SpaceTemplate | None = None,
) -> Path:
    """Write the Space folder (atomically) from the template (default gguf_chat): files copied, README rendered."""
    template = template or SPACE_TEMPLATES["gguf_chat"]
    return template.render_to(dest, space_inputs(settings, model_repo, model_file, title, model_url), license)


def not_read_only(me: dict[str, Any]) -> str | None:
    """Why a token (its whoami-v2 answer) is not safe to give a Space, or None when it can only read.

    Classic tokens say `role: read` or `write`. Fine-grained tokens say `role: fineGrained` and list their
    permissions (`fineGrained.global`, and per entity in `fineGrained.scoped`): any `*.write` permission
    (repo.write, inference.endpoints.write, post.write, ...) makes the token unfit. Anything else (no role,
    an unknown one) is refused too: the check must be sure, not hopeful.
    """
    token = ((me or {}).get("auth") or {}).get("accessToken") or {}
    role = token.get("role")
    if role == "read":
        return None
    if role == "fineGrained":
        grants = token.get("fineGrained") or {}
        perms = list(grants.get("global") or [])
        for scope in grants.get("scoped") or []:
            perms += scope.get("permissions") or []
        writes = sorted({p for p in perms if str(p).endswith(".write") or "write" in str(p).split(".")})
        return f"is a fine-grained token with write permissions ({', '.join(writes)})" if writes else None
    if role == "write":
        return "is a write token"
    return f"is not known to be read-only (whoami says role {role!r})"


def _pick_file(pushed: Artifact, ggufs: list[Artifact], quant: str) -> str:
    names = {str(g.meta.get("quant")): Path(g.path).name for g in ggufs}
    if quant not in names:
        raise PermanentError(
            f"space.quant {quant!r} is not among this run's GGUFs ({', '.join(sorted(names)) or 'none'})",
            hint="set space.quant to one of the quantization.types",
        )
    return names[quant]


def wait_until_running(
    api: Any, space_id: str, settings: SpaceSettings, token: str, sleep: Any = time.sleep
) -> dict[str, Any]:
    """Poll the runtime until RUNNING; stream build logs; restart on errors up to max_restarts."""

    call = hub_caller(space_id, token=token, repo_type="space")

    started = time.monotonic()
    restarts = 0
    seen_logs = 0
    stages: list[str] = []
    while True:
        runtime = call("read the runtime of", api.get_space_runtime, space_id)
        stage = runtime.stage
        if not stages or stages[-1] != stage:
            stages.append(stage)
            log.info("Space %s: %s", space_id, stage)
        if stage == "RUNNING":
            return {"stage": stage, "stages": stages, "restarts": restarts, "hardware": runtime.hardware}
        if stage in ("BUILDING", "RUNNING_BUILDING", "APP_STARTING"):
            lines = _logs(api, space_id, build=True)
            for line in lines[seen_logs:]:
                log.info("[build] %s", line)
            seen_logs = max(seen_logs, len(lines))
        elif stage in FAILED_STAGES:
            lines = _logs(api, space_id, build=stage != "RUNTIME_ERROR")
            tail = lines[-20:]
            for line in tail:
                log.warning("[%s] %s", stage, line)
            if restarts >= settings.max_restarts:
                raise PermanentError(
                    f"Space {space_id} ended in {stage} after {restarts} restart(s); last log lines:\n  "
                    + "\n  ".join(tail or ["(no logs)"]),
                    hint="fix the app or its requirements (see the logs above), then run the space stage again",
                )
            restarts += 1
            log.warning("Space %s: %s, restarting (%d/%d)", space_id, stage, restarts, settings.max_restarts)
            call("restart", api.restart_space, space_id, factory_reboot=stage == "BUILD_ERROR")
            seen_logs = 0
        elif stage in ("PAUSED", "STOPPED", "SLEEPING"):
            call("restart", api.restart_space, space_id)
        if time.monotonic() - started > settings.timeout:
            raise PermanentError(
                f"Space {space_id} was not RUNNING after {settings.timeout:.0f} s (stages: {' -> '.join(stages)})",
                hint="raise space.timeout, or look at the Space's logs",
            )
        sleep(settings.poll_interval)


def _logs(api: Any, space_id: str, build: bool) -> list[str]:
    try:
        return [line.rstrip("\n") for line in api.fetch_space_logs(space_id, build=build)]
    except Exception as exc:  # logs are for the user; a missing log must not fail the deploy
        log.debug("no %s logs for %s: %s", "build" if build else "run", space_id, exc)
        return []


def _source(
    pushed: Artifact | None, merged_repo: Artifact | None, settings: SpaceSettings, task: str
) -> tuple[SpaceTemplate, Artifact]:
    """The template to deploy and the push record of the repo it runs from."""
    repos = {k: a for k, a in (("gguf", pushed), ("merged", merged_repo)) if a is not None}
    template = choose_template(settings.template, task, set(repos))
    source = repos[template.manifest.runs_from]
    if not source.meta.get("repo_id"):
        raise PermanentError(f"the {source.name} push record has no repo_id", hint="run the hub_push stage first")
    return template, source


def space(
    pushed: Artifact | None,
    ggufs: list[Artifact],
    settings: SpaceSettings,
    publish_dir: Path,
    *,
    model_name: str,
    license: str = "apache-2.0",
    token: Any = None,
    read_token: Any = None,
    dry_run: bool = False,
    sleep: Any = time.sleep,
    merged_repo: Artifact | None = None,
    model_task: str = "text-generation",
) -> Artifact:
    """Render the Space folder and (with a write token, after a real push) deploy it. Returns 'publish:space'.

    `pushed` is the GGUF repo's push record, `merged_repo` the merged (transformers) repo's, when published;
    `model_task` the model's task (space_templates.model_task), which space.template auto chooses by
    (not `task`: RunContext.call takes the Prefect task under that name)."""
    template, source = _source(pushed, merged_repo, settings, model_task)
    model_repo = str(source.meta["repo_id"])
    endpoint = hub_endpoint(str(source.meta.get("endpoint") or HUB_ENDPOINT))
    model_file = _pick_file(source, ggufs, settings.quant) if template.manifest.runs_from == "gguf" else ""
    space_id = settings.space_id or f"{model_repo.split('/')[0]}/{model_name}-demo"
    title = settings.title or model_name
    folder = publish_dir / "space" / space_id.replace("/", "__")
    inputs = space_inputs(settings, model_repo, model_file, title, repo_url(endpoint, model_repo))
    template.render_to(folder, inputs, license)
    refuse_secrets(folder, f"to the Space {space_id}")  # before any upload, like the model repo
    variables = template.variables(inputs)
    secret = token.get_secret_value() if token is not None else None
    read = read_token.get_secret_value() if read_token is not None else None
    if read and secret and read == secret:
        raise PermanentError(
            "space.read_token resolves to the same token as hub.token",
            hint="give the Space a separate read-only token: the write token must never reach a Space",
        )
    reasons = [
        r
        for r, on in (
            ("no hub.token configured", not secret),
            ("the model repo was not pushed (dry run)", bool(source.meta.get("dry_run"))),
        )
        if on
    ]
    if dry_run and not reasons:
        reasons = ["--dry-run"]
    meta: dict[str, Any] = {
        "space_id": space_id,
        "template": template.name,
        "model_repo": model_repo,
        "model_file": model_file,
        "variables": variables,
        "secrets": ["HF_TOKEN"] if read else [],
        "hardware": settings.hardware,
        "sleep_time": settings.sleep_time,
        "url": repo_url(endpoint, space_id, "space"),
        "embed_url": space_embed_url(space_id, endpoint),
        "duplicate_from": settings.duplicate_from or None,
        "storage": settings.storage,
        "staged": str(folder),
        "dry_run": bool(reasons),
    }
    if reasons:
        meta["reason"] = "; ".join(reasons)
        atomic_write_json(publish_dir / "space.json", meta)
        log.info(
            "dry run (%s): the Space folder for %s is %s; it would set variables %s%s",
            meta["reason"],
            space_id,
            folder,
            ", ".join(variables),
            " and the HF_TOKEN secret" if read else "",
        )
        return Artifact.from_path(
            folder,
            name="publish:space",
            kind=ArtifactKind.PUBLISH,
            stage=STAGE,
            inputs=[source],
            settings=settings,
            tools=["huggingface_hub"],
            meta=meta,
        )

    settings_endpoint = endpoint
    api = hub_api(settings_endpoint, secret)
    if read:
        problem = not_read_only(whoami(hub_api(settings_endpoint, read), read))
        if problem:
            raise PermanentError(
                f"space.read_token {problem}",
                hint=(
                    "create a read-only token for the Space (role 'read', or fine-grained with read permissions "
                    "only): Space secrets are readable by the Space's code"
                ),
            )
    elif source.meta.get("private"):
        log.warning(
            "the model repo is private and no space.read_token is set: the Space will not be able to download %s",
            model_file,
        )

    call = hub_caller(space_id, token=secret, repo_type="space")

    sleep_time = settings.sleep_time if settings.hardware != "cpu-basic" else None
    duplicated = duplicate_if_new(api, space_id, settings, variables, call, sleep_time)
    if settings.duplicate_from:  # the Space's own app is kept: configured, never uploaded over
        result = {"commit": None, "uploaded": [], "skipped": [], "url": None}
    else:
        result = push_folder(
            folder,
            space_id,
            token=secret,
            endpoint=settings_endpoint,
            private=settings.private,
            commit_message=f"loraship: {template.name} demo for {model_repo}"
            + (f" ({model_file})" if model_file else ""),
            repo_type="space",
            space_sdk=template.manifest.sdk,
        )
    meta.update(ensure_storage(api, space_id, settings, call))
    # Compared with the Space's variables now (not with a record of an earlier run): only changes are sent.
    current = {
        k: getattr(v, "value", v)
        for k, v in (call("read the variables of", api.get_space_variables, space_id) or {}).items()
    }
    changed_vars = [k for k, v in variables.items() if current.get(k) != v]
    for key in changed_vars:
        call(f"set variable {key} on", api.add_space_variable, space_id, key, variables[key])
    if read:
        call(
            "set the HF_TOKEN secret on",
            api.add_space_secret,
            space_id,
            "HF_TOKEN",
            read,
            description="read-only token for the model repo (set by loraship)",
        )
    call("request hardware for", api.request_space_hardware, space_id, settings.hardware, sleep_time=sleep_time)
    if not result["uploaded"] and (changed_vars or meta.get("storage_changed") or (duplicated and read)):
        # the files are as they were: a Space only rebuilds on a commit, so restart to pick up new settings
        call("restart", api.restart_space, space_id)
    meta.update(
        {
            "commit": result["commit"],
            "variables_changed": changed_vars,
            "uploaded": result["uploaded"],
            "skipped": result["skipped"],
            "url": result["url"] or meta["url"],
        }
    )
    if settings.wait:
        meta.update(wait_until_running(api, space_id, settings, secret, sleep=sleep))
        meta["smoke"] = _smoke(api, space_id, template, folder, settings, secret)
    atomic_write_json(publish_dir / "space.json", meta)
    log.info("Space %s: %s (%s)", space_id, meta.get("stage", "deployed"), meta["url"])
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode()).hexdigest()
    meta["record_sha256"] = digest
    made = Artifact.from_path(
        folder,
        name="publish:space",
        kind=ArtifactKind.PUBLISH,
        stage=STAGE,
        inputs=[source],
        settings=settings,
        tools=["huggingface_hub", "gradio"],
        meta=meta,
    )
    smoke = meta.get("smoke") or {}
    if smoke.get("ok") is False:
        raise FailedWithReport(
            f"Space {space_id} is RUNNING but its smoke test failed: {smoke['error']}; last log lines:\n  "
            + "\n  ".join(smoke.get("log_tail") or ["(no logs)"]),
            hint="look at the Space's logs (model repo, read token, requirements); space.smoke_test: false skips it",
            artifacts=[made],
        )
    return made


def _smoke(
    api: Any, space_id: str, template: SpaceTemplate, folder: Path, settings: SpaceSettings, token: str | None
) -> dict[str, Any]:
    """The live smoke test's record: ok with length and latency, skipped (and why), or failed with the
    Space's last run-log lines."""
    if not settings.smoke_test:
        return {"skipped": "space.smoke_test is false"}
    if settings.duplicate_from:
        return {"skipped": "duplicate_from: the Space runs its own app, whose API loraship does not know"}
    src = settings.app_url or space_id
    try:
        record = smoke_test(
            src,
            template,
            example_input(template, folder, settings.examples),
            token=token,
            timeout=settings.smoke_timeout,
        )
    except SmokeFailed as exc:
        tail = _logs(api, space_id, build=False)[-20:]
        log.warning("Space %s: smoke test failed: %s", space_id, exc)
        return {"ok": False, "error": str(exc), "log_tail": tail, "src": src}
    log.info("Space %s: %s", space_id, smoke_line(record))
    return record


@stage_task(STAGE, key_files=[f for template in SPACE_TEMPLATES.values() for f in template.files()])
def space_task(
    pushed: Artifact | None,
    ggufs: list[Artifact],
    settings: SpaceSettings,
    publish_dir: Path,
    model_name: str,
    license: str = "apache-2.0",
    dry_run: bool = False,
    _token: Any = None,
    _read_token: Any = None,
    merged_repo: Artifact | None = None,
    model_task: str = "text-generation",
) -> Artifact:
    return space(
        pushed,
        ggufs,
        settings,
        publish_dir,
        model_name=model_name,
        license=license,
        token=_token,
        read_token=_read_token,
        dry_run=dry_run,
        merged_repo=merged_repo,
        model_task=model_task,
    )
