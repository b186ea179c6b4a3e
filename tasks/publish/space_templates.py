"""Space templates as a registry: one folder per template under templates/spaces/<name>/ with a manifest.yaml.

Adding a template is one folder: the app file, its requirements, a README.md.j2 for the Spaces header, and
a manifest saying what is copied, what is rendered, which Space variables the app reads (and from which
input each is set), which model tasks it serves and which published repo it runs from. The manifest is
validated with pydantic when the registry loads (a missing file or an unknown input fails at import, naming
the template and the field), so a broken template never reaches a deploy.

`space.template` names one; `auto` picks the first template (by `auto_rank`) that serves the model's task
(tasks.publish.space_templates.model_task) and whose repo this run published.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tasks.core.atomic import atomic_dir
from tasks.core.constants import TEMPLATES_DIR
from tasks.core.errors import PermanentError
from tasks.core.registry import Contract, Registry

SPACES_DIR = TEMPLATES_DIR / "spaces"
# files every app shares (rate limit, activity line, error display), named by a manifest's `shared:` list
SHARED_DIR = SPACES_DIR / "_shared"
AUTO = "auto"
RepoKind = Literal["gguf", "merged", "adapter"]


class SpaceInputs(BaseModel):
    """Everything a template's variables and README may be set from (the manifest names these fields).

    Values are strings as Space variables are; an empty one means "not set" (the variable is left out)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model_repo: str
    model_file: str = ""
    model_url: str = ""
    title: str
    examples: str = "[]"  # a JSON list
    max_tokens: str = ""
    rate_limit_per_minute: str = ""
    zero_gpu: str = ""  # "1" when the hardware is ZeroGPU: the app wraps its model call in spaces.GPU
    hf_home: str = ""  # the model cache (on persistent storage: /data/.huggingface)
    language: str = ""  # the ASR default language, when the model offers a choice


class SmokeSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    api_name: str = Field(description="the app's API endpoint the live smoke test calls, e.g. /chat")
    input: Literal["text", "audio"] = Field(description="what the smoke test sends: an example prompt or audio file")
    extra_args: list[Any] = Field(default_factory=list, description="the endpoint's other inputs, after the example")
    answer: Literal["chat", "text"] = Field(
        "text", description="where the answer is: the last chat message of the first output, or the first output"
    )
    error_marker: str = Field("⚠️", description="an answer starting with this is the app reporting an error")
    examples_dir: str = Field("", description="audio input: the Space folder's example files")


class Manifest(BaseModel):
    """templates/spaces/<name>/manifest.yaml."""

    model_config = ConfigDict(extra="forbid")

    description: str
    sdk: Literal["gradio"] = "gradio"
    sdk_version: str
    app_file: str = "app.py"
    tasks: list[str] = Field(min_length=1, description="the model tasks (pipeline tags) the template serves")
    runs_from: RepoKind = Field(description="the published repo the app loads its model from")
    auto_rank: int = Field(0, description="space.template auto: lower ranks are tried first")
    emoji: str = "🤗"
    short_description: str = Field("Demo of {model_repo}", description="formatted with the SpaceInputs")
    copy_files: list[str] = Field(alias="copy", description="files or folders copied as they are")
    render: list[str] = Field(default_factory=list, description="jinja2 files, written without their .j2")
    shared: list[str] = Field(
        default_factory=list, description="files from templates/spaces/_shared/ copied beside the app as they are"
    )
    variables: dict[str, str] = Field(description="Space variable -> the SpaceInputs field it is set from")
    optional_variables: list[str] = Field(
        default_factory=list, description="variables the app also reads when a user sets them on the Space by hand"
    )
    smoke: SmokeSpec

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        unknown = sorted(set(self.variables.values()) - set(SpaceInputs.model_fields))
        if unknown:
            raise ValueError(f"variables: unknown inputs {unknown}; known: {', '.join(SpaceInputs.model_fields)}")
        if self.app_file not in self.copy_files:
            raise ValueError(f"app_file {self.app_file!r} is not in copy")
        if "README.md.j2" not in self.render:
            raise ValueError("render must hold README.md.j2 (the Spaces header)")
        return self


@dataclass(frozen=True)
class SpaceTemplate:
    """A registered template: its folder and validated manifest; renders a Space folder and its variables."""

    name: str
    folder: Path
    manifest: Manifest

    @property
    def description(self) -> str:
        return self.manifest.description

    def files(self) -> list[Path]:
        """Every file the template ships (the space stage's cache key covers them)."""
        out = [self.folder / "manifest.yaml"]
        for rel in [*self.manifest.copy_files, *self.manifest.render]:
            p = self.folder / rel
            out += sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        return out + [SHARED_DIR / rel for rel in self.manifest.shared]

    def variables(self, inputs: SpaceInputs) -> dict[str, str]:
        """The Space variables the app reads, from the inputs; empty inputs are left out."""
        values = inputs.model_dump()
        return {var: str(values[src]) for var, src in self.manifest.variables.items() if values[src] != ""}

    def render_to(self, dest: Path, inputs: SpaceInputs, license: str) -> Path:
        """Write the Space folder atomically: copied files as they are, .j2 files rendered; the README header
        comes from huggingface_hub's SpaceCardData (a user's title cannot break the YAML) and is read back."""
        import jinja2
        from huggingface_hub import SpaceCard, SpaceCardData

        m = self.manifest
        header = SpaceCardData(
            title=inputs.title[:60],
            emoji=m.emoji,
            colorFrom="indigo",
            colorTo="blue",
            sdk=m.sdk,
            sdk_version=m.sdk_version,
            app_file=m.app_file,
            license=license,
            models=[inputs.model_repo],
            pinned=False,
            short_description=m.short_description.format(**inputs.model_dump())[:60],
        )
        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
        context = {**inputs.model_dump(), "space_header": header.to_yaml(), "manifest": m}
        with atomic_dir(dest) as tmp:
            for rel in m.copy_files:
                src = self.folder / rel
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                if src.is_dir():
                    shutil.copytree(src, tmp / rel)
                else:
                    shutil.copyfile(src, tmp / rel)
            for rel in m.shared:
                shutil.copyfile(SHARED_DIR / rel, tmp / rel)
            for rel in m.render:
                text = env.from_string((self.folder / rel).read_text(encoding="utf-8")).render(**context)
                (tmp / rel.removesuffix(".j2")).write_text(text, encoding="utf-8")
        data = SpaceCard((dest / "README.md").read_text(encoding="utf-8")).data.to_dict()
        if data.get("sdk") != m.sdk or data.get("app_file") != m.app_file or data.get("models") != [inputs.model_repo]:
            raise PermanentError(
                f"the rendered Space README.md header is wrong: {data}",
                hint=f"check {self.folder / 'README.md.j2'}",
            )
        return dest


def load_template(folder: Path) -> SpaceTemplate:
    """Read and validate one template folder; every problem names the folder and the field."""
    path = folder / "manifest.yaml"
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        manifest = Manifest.model_validate(raw)
    except (OSError, yaml.YAMLError, ValidationError) as exc:
        raise ValueError(f"Space template {folder.name}: {path}: {exc}") from exc
    missing = [rel for rel in [*manifest.copy_files, *manifest.render] if not (folder / rel).exists()]
    missing += [f"_shared/{rel}" for rel in manifest.shared if not (SHARED_DIR / rel).is_file()]
    if missing:
        raise ValueError(f"Space template {folder.name}: {path}: files named in the manifest are missing: {missing}")
    return SpaceTemplate(name=folder.name, folder=folder, manifest=manifest)


def _load_all(root: Path = SPACES_DIR) -> list[SpaceTemplate]:
    found = [load_template(d) for d in sorted(root.iterdir()) if (d / "manifest.yaml").is_file()]
    return sorted(found, key=lambda t: (t.manifest.auto_rank, t.name))


SPACE_TEMPLATES: Registry[SpaceTemplate] = Registry(
    "Space template",
    "space.template",
    _load_all(),
    # a template is files: it renders on any machine (what the Space itself needs is its requirements.txt)
    contract=Contract(SpaceTemplate, run="render_to", unavailable=lambda template: None),
)

# Architecture name endings -> the model's task (the Hub's pipeline tags)
_ARCH_TASKS = (
    ("ForCTC", "automatic-speech-recognition"),
    ("ForSpeechSeq2Seq", "automatic-speech-recognition"),
    ("WhisperForConditionalGeneration", "automatic-speech-recognition"),
    ("VoxtralForConditionalGeneration", "automatic-speech-recognition"),
    ("ForCausalLM", "text-generation"),
)


def model_task(config: dict[str, Any] | None, pipeline_tag: str | None = None) -> str:
    """The model's task: card.pipeline_tag when set, else from config.json's architectures; text-generation
    when nothing says otherwise (the GGUF chat is what this project started with)."""
    if pipeline_tag:
        return pipeline_tag
    for arch in (config or {}).get("architectures") or []:
        for ending, task in _ARCH_TASKS:
            if str(arch).endswith(ending):
                return task
    return "text-generation"


def check_template(name: str) -> str:
    """For the space.template validator: `auto` or a registered name."""
    return name if name == AUTO else SPACE_TEMPLATES.check(name)


def choose_template(name: str, task: str, published: set[str]) -> SpaceTemplate:
    """The template to deploy: the named one (its repo must be published), or with `auto` the first that
    serves `task` and runs from a published repo. Errors say what to set."""
    if name != AUTO:
        template = SPACE_TEMPLATES.lookup(name)
        if template.manifest.runs_from not in published:
            raise PermanentError(
                f"space.template {name!r} runs from the {template.manifest.runs_from} repo, which this run did not "
                f"publish (published: {', '.join(sorted(published)) or 'none'})",
                hint=f"add {template.manifest.runs_from!r} to hub.repos, or choose another space.template",
            )
        return template
    serving = [t for t in SPACE_TEMPLATES.values() if task in t.manifest.tasks]
    for template in serving:
        if template.manifest.runs_from in published:
            return template
    raise PermanentError(
        f"space.template auto: no Space template serves {task!r} from a published repo "
        f"(published: {', '.join(sorted(published)) or 'none'}; templates for {task!r}: "
        f"{', '.join(f'{t.name} ({t.manifest.runs_from})' for t in serving) or 'none'})",
        hint="set space.template, or publish the repo the template runs from (hub.repos)",
    )
