"""The contract's report: `reports/template-contract.json` (everything) and `.md` (what a person reads).

File names only, never local paths: the summary lines also go into the model card's usage section.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.chat.compare import Difference
from tasks.chat.contract import ContractResult
from tasks.chat.findings import Severity
from tasks.chat.runtimes.base import Rendering
from tasks.core.atomic import atomic_write_json, atomic_write_text

SCHEMA = 1
RUNTIME_ORDER = ("transformers", "llama.cpp", "ollama", "lmstudio")


def _status(r: ContractResult, conv: str, runtime: str) -> dict[str, Any]:
    got = r.renderings.get(conv, {}).get(runtime)
    if got is None:
        return {"status": "skipped"}
    diff = next((d for d in r.differences if d.conversation == conv and d.runtime == runtime), None)
    out: dict[str, Any] = {"mode": got.mode.value, "tokens": len(got.tokens) if got.tokens is not None else None}
    if runtime == r.reference:
        out["status"] = "reference" if got.ok else ("refused" if got.refused else "error")
    elif not got.ok:
        out["status"] = "refused" if got.refused else "error"
        out["detail"] = got.refused or got.error
    else:
        out["status"] = "differs" if diff else "same"
    if diff:
        out["difference"] = diff.summary()
    return out


def stop_pieces(r: ContractResult, ids: tuple[int, ...]) -> list[str]:
    return [r.vocab.piece(i) for i in ids]


def to_json(r: ContractResult) -> dict[str, Any]:
    end = r.turn_end
    return {
        "schema": SCHEMA,
        "verdict": r.verdict.value,
        "reference": r.reference,
        "gguf": r.vocab.path.name,
        "family": {
            "name": r.family.name,
            "title": r.family.family.title if r.family.family else None,
            "reason": r.family.reason,
            "default_system": r.family.default_system,
        },
        "runtimes": [s.__dict__ for s in r.runtimes],
        "conversations": [
            {
                "name": c.name,
                "purpose": c.purpose,
                "ending": c.ending.value,
                "results": {rt: _status(r, c.name, rt) for rt in _runtime_names(r)},
            }
            for c in r.conversations
        ],
        "differences": [d.as_dict() for d in r.differences],
        "gguf_tokens": {
            "eos": r.vocab.eos_id,
            "eot": r.vocab.eot_id,
            "bos": r.vocab.bos_id,
            "add_bos": r.vocab.add_bos,
        },
        "turn_end": {
            "id": end.token.id if end.token else None,
            "piece": end.token.piece if end.token else None,
            "text": end.text,
            "control": end.control,
            "how": end.how,
        },
        "stops": {
            name: {
                "ids": list(s.token_ids),
                "pieces": stop_pieces(r, s.token_ids),
                "strings": list(s.strings),
                "source": s.source,
            }
            for name, s in r.stop_sets.items()
        },
        "generation": [p.as_dict() for p in r.probes],
        "findings": [f.as_dict() for f in r.findings],
        "prompts": {
            conv: {rt: x.text for rt, x in row.items() if x.text is not None} for conv, row in r.renderings.items()
        },
    }


def _runtime_names(r: ContractResult) -> list[str]:
    names = [s.name for s in r.runtimes]
    return sorted(names, key=lambda n: RUNTIME_ORDER.index(n) if n in RUNTIME_ORDER else 99)


def summary_lines(r: ContractResult) -> list[str]:
    """Three or four lines for the run summary and the model card (no paths)."""
    checked = [s.name for s in r.runtimes if s.checked]
    skipped = [s.name for s in r.runtimes if not s.checked]
    n_conv = len(r.conversations)
    lines = [
        f"Chat template: {r.family.family.title if r.family.family else 'not a known family'}"
        + (f"; ends a turn with {r.turn_end.token.piece}" if r.turn_end.token else ""),
    ]
    if r.differences:
        lines.append(
            f"Token contract: {len(r.differences)} difference(s) against {r.reference}: {r.differences[0].summary()}"
        )
    else:
        lines.append(f"Token contract: {', '.join(checked)} give the same tokens for {n_conv} test conversations")
    if skipped:
        lines.append("Not checked: " + "; ".join(f"{s.name} ({s.detail})" for s in r.runtimes if not s.checked))
    stop_errors = [f for f in r.errors if f.check in ("stops", "generation")]
    if stop_errors:
        lines.append("Stops: " + stop_errors[0].message)
    elif r.turn_end.token:
        lines.append("Stops: every checked runtime stops on " + r.turn_end.token.piece)
    return lines


def _tok(r: ContractResult, token: int | None) -> str:
    return f"`{r.vocab.piece(token)}` ({token})" if token is not None else "none"


def _row(*cells: object) -> str:
    """A markdown table row; `|` inside a cell (token pieces like <|im_end|>) is escaped, as GFM needs."""
    return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |"


def card_lines(r: ContractResult) -> list[str]:
    """The model card's chat-format lines: the format, the stop token, what was checked (no paths)."""
    fam = r.family.family
    lines = [f"Format: {fam.title}." if fam else "Format: the GGUF's embedded chat template (no common family)."]
    if r.turn_end.token is not None:
        lines.append(f"An assistant turn ends with `{r.turn_end.token.piece}`: stop generating on it.")
    checked = [s.name for s in r.runtimes if s.checked]
    if r.differences:
        lines.append(f"loraship's template contract found a difference: {r.differences[0].summary()}")
    elif len(checked) > 1:
        lines.append(
            f"Checked by loraship's template contract: {', '.join(checked)} give the same tokens for "
            f"{len(r.conversations)} test conversations"
            + ("; the served model stops on it." if any(p.stopped for p in r.probes) else ".")
        )
    return lines


def _tokens(ts) -> str:
    return " ".join(f"`{t.piece}`({t.id})" for t in ts) or "—"


def _diff_md(d: Difference) -> list[str]:
    exp = f"`{d.expected.piece}`({d.expected.id})" if d.expected else "end of prompt"
    got = f"`{d.got.piece}`({d.got.id})" if d.got else "end of prompt"
    return [
        f"**{d.conversation} / {d.runtime}** ({d.mode}): token {d.index} of {d.reference_len} "
        f"({d.runtime}: {d.got_len} tokens)" + (f" — {d.diagnosis}" if d.diagnosis else ""),
        "",
        f"- before: {_tokens(d.before)}",
        f"- {d.reference_runtime}: {exp} then {_tokens(d.reference_after)}",
        f"- {d.runtime}: {got} then {_tokens(d.got_after)}",
        "",
    ]


def _cell(s: dict[str, Any]) -> str:
    st = s["status"]
    if st in ("same", "reference"):
        return f"{'ref' if st == 'reference' else 'same'}, {s.get('tokens')} tokens" + (
            f" ({s['mode']})" if s.get("mode") == "continued" else ""
        )
    if st == "differs":
        return "**differs**"
    return st


def to_markdown(r: ContractResult) -> str:
    data = to_json(r)
    names = _runtime_names(r)
    out = [
        f"# Chat-template contract: {r.verdict.value.upper()}",
        "",
        *[f"- {line}" for line in summary_lines(r)],
        f"- Reference: {r.reference}; GGUF: `{r.vocab.path.name}` (add_bos_token={r.vocab.add_bos})",
        "",
        "## Runtimes",
        "",
        "| runtime | checked | what it reads |",
        "| --- | --- | --- |",
        *[_row(s.name, "yes" if s.checked else "no", s.detail) for s in r.runtimes],
        "",
        "## Conversations",
        "",
        "| conversation | " + " | ".join(names) + " |",
        "| --- | " + " | ".join("---" for _ in names) + " |",
    ]
    for c in data["conversations"]:
        out.append(_row(c["name"], *(_cell(c["results"][n]) for n in names)))
    out += ["", "A conversation ending on the assistant is continued by Ollama (prefill): it is compared with "
            "transformers' `continue_final_message` rendering.", ""]  # fmt: skip
    if r.differences:
        out += ["## Differences", ""]
        for d in r.differences:
            out += _diff_md(d)
    end = r.turn_end
    out += [
        "## Stop tokens",
        "",
        "End of an assistant turn: "
        + (f"`{end.token.piece}` ({end.token.id})" if end.token else "not found")
        + f" — {end.how}",
        "",
        f"The GGUF's EOS: {_tok(r, r.vocab.eos_id)}, EOT: {_tok(r, r.vocab.eot_id)}, BOS: {_tok(r, r.vocab.bos_id)} "
        f"(add_bos_token={r.vocab.add_bos})",
        "",
        "| runtime | stops on (ids) | stop strings | from |",
        "| --- | --- | --- | --- |",
    ]
    for name, s in data["stops"].items():
        ids = ", ".join(f"`{p}`({i})" for i, p in zip(s["ids"], s["pieces"]))
        out.append(_row(name, ids, ", ".join(f"`{x}`" for x in s["strings"]), s["source"]))
    if r.probes:
        out += [
            "",
            "## Served generation",
            "",
            "| probe | finish | tokens | max | answer |",
            "| --- | --- | --- | --- | --- |",
        ]
        for p in r.probes:
            out.append(
                _row(
                    p.kind, p.finish_reason, p.completion_tokens, p.max_tokens, repr((p.content or p.error or "")[:80])
                )
            )
    for sev in (Severity.ERROR, Severity.WARNING, Severity.NOTE):
        items = [f for f in r.findings if f.severity is sev and f.check != "tokens"]
        if items:
            out += ["", f"## {sev.value.capitalize()}s", ""] + [f"- {f.message}" for f in items]
    ref_first = next(iter(r.renderings.values()), {}).get(r.reference)
    if isinstance(ref_first, Rendering) and ref_first.text is not None:
        out += ["", f"## The reference prompt of `{ref_first.conversation}`", "", "```", ref_first.text, "```"]
    return "\n".join(out) + "\n"


def write(r: ContractResult, out_dir: Path) -> tuple[Path, Path]:
    """Write template-contract.json and template-contract.md into `out_dir` (atomically)."""
    js = atomic_write_json(out_dir / "template-contract.json", to_json(r))
    md = atomic_write_text(out_dir / "template-contract.md", to_markdown(r))
    return js, md
