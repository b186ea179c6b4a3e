"""The check itself: every runtime renders the fixed conversations; tokens and stops must agree.

`check` takes what the pipeline made (the merged model's tokenizer, a GGUF, the Ollama Modelfile, LM
Studio's per-model config, a served endpoint), builds one renderer per runtime (a runtime that cannot be
checked here is reported with the reason, never silently dropped), renders each conversation, compares
every runtime's tokens with the reference (transformers; llama.cpp when there is no HF tokenizer), checks
stop-token agreement and, when a server is given, a short served generation. Plain functions: no Prefect.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.chat import families, generation, stops
from tasks.chat.compare import Difference, compare
from tasks.chat.conversations import CONVERSATIONS, Conversation, Ending
from tasks.chat.findings import Finding, Severity, Verdict, verdict
from tasks.chat.gorender import GoUnavailable
from tasks.chat.runtimes.base import Mode, Rendering, Runtime, RuntimeUnavailable, StopSet
from tasks.chat.runtimes.gguf import GgufRuntime
from tasks.chat.runtimes.hf import HFRuntime
from tasks.chat.runtimes.lmstudio import LMStudioRuntime
from tasks.chat.runtimes.ollama import OllamaRuntime
from tasks.chat.vocab import GgufVocab, load_vocab
from tasks.local.ollama import parse_modelfile


@dataclass(frozen=True)
class LMStudioInput:
    """The GGUF LM Studio loads and its per-model config (None: no config file: the GGUF's template)."""

    gguf: Path
    config: dict[str, Any] | None = None
    config_path: Path | None = None


@dataclass(frozen=True)
class Server:
    base_url: str  # .../v1
    model_id: str
    gguf: Path


@dataclass(frozen=True)
class ContractInputs:
    gguf: Path
    hf_dir: Path | None = None
    modelfile: Path | None = None
    lmstudio: LMStudioInput | None = None
    server: Server | None = None
    conversations: tuple[Conversation, ...] = CONVERSATIONS
    natural_generation: str = "require"  # require | warn | off
    max_tokens: int = 48
    not_deployed: dict[str, str] = field(default_factory=dict)  # runtime -> why it was not deployed


@dataclass
class RuntimeStatus:
    name: str
    title: str
    checked: bool
    detail: str


@dataclass
class ContractResult:
    verdict: Verdict
    family: families.Detection
    reference: str
    runtimes: list[RuntimeStatus]
    renderings: dict[str, dict[str, Rendering]]  # conversation -> runtime -> rendering
    references: dict[str, dict[str, Rendering]]  # conversation -> mode -> reference rendering
    differences: list[Difference]
    turn_end: stops.TurnEnd
    stop_sets: dict[str, StopSet]
    probes: list[generation.Probe]
    findings: list[Finding]
    conversations: tuple[Conversation, ...]
    vocab: GgufVocab

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity is Severity.ERROR]


def _build(
    inputs: ContractInputs, vocab: GgufVocab, findings: list[Finding]
) -> tuple[list[Runtime], list[RuntimeStatus]]:
    """One renderer per runtime; one that cannot be checked becomes a status and a finding saying why."""
    lm = inputs.lmstudio
    makers: dict[str, Any] = {
        "transformers": (lambda: HFRuntime(inputs.hf_dir)) if inputs.hf_dir else None,
        "llama.cpp": lambda: GgufRuntime(vocab),
        "ollama": (lambda: _ollama(inputs.modelfile)) if inputs.modelfile else None,
        "lmstudio": ((lambda: LMStudioRuntime(load_vocab(lm.gguf), lm.config, lm.config_path)) if lm else None),
    }
    missing = {
        "transformers": "no merged model folder (llama.cpp is the reference)",
        "ollama": "no Modelfile in this run",
        "lmstudio": "LM Studio was not deployed in this run",
    }
    runtimes: list[Runtime] = []
    statuses: list[RuntimeStatus] = []
    for name, make in makers.items():
        why = inputs.not_deployed.get(name) or (missing.get(name) if make is None else None)
        if why:
            severity = Severity.WARNING if name == "transformers" else Severity.NOTE
            findings.append(Finding(severity, "runtime", f"{name}: not checked ({why})", name))
            statuses.append(RuntimeStatus(name, name, False, why))
            continue
        try:
            runtimes.append(make())
        except (RuntimeUnavailable, GoUnavailable) as exc:
            msg = f"{exc.message} ({exc.hint})" if isinstance(exc, GoUnavailable) else str(exc)
            findings.append(Finding(Severity.WARNING, "runtime", f"{name}: not checked: {msg}", name))
            statuses.append(RuntimeStatus(name, name, False, msg))
    return runtimes, statuses


def _ollama(path: Path) -> OllamaRuntime:
    mf = parse_modelfile(path.read_text())
    if not mf.from_:
        raise RuntimeUnavailable(f"{path} has no FROM line")
    src = Path(mf.from_)
    if not src.is_absolute():
        src = (path.parent / src).resolve()
    if not src.is_file():
        raise RuntimeUnavailable(f"the Modelfile's FROM {mf.from_} is not a file here")
    return OllamaRuntime(mf, load_vocab(src), path)


def _reference_for(
    ref: Runtime, conv: Conversation, mode: Mode, system: str | None, cache: dict[str, dict[str, Rendering]]
) -> Rendering:
    """The reference's rendering of `conv` in `mode`, with the other runtime's default system prompt added."""
    by_mode = cache.setdefault(conv.name, {})
    key = mode.value if system is None or conv.has_system else f"{mode.value}+system"
    if key not in by_mode:
        by_mode[key] = ref.render(conv.with_default_system(system), mode)
    return by_mode[key]


def _compare_all(
    inputs: ContractInputs, ref: Runtime, others: list[Runtime], vocab: GgufVocab, findings: list[Finding]
) -> tuple[dict, dict, list[Difference]]:
    renderings: dict[str, dict[str, Rendering]] = {}
    references: dict[str, dict[str, Rendering]] = {}
    diffs: list[Difference] = []
    broken: list[Runtime] = []
    for rt in others:
        if isinstance(rt, OllamaRuntime):
            try:
                rt.prefetch(list(inputs.conversations))
            except Exception as exc:  # a TEMPLATE Go cannot parse: every conversation fails the same way
                findings.append(Finding(Severity.ERROR, "tokens", f"ollama: {exc}", "ollama"))
                broken.append(rt)
    others = [o for o in others if o not in broken]
    bos_piece = vocab.bos_text or None
    for conv in inputs.conversations:
        row = renderings.setdefault(conv.name, {})
        base = _reference_for(ref, conv, Mode.REPLY if conv.add_generation_prompt else Mode.CLOSED, None, references)
        row[ref.name] = base
        if not base.ok:
            why = base.refused or base.error
            sev = Severity.NOTE if base.refused else Severity.ERROR
            findings.append(Finding(sev, "tokens", f"{conv.name}: the reference ({ref.name}) cannot render it: {why}"))
            continue
        for rt in others:
            mode = rt.mode_for(conv)
            want = _reference_for(ref, conv, mode, rt.default_system, references)
            got = rt.render(conv, mode)
            row[rt.name] = got
            if not want.ok:
                findings.append(
                    Finding(
                        Severity.NOTE, "tokens", f"{conv.name}: no {mode.value} reference: {want.refused or want.error}"
                    )
                )
                continue
            if not got.ok:
                findings.append(
                    Finding(
                        Severity.ERROR,
                        "tokens",
                        f"{conv.name}: {rt.name} cannot render it: {got.refused or got.error}",
                        rt.name,
                        conv.name,
                    )
                )
                continue
            d = compare(want, got, bos_piece)
            if d is not None:
                diffs.append(d)
                findings.append(Finding(Severity.ERROR, "tokens", d.summary(), rt.name, conv.name))
    return renderings, references, diffs


def _closed(conversations: tuple[Conversation, ...]) -> Conversation:
    return next((c for c in conversations if c.ending is Ending.CLOSED), CONVERSATIONS[3])


def _probes(inputs: ContractInputs, end: stops.TurnEnd, findings: list[Finding]) -> list[generation.Probe]:
    srv = inputs.server
    if srv is None:
        findings.append(Finding(Severity.NOTE, "generation", "no served model: the served generation was not tried"))
        return []
    conv = inputs.conversations[0] if inputs.conversations[0].add_generation_prompt else CONVERSATIONS[0]
    out = []
    if end.token is not None:
        forced = generation.probe(srv.base_url, srv.model_id, conv, "forced", 4, end.token.id)
        out.append(forced)
        if not forced.stopped:
            findings.append(
                Finding(
                    Severity.ERROR,
                    "generation",
                    f"the served model did not stop on the end-of-turn token {end.token} (forced first): finish_reason "
                    f"{forced.finish_reason!r} after {forced.completion_tokens} tokens {forced.error or ''}".strip(),
                    "served",
                )
            )
    if inputs.natural_generation != "off":
        natural = generation.probe(srv.base_url, srv.model_id, conv, "natural", inputs.max_tokens)
        out.append(natural)
        if not natural.stopped:
            sev = Severity.ERROR if inputs.natural_generation == "require" else Severity.WARNING
            findings.append(
                Finding(
                    sev,
                    "generation",
                    f"the served model's answer to {conv.name} did not end on a stop token: finish_reason "
                    f"{natural.finish_reason!r} after {natural.completion_tokens} of {natural.max_tokens} tokens "
                    f"{natural.error or ''}".strip(),
                    "served",
                )
            )
    return out


def check(inputs: ContractInputs) -> ContractResult:
    """Run the whole contract on `inputs`; never raises for a mismatch (the result's verdict says FAIL)."""
    findings: list[Finding] = []
    vocab = load_vocab(inputs.gguf)
    detection = families.detect(vocab.chat_template, vocab.bos_text, vocab.eos_text)
    findings.append(
        Finding(Severity.NOTE, "family", f"chat template family: {detection.name or 'unknown'}; {detection.reason}")
    )
    runtimes, statuses = _build(inputs, vocab, findings)
    if not any(r.name in ("transformers", "llama.cpp") for r in runtimes):
        raise RuntimeUnavailable(
            "neither transformers nor the GGUF's chat template can be rendered: nothing to compare"
        )
    ref = runtimes[0]
    others = runtimes[1:]
    hf = next((r for r in runtimes if isinstance(r, HFRuntime)), None)
    if hf is not None and vocab.chat_template and hf.chat_template.strip() != vocab.chat_template.strip():
        findings.append(
            Finding(Severity.WARNING, "family", "the GGUF's embedded chat template differs from the tokenizer's")
        )
    renderings, references, diffs = _compare_all(inputs, ref, others, vocab, findings)
    end = stops.turn_end(ref, _closed(inputs.conversations), vocab.is_control)
    stop_sets = {r.name: r.stops() for r in runtimes}
    if inputs.server is not None:
        served = GgufRuntime(load_vocab(inputs.server.gguf)).stops()
        stop_sets["served"] = StopSet(served.token_ids, served.strings, f"llama-cpp-python server: {served.source}")
    findings += stops.agreement(end, stop_sets, hf_name="transformers")
    findings += stops.gguf_eos_agreement(vocab, stop_sets.get("transformers"))
    probes = _probes(inputs, end, findings)
    statuses = [RuntimeStatus(r.name, r.title, True, r.describe()) for r in runtimes] + statuses
    return ContractResult(
        verdict=verdict(findings),
        family=detection,
        reference=ref.name,
        runtimes=statuses,
        renderings=renderings,
        references=references,
        differences=diffs,
        turn_end=end,
        stop_sets=stop_sets,
        probes=probes,
        findings=findings,
        conversations=inputs.conversations,
        vocab=vocab,
    )
