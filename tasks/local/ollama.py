"""Ollama: a Modelfile for a GGUF, rendered from templates/ollama/Modelfile.j2, and `ollama create`.

Ollama prompts with Go templates, GGUF files carry a Jinja chat template, and no library translates one
into the other (Ollama itself recognises a few well-known templates at create time). So the GGUF's chat
template is matched by its rendered structure against the families table (tasks/chat/families.py: ChatML,
Llama 3/3.1, Llama 2, Mistral, Gemma, Phi, DeepSeek, Zephyr), and that family's Go template and stop
strings are written; for an unknown family the TEMPLATE line is left out and Ollama falls back to its own
detection (the record says so). The template contract (tasks/chat/) renders the result with Go.
"""

from __future__ import annotations

import logging
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2

from tasks.chat.families import Detection, OllamaTranslation, detect, ollama_template
from tasks.chat.vocab import load_vocab
from tasks.core.errors import PermanentError

log = logging.getLogger("loraship.local_deploy")


def translate(gguf_path: Path) -> tuple[Detection, OllamaTranslation | None]:
    """The GGUF's chat-template family (by structure, tasks/chat/families.py) and its Ollama TEMPLATE."""
    vocab = load_vocab(gguf_path)
    found = detect(vocab.chat_template, vocab.bos_text, vocab.eos_text)
    return found, ollama_template(found, vocab.add_bos)


def _template_env() -> jinja2.Environment:
    import templates

    root = Path(templates.__file__).parent
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(root)),
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
    )


def _quote(value: Any) -> str:
    if isinstance(value, str) and (
        not value
        or any(c.isspace() for c in value)
        or '"' in value
        or not value.replace(".", "").replace("-", "").isalnum()
    ):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return str(value)


def render_modelfile(
    gguf_path: Path,
    *,
    model: str,
    quant: str,
    ollama_name: str,
    system: str | None,
    parameters: dict[str, Any],
    modelfile_name: str = "Modelfile",
    template: str | None = None,
) -> tuple[str, dict[str, Any]]:
    """The Modelfile text and a record of how it was made (family found, where TEMPLATE came from, notes).

    `template` (deployment.ollama_template) replaces the translated TEMPLATE; a `stop` in `parameters`
    replaces the family's stop strings; `system` (deployment.system_prompt) wins over a default system
    prompt the chat template carries.
    """
    found, translated = translate(gguf_path)
    go_template = template or (translated.template if translated else None)
    stops = list(translated.stop) if translated else []
    if system is None and translated is not None and translated.system:
        system = translated.system
    params: list[tuple[str, str]] = []
    for key, value in parameters.items():
        for v in value if isinstance(value, list) else [value]:
            params.append((key, _quote(v)))
    if "stop" not in parameters:
        params += [("stop", _quote(s)) for s in stops]
    text = (
        _template_env()
        .get_template("ollama/Modelfile.j2")
        .render(
            model=model,
            quant=quant,
            ollama_name=ollama_name,
            modelfile_name=modelfile_name,
            gguf_path=str(gguf_path),
            template=go_template,
            system=system,
            parameters=params,
        )
    )
    if template:
        source = "deployment.ollama_template"
    elif translated:
        source = f"translated from the GGUF chat template ({found.family.title if found.family else ''})"
    else:
        source = "left to Ollama (chat template family not recognised): Ollama picks one itself"
    info = {
        "chat_format": found.name,
        "template": source,
        "detection": found.reason,
        "notes": list(translated.notes) if translated else [],
        "default_system_from_template": bool(translated and translated.system and system == translated.system),
        "parameters": [f"{k} {v}" for k, v in params],
    }
    return text, info


def ollama_create(ollama: str, name: str, modelfile: Path, timeout: float = 1800.0) -> dict[str, Any]:
    proc = subprocess.run(
        [ollama, "create", name, "-f", str(modelfile)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=str(modelfile.parent),
    )
    return {"cli": ollama, "rc": proc.returncode, "output": (proc.stdout + proc.stderr)[-2000:]}


@dataclass(frozen=True)
class Modelfile:
    """The parts of an Ollama Modelfile that decide the prompt and the stops."""

    from_: str | None
    template: str | None
    system: str | None
    parameters: tuple[tuple[str, str], ...]

    @property
    def stops(self) -> tuple[str, ...]:
        return tuple(v for k, v in self.parameters if k == "stop")


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 6 and value.startswith('"""') and value.endswith('"""'):
        return value[3:-3]
    if len(value) >= 2 and value.startswith('"') and value.endswith('"'):
        return value[1:-1].replace('\\"', '"').replace("\\\\", "\\")
    return value


def parse_modelfile(text: str) -> Modelfile:
    """Read FROM, TEMPLATE, SYSTEM and PARAMETER lines as Ollama does (`\"\"\"...\"\"\"` may span lines).

    Instructions are case-insensitive; `#` starts a comment line; the last TEMPLATE/SYSTEM wins.
    """
    values: dict[str, str] = {}
    params: list[tuple[str, str]] = []
    i, n = 0, len(text)
    while i < n:
        end = text.find("\n", i)
        line = text[i : n if end < 0 else end]
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            i = n if end < 0 else end + 1
            continue
        word, _, rest = stripped.partition(" ")
        rest = rest.lstrip()
        if rest.startswith('"""'):  # a block: to the next closing triple quote, across lines
            start = text.index('"""', i) + 3
            close = text.find('"""', start)
            if close < 0:
                raise PermanentError(f'Modelfile: unterminated """ after {word}')
            arg = text[start:close]
            after = text.find("\n", close)
            i = n if after < 0 else after + 1
        else:
            arg = rest
            i = n if end < 0 else end + 1
        key = word.upper()
        if key == "PARAMETER":
            name, _, value = arg.partition(" ")
            params.append((name.strip(), _unquote(value)))
        elif key in ("FROM", "TEMPLATE", "SYSTEM"):
            values[key] = arg if rest.startswith('"""') else _unquote(arg)
    return Modelfile(values.get("FROM"), values.get("TEMPLATE"), values.get("SYSTEM"), tuple(params))
