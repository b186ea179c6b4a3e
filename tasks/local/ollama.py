"""Ollama: a Modelfile for a GGUF, rendered from templates/ollama/Modelfile.j2, and `ollama create`.

Ollama prompts with Go templates, GGUF files carry a Jinja chat template, and no library translates one
into the other (Ollama itself recognises a few well-known templates at create time). So the GGUF's
chat template is read with `gguf.GGUFReader`, matched against the common chat formats (ChatML, Llama 3,
Mistral [INST], Gemma), and the matching Go template and stop tokens are written; for an unknown format
the TEMPLATE line is left out and Ollama falls back to its own detection (the record says so).
"""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path
from typing import Any

import jinja2

log = logging.getLogger("loraship.local_deploy")

# Go templates in the classic System/Prompt/Response form every Ollama version understands.
GO_TEMPLATES: dict[str, tuple[str, list[str]]] = {
    "chatml": (
        "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
        "{{ if .Prompt }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}"
        "<|im_start|>assistant\n{{ .Response }}<|im_end|>\n",
        ["<|im_start|>", "<|im_end|>"],
    ),
    "llama3": (
        "{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
        "{{ if .Prompt }}<|start_header_id|>user<|end_header_id|>\n\n{{ .Prompt }}<|eot_id|>{{ end }}"
        "<|start_header_id|>assistant<|end_header_id|>\n\n{{ .Response }}<|eot_id|>",
        ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    ),
    "mistral": (
        "[INST] {{ if .System }}{{ .System }} {{ end }}{{ .Prompt }} [/INST]{{ .Response }}",
        ["[INST]", "[/INST]"],
    ),
    "gemma": (
        "<start_of_turn>user\n{{ if .System }}{{ .System }} {{ end }}{{ .Prompt }}<end_of_turn>\n"
        "<start_of_turn>model\n{{ .Response }}<end_of_turn>\n",
        ["<start_of_turn>", "<end_of_turn>"],
    ),
}
_MARKERS = (
    ("<|im_start|>", "chatml"),
    ("<|start_header_id|>", "llama3"),
    ("<start_of_turn>", "gemma"),
    ("[INST]", "mistral"),
)


def gguf_chat_template(path: Path) -> str | None:
    """The `tokenizer.chat_template` string stored in a GGUF file, if any."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    field = reader.fields.get("tokenizer.chat_template")
    if field is None:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")


def chat_format(jinja_template: str | None) -> str | None:
    if not jinja_template:
        return None
    for marker, name in _MARKERS:
        if marker in jinja_template:
            return name
    return None


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
) -> tuple[str, dict[str, Any]]:
    """The Modelfile text and a record of how it was made (chat format found, template source)."""
    fmt = chat_format(gguf_chat_template(gguf_path))
    template, stops = GO_TEMPLATES.get(fmt, (None, [])) if fmt else (None, [])
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
            template=template,
            system=system,
            parameters=params,
        )
    )
    info = {
        "chat_format": fmt,
        "template": "derived from the GGUF chat template"
        if template
        else "left to Ollama (chat format not recognised)",
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
