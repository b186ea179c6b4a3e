"""Stage 6, model card: README.md for the model repo, rendered from the run's artifacts.

Where the card comes from: the GGUF artifacts (file, quant type, size, sha256, bits per weight read
from the GGUF header), the adapter artifact's training metadata (adapter_config.json: LoRA r, alpha,
target modules; trainer_state.json: steps, final loss), and, when the evaluate stage ran, the
`report:eval` artifact (per-quant numbers, also written to the YAML `model-index`). Sections with no
data are left out.

The YAML header is built by huggingface_hub's `ModelCardData` (yaml.dump), never by the template, so
no user text (description, names) can break it; the rendered card is parsed back with `ModelCard` and
checked against the data we meant to write (`validate_card`). The body is templates/model_card.md.j2
(or a user template, `card.template`). We render with our own jinja2 Environment instead of
`ModelCard.from_template` because that one uses a bare `jinja2.Template` without trim_blocks, which
leaves blank lines inside Markdown tables; the variables a template gets are the same (`card_data` is
the YAML text, plus every metadata field).

Order in the pipeline: the card must be in the ONE commit that carries the GGUFs, so hub_push renders
it with `render_card` and puts it in that commit. This stage runs after the push: it re-renders the card
from everything known now (e.g. eval numbers when run again after the evaluate stage), writes it to
reports/README.md, validates it, and when a real push happened and the text changed it commits the
README alone (an unchanged card sends nothing).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field

from tasks.core.artifacts import Artifact
from tasks.core.atomic import atomic_write_text
from tasks.core.constants import TEMPLATES_DIR
from tasks.core.errors import PermanentError
from tasks.core.jsonfiles import read_json_dict
from tasks.core.settings import FILE_CONTENT, StrictModel
from tasks.core.stage import stage_task
from tasks.core.vocab import ArtifactKind, Stage
from tasks.gguf import quant_types
from tasks.publish.allowlist import is_hub_id
from tasks.publish.hub_io import HUB_ENDPOINT, repo_url, space_embed_url, update_readme

STAGE = Stage.CARD
log = logging.getLogger("loraship.card")

DEFAULT_TEMPLATE = TEMPLATES_DIR / "model_card.md.j2"


class CardSettings(StrictModel):
    template: Annotated[str | None, FILE_CONTENT] = Field(
        None, description="a user template path (jinja2) that overrides templates/model_card.md.j2"
    )
    license: str = Field(
        "apache-2.0", description="license id for the YAML header (e.g. apache-2.0, mit, llama3.1, other)"
    )
    language: list[str] = Field(default_factory=lambda: ["en"], description="ISO 639-1 codes for the YAML header")
    description: str = Field("", description="the card's opening paragraph; empty: model.description")
    tags: list[str] = Field(
        default_factory=list, description="extra tags (gguf, llama.cpp, lora and the quant types are always added)"
    )
    datasets: list[str] = Field(
        default_factory=list, description="training dataset ids for the YAML header and training section"
    )
    pipeline_tag: str = Field("text-generation", description="the Hub's pipeline tag")
    base_model_name: str = Field(
        "",
        description=(
            "how the card names a base model that has no Hub id (a local folder); empty: the folder's name. The "
            "card never shows a local path"
        ),
    )


# --- what the card says ---------------------------------------------------------------------------


def human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n} B"


def gguf_param_count(path: Path) -> int | None:
    """Number of weights in a GGUF file (from its tensor table), or None when it cannot be read."""
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        return int(sum(int(t.n_elements) for t in reader.tensors))
    except Exception as exc:  # a card without bits-per-weight is still a card
        log.debug("cannot read %s: %s", path, exc)
        return None


def training_rows(adapter: Artifact | None, base_model: str, datasets: list[str]) -> list[dict[str, str]]:
    """Training-details rows from the adapter's metadata files (only rows with data)."""
    rows: list[dict[str, str]] = []
    files = (adapter.meta.get("metadata_files") or {}) if adapter else {}
    cfg = read_json_dict(files.get("adapter_config.json"))
    state = read_json_dict(files.get("trainer_state.json"))
    results = read_json_dict(files.get("all_results.json")) or read_json_dict(files.get("train_results.json"))
    base = base_model or (cfg.get("base_model_name_or_path") if is_hub_id(cfg.get("base_model_name_or_path")) else "")
    if base:
        rows.append({"label": "base model", "value": f"`{base}`"})
    if cfg:
        if cfg.get("peft_type"):
            rows.append({"label": "method", "value": str(cfg["peft_type"])})
        if cfg.get("r") is not None:
            rows.append({"label": "LoRA r / alpha", "value": f"{cfg.get('r')} / {cfg.get('lora_alpha')}"})
        targets = cfg.get("target_modules")
        if targets:
            rows.append(
                {"label": "target modules", "value": ", ".join(f"`{t}`" for t in sorted(targets))}
                if isinstance(targets, list)
                else {"label": "target modules", "value": f"`{targets}`"}
            )
        if cfg.get("lora_dropout") is not None:
            rows.append({"label": "LoRA dropout", "value": str(cfg["lora_dropout"])})
    if state:
        if state.get("global_step") is not None:
            rows.append({"label": "steps", "value": str(state["global_step"])})
        if state.get("epoch") is not None:
            rows.append({"label": "epochs", "value": f"{float(state['epoch']):.2f}"})
        losses = [
            h["loss"]
            for h in state.get("log_history") or []
            if isinstance(h, dict) and isinstance(h.get("loss"), (int, float))
        ]
        if losses:
            rows.append({"label": "training loss (first → last)", "value": f"{losses[0]:.4f} → {losses[-1]:.4f}"})
        evals = [
            h["eval_loss"]
            for h in state.get("log_history") or []
            if isinstance(h, dict) and isinstance(h.get("eval_loss"), (int, float))
        ]
        if evals:
            rows.append({"label": "eval loss (last)", "value": f"{evals[-1]:.4f}"})
    if results.get("train_runtime") is not None:
        rows.append({"label": "training time", "value": f"{float(results['train_runtime']):.0f} s"})
    if datasets:
        rows.append({"label": "datasets", "value": ", ".join(datasets)})
    return rows


def _hub_id_of_folder(path: str) -> str:
    """The Hub id a local model folder came from (`_name_or_path` in its config.json), if it names one."""
    folder = Path(path).expanduser()
    name = read_json_dict(folder / "config.json").get("_name_or_path") if folder.is_dir() else None
    return str(name) if is_hub_id(name) and not Path(str(name)).exists() else ""


def base_model_names(base_model: str, adapter: Artifact | None, settings: CardSettings) -> tuple[str, str]:
    """(Hub id or "", the name the card shows). Never a local path: a local base folder is named by its Hub
    id when one is known (model.base_model, the adapter's base_model_name_or_path, the folder's config.json
    `_name_or_path`), else by `card.base_model_name`, else by the folder's name."""
    cfg = read_json_dict((adapter.meta.get("metadata_files") or {}).get("adapter_config.json")) if adapter else {}
    adapter_base = str(cfg.get("base_model_name_or_path") or "")
    local = [b for b in (base_model, adapter_base) if b and Path(b).expanduser().exists()]
    for candidate in (base_model, adapter_base):
        if is_hub_id(candidate) and not Path(candidate).expanduser().exists():
            return candidate, candidate
    for folder in local:
        hub_id = _hub_id_of_folder(folder)
        if hub_id:
            return hub_id, hub_id
    if settings.base_model_name:
        return "", settings.base_model_name
    shown = base_model or adapter_base
    return "", (Path(shown).name if shown and ("/" in shown or "\\" in shown) and not is_hub_id(shown) else shown)


def eval_by_quant(report: Artifact | None) -> dict[str, dict[str, Any]]:
    """Per-quant numbers from the eval report's meta (`quants`, `per_quant` or `results`: {quant: {metric: value}})."""
    if report is None:
        return {}
    for key in ("quants", "per_quant", "results"):
        value = report.meta.get(key)
        if isinstance(value, dict):
            return {
                str(q): {k: v for k, v in (m or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
                for q, m in value.items()
                if isinstance(m, dict)
            }
        if isinstance(value, list):
            out = {}
            for row in value:
                if isinstance(row, dict) and row.get("quant"):
                    out[str(row["quant"])] = {
                        k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                    }
            if out:
                return out
    return {}


_METRIC_LABELS = {
    "perplexity": "perplexity",
    "ppl": "perplexity",
    "ppl_delta": "Δ perplexity vs F16",
    "perplexity_delta": "Δ perplexity vs F16",
    "kl_divergence": "KL divergence vs F16",
    "kld": "KL divergence vs F16",
    "kl_div": "KL divergence vs F16",
    "kl_div_se": "± (standard error)",
    "kl_div_p99": "KL 99th percentile",
    "ppl_ratio": "PPL / PPL(F16)",
    "tokens_per_s": "tokens/s",
    "accuracy": "accuracy",
    "top1_agreement": "top-1 agreement",
    "tokens_per_second": "tokens/s",
    "wer": "word error rate",
    "cer": "character error rate",
}


def build_card(
    ggufs: list[Artifact],
    *,
    model_name: str,
    version: str,
    repo_id: str,
    settings: CardSettings,
    base_model: str = "",
    description: str = "",
    adapter: Artifact | None = None,
    eval_report: Artifact | None = None,
    extra_files: list[dict[str, str]] | None = None,
    endpoint: str = HUB_ENDPOINT,
    splits: list[Artifact] | None = None,
    template_contract: Artifact | None = None,
    kind: str = "gguf",
    repos: dict[str, str] | None = None,
    space: dict[str, str] | None = None,
) -> str:
    """The README.md text for the `kind` repo of the run (gguf, merged, adapter; rendered and validated).

    `repos` (kind -> repo id, every repo this run publishes) makes the cards link each other, and the GGUF
    card's `base_model` the merged repo when there is one (relation `quantized`: the GGUFs are quantized
    from it); the merged card is a `finetune` of the base, the adapter card an `adapter` of it. `space`
    (`space_view` of a deployed Space) adds the demo link and its embed snippet.

    `template_contract` (the `report:template-contract` artifact) adds the chat format, its stop token and
    what the contract checked to the usage section, with the Ollama Modelfile that gives the same tokens.

    A GGUF published as llama.cpp shards (`splits`, the quantize stage's `gguf-split` artifacts) is listed
    by its first shard inside its folder, which is what the repo holds and what llama.cpp loads."""
    from huggingface_hub import EvalResult, ModelCardData

    repos = dict(repos or {kind: repo_id})
    repos[kind] = repo_id

    metrics = eval_by_quant(eval_report)
    ref = str((eval_report.meta if eval_report is not None else {}).get("reference") or "F16")
    labels = {k: v.replace("F16", ref) for k, v in _METRIC_LABELS.items()}  # BF16/F32 when convert wrote that
    split_of = {str(a.meta.get("unsplit")): a for a in splits or []}
    base_url = repo_url(endpoint, repo_id)
    quants = []
    for a in sorted(ggufs, key=lambda a: quant_types.display_key(str(a.meta.get("quant", "")))):
        path = Path(a.path)
        quant = str(a.meta.get("quant") or path.stem.rsplit("-", 1)[-1])
        n_params = a.meta.get("n_params") or gguf_param_count(path)
        bpw = round(a.size * 8 / n_params, 2) if n_params else None
        m = {k: (f"{v:.4g}" if isinstance(v, float) else str(v)) for k, v in metrics.get(quant, {}).items()}
        row = {
            "file": path.name,
            "quant": quant,
            "size": a.size,
            "size_h": human_size(a.size),
            "bpw": bpw,
            "sha256": a.sha256,
            "url": f"{base_url}/blob/main/{path.name}",
            "metrics": m,
            "shards": 0,
        }
        split = split_of.get(path.name)
        if split is not None:
            folder = Path(split.path).name
            first = str(split.meta.get("first_shard"))
            digest = next((f.sha256 for f in split.files if f.path == first), split.sha256)
            row |= {
                "file": f"{folder}/{first}",
                "url": f"{base_url}/tree/main/{folder}",
                "sha256": digest,
                "shards": int(split.meta.get("split_count") or len(split.files)),
                "size": split.size,
                "size_h": human_size(split.size),
            }
        quants.append(row)
    metric_keys = sorted(
        {k for q in quants for k in q["metrics"]},
        key=lambda k: (list(_METRIC_LABELS).index(k) if k in _METRIC_LABELS else 99, k),
    )
    metric_columns = [{"key": k, "label": labels.get(k, k.replace("_", " "))} for k in metric_keys]

    hub_base, base_name = base_model_names(base_model, adapter, settings)
    eval_results = []
    reference = reference_metrics(metrics) if kind == "merged" else {}
    if kind == "gguf":
        tags = ["gguf", "llama.cpp", "lora", "loraship", *[q["quant"] for q in quants], *settings.tags]
        for q in quants:
            for k, v in metrics.get(q["quant"], {}).items():
                if k in ("perplexity", "ppl", "kl_divergence", "kld", "kl_div"):
                    eval_results.append(
                        EvalResult(
                            task_type=settings.pipeline_tag,
                            dataset_type="loraship-eval",
                            dataset_name="loraship eval prompts",
                            metric_type="perplexity" if k in ("perplexity", "ppl") else "kl_divergence",
                            metric_name=f"{labels[k]} ({q['quant']})",
                            metric_value=v,
                        )
                    )
    else:
        tags = ["lora", "loraship", *(["peft"] if kind == "adapter" else []), *settings.tags]
        for k, v in reference.items():
            eval_results.append(
                EvalResult(
                    task_type=settings.pipeline_tag,
                    dataset_type="loraship-eval",
                    dataset_name="loraship eval samples",
                    metric_type=_MODEL_INDEX_METRICS[k],
                    metric_name=_METRIC_LABELS.get(k, k),
                    metric_value=v,
                )
            )
    tags = list(dict.fromkeys(tags))
    base_ref, relation = card_base(kind, hub_base, repos)
    data = ModelCardData(
        base_model=base_ref or None,
        base_model_relation=relation if base_ref else None,
        library_name=REPO_LIBRARIES[kind],
        license=settings.license,
        language=settings.language or None,
        pipeline_tag=settings.pipeline_tag,
        tags=tags,
        datasets=settings.datasets or None,
        model_name=model_name,
        eval_results=eval_results or None,
    )
    recommended = None
    names = {q["quant"]: q for q in quants}
    pick = next((q for q in quant_types.recommended() if q in names), None)
    if pick is not None:
        recommended = {"file": names[pick]["file"], "why": quant_types.quant_types()[pick].advice}
    default_quant = quant_types.default_quant()
    example = (
        recommended["file"] if recommended else (quants[0]["file"] if quants else f"{model_name}-{default_quant}.gguf")
    )
    example_quant = next((q["quant"] for q in quants if q["file"] == example), default_quant)
    eval_note = ""
    if metrics:
        eval_note = (
            "Numbers from loraship's evaluate stage: each quantization against the F16 GGUF on the same prompts."
        )
    context = {
        "title": model_name,
        "model_name": model_name,
        "version": version,
        "repo_id": repo_id,
        "description": (description or "").strip(),
        "base_model": base_name,
        "base_model_link": f"[{hub_base}]({endpoint.rstrip('/')}/{hub_base})"
        if hub_base
        else (f"`{base_name}`" if base_name else ""),
        "quants": quants,
        "metric_columns": metric_columns,
        "recommended": recommended,
        "example_file": example,
        "example_quant": example_quant,
        "eval_note": eval_note,
        "training": training_rows(adapter, base_name, settings.datasets),
        "extra_files": extra_files or [],
        "chat": chat_usage(template_contract),
        "kind": kind,
        "related": related_repos(kind, repos, endpoint),
        "space": space,
        "evaluation": [{"label": _METRIC_LABELS.get(k, k), "value": f"{v:.4g}"} for k, v in reference.items()],
        "merged_link": f"[{repos['merged']}]({repo_url(endpoint, repos['merged'])})" if "merged" in repos else "",
        "base_hub_id": hub_base,
    }
    template_path = Path(settings.template).expanduser() if settings.template else DEFAULT_TEMPLATE
    if not template_path.is_file():
        raise PermanentError(
            f"card.template {template_path} does not exist",
            hint="point card.template at a jinja2 file, or remove it to use the built-in template",
        )
    text = render_template(template_path, data, context)
    validate_card(text, data)
    return text


REPO_LIBRARIES = {"gguf": "gguf", "merged": "transformers", "adapter": "peft"}
# Metrics of the merged model's own quality, as model-index metric types (not the GGUFs' distance to F16).
_MODEL_INDEX_METRICS = {
    "ppl": "perplexity", "perplexity": "perplexity", "accuracy": "accuracy", "wer": "wer", "cer": "cer",
}  # fmt: skip


def card_base(kind: str, hub_base: str, repos: dict[str, str]) -> tuple[str, str]:
    """(base_model, base_model_relation) of a card, as the Hub's model tree reads them: the GGUFs are
    quantized from the merged repo when the run publishes it (else from the base), the merged model is a
    finetune of the base, the adapter an adapter of it."""
    if kind == "gguf":
        return (repos.get("merged") or hub_base), "quantized"
    return hub_base, ("adapter" if kind == "adapter" else "finetune")


def reference_metrics(metrics: dict[str, dict[str, Any]]) -> dict[str, float]:
    """The merged model's own numbers from the eval report: its `merged` row, else the most precise float
    GGUF's row (F16 of the merged weights: the same model to within 16-bit rounding)."""
    row = metrics.get("merged")
    if row is None:
        floats = sorted((q for q in metrics if quant_types.is_float(q)), key=quant_types.precision_key)
        row = metrics[floats[0]] if floats else {}
    return {k: float(v) for k, v in row.items() if k in _MODEL_INDEX_METRICS}


REPO_TITLES = {
    "merged": "transformers (merged safetensors)",
    "gguf": "GGUF (llama.cpp, LM Studio, Ollama)",
    "adapter": "LoRA adapter (peft)",
}


def related_repos(kind: str, repos: dict[str, str], endpoint: str) -> list[dict[str, Any]]:
    """The run's repos for the card's cross links (this one marked), merged first as the Hub lists them."""
    if len(repos) < 2:
        return []
    order = [k for k in REPO_TITLES if k in repos] + [k for k in repos if k not in REPO_TITLES]
    return [
        {
            "title": REPO_TITLES.get(k, k),
            "repo_id": repos[k],
            "url": repo_url(endpoint, repos[k]),
            "this": k == kind,
        }
        for k in order
    ]


def space_view(space: Artifact | None) -> dict[str, str] | None:
    """The demo Space for the cards, once it is deployed (never for a dry run): `planned_space` of its id."""
    if space is None or space.meta.get("dry_run") or not space.meta.get("space_id"):
        return None
    url = str(space.meta.get("url") or "")
    endpoint = url.split("/spaces/")[0] if "/spaces/" in url else HUB_ENDPOINT
    return planned_space(str(space.meta["space_id"]), endpoint)


def planned_space(space_id: str, endpoint: str) -> dict[str, str]:
    """The card's view of a Space: its page and the address to embed (hub_io.space_embed_url). hub_push puts
    the Space the run is about to deploy in the cards of its one commit; the card stage, after the space stage,
    renders the same view from the deployed Space, so a normal run commits nothing more (and a failed deploy
    takes it out again)."""
    return {
        "space_id": space_id,
        "url": repo_url(endpoint, space_id, "space"),
        "embed_url": space_embed_url(space_id, endpoint),
    }


def chat_usage(report: Artifact | None) -> dict[str, Any] | None:
    """The usage section's chat-format lines from the template contract's record (no paths in it)."""
    view = (report.meta.get("card") if report is not None else None) or None
    if not view:
        return None
    return {
        "lines": list(view.get("lines") or []),
        "turn_end": view.get("turn_end"),
        "ollama_template": view.get("ollama_template"),
        "ollama_stops": list(view.get("ollama_stops") or []),
    }


def render_template(template_path: Path, data: Any, context: dict[str, Any]) -> str:
    import jinja2

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True, autoescape=False)
    try:
        template = env.from_string(template_path.read_text(encoding="utf-8"))
        variables = {**data.to_dict(), **context, "card_data": data.to_yaml()}
        text = template.render(**variables)
    except jinja2.TemplateError as exc:
        raise PermanentError(
            f"the card template {template_path} failed to render: {exc}",
            hint="fix the template (jinja2 syntax; variables: card_data, title, quants, training, ...)",
        ) from exc
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.rstrip() + "\n"


def validate_card(text: str, expected: Any | None = None) -> None:
    """The card parses as a model card and its YAML header says what we meant (local checks).

    The Hub's own validation (`/api/validate-yaml`) runs in hub_push before the commit.
    """
    from huggingface_hub import ModelCard

    if not text.startswith("---\n"):
        raise PermanentError(
            "the model card does not start with a YAML header ('---')",
            hint="a custom card template must begin with '---\\n{{ card_data }}\\n---'",
        )
    try:
        card = ModelCard(text)
    except Exception as exc:
        raise PermanentError(
            f"the model card's YAML header does not parse: {exc}",
            hint="a custom card template must put '{{ card_data }}' alone between the '---' lines",
        ) from exc
    got = card.data.to_dict()
    for key in ("library_name", "license"):
        if not got.get(key):
            raise PermanentError(
                f"the model card has no {key!r} in its YAML header",
                hint="use '{{ card_data }}' in the template's header",
            )
    if expected is not None:
        want = expected.to_dict()
        for key in ("base_model", "base_model_relation", "library_name", "license", "tags", "language", "pipeline_tag"):
            if want.get(key) != got.get(key):
                raise PermanentError(
                    f"the model card's YAML header has {key}={got.get(key)!r}, expected {want.get(key)!r}",
                    hint="the header must come from '{{ card_data }}' only; put text in the body",
                )
        if want.get("eval_results") and not got.get("eval_results"):
            raise PermanentError(
                "the model card lost its model-index (eval results)", hint="keep '{{ card_data }}' in the header"
            )
    if got.get("library_name") == "gguf" and "gguf" not in (got.get("tags") or []):
        raise PermanentError("the model card has no 'gguf' tag", hint="keep the tags from '{{ card_data }}'")


# --- the stage ------------------------------------------------------------------------------------


def card(
    ggufs: list[Artifact],
    settings: CardSettings,
    out_path: Path,
    *,
    model_name: str,
    version: str,
    repo_id: str,
    base_model: str = "",
    description: str = "",
    adapter: Artifact | None = None,
    eval_report: Artifact | None = None,
    pushed: Artifact | list[Artifact] | None = None,
    endpoint: str | None = None,
    token: Any = None,
    splits: list[Artifact] | None = None,
    template_contract: Artifact | None = None,
    repos: dict[str, str] | None = None,
    space: Artifact | None = None,
) -> Artifact:
    """Render the card of every repo of the run; when `pushed` (the real push records, one per repo) is
    given, commit each card that differs from the README its repo has now.

    Which cards: the pushed repos, else `repos` (kind -> repo id), else the GGUF repo `repo_id`. The
    primary repo's card (the GGUF repo's when published) goes to `out_path`, the others beside it as
    README-<kind>.md. `space` (the `publish:space` record) adds the demo and its embed snippet once the
    Space is deployed."""
    records = [pushed] if isinstance(pushed, Artifact) else list(pushed or [])
    pushed_repos = {str(a.meta.get("repo_kind") or "gguf"): a.meta for a in records}
    kinds = {k: str(r["repo_id"]) for k, r in pushed_repos.items()} or dict(repos or {"gguf": repo_id})
    if records and "repos" in records[0].meta:  # every repo of the run, for the links
        kinds = {**records[0].meta["repos"], **kinds}
    if "gguf" in kinds and not ggufs:
        raise PermanentError(
            "the card stage needs GGUF artifacts for the gguf repo's card and none were made",
            hint="enable the convert/quantize stages, run with --from card after a run that made them, "
            "or leave gguf out of hub.repos",
        )
    primary = "gguf" if "gguf" in kinds else next(iter(kinds))
    view = space_view(space)
    cards: dict[str, dict[str, Any]] = {}
    for kind, rid in kinds.items():
        text = build_card(
            ggufs if kind == "gguf" else [],
            model_name=model_name,
            version=version,
            repo_id=rid,
            settings=settings,
            base_model=base_model,
            description=description or settings.description,
            adapter=adapter,
            eval_report=eval_report,
            extra_files=(pushed_repos.get(kind) or {}).get("extra_files"),
            endpoint=(endpoint or HUB_ENDPOINT),
            splits=splits if kind == "gguf" else None,
            template_contract=template_contract if kind == "gguf" else None,
            kind=kind,
            repos=kinds,
            space=view,
        )
        path = out_path if kind == primary else out_path.with_name(f"{out_path.stem}-{kind}{out_path.suffix}")
        atomic_write_text(path, text)
        cards[kind] = {"repo_id": rid, "path": str(path)}
        rec = pushed_repos.get(kind)
        if rec is not None and not rec.get("dry_run") and token is not None:
            cards[kind]["commit"] = update_readme(
                rid,
                path,
                endpoint=rec.get("endpoint") or endpoint,
                token=token.get_secret_value(),
            )  # compared with the README the repo has now, not with what the push record says it sent
    meta: dict[str, Any] = {
        "repo_id": kinds[primary],
        "has_eval": eval_report is not None,
        "quants": sorted(str(a.meta.get("quant")) for a in ggufs),
        "cards": cards,
        "space": view,
    }
    if "commit" in cards[primary]:
        meta["commit"] = cards[primary]["commit"]
    inputs = [*ggufs, *records, *(x for x in (adapter, eval_report, template_contract, space) if x is not None)]
    return Artifact.from_path(
        out_path,
        name="card",
        kind=ArtifactKind.REPORT,
        stage=STAGE,
        inputs=inputs,
        settings=settings,
        tools=["huggingface_hub", "jinja2"],
        meta=meta,
    )


@stage_task(STAGE, key_files=[DEFAULT_TEMPLATE])
def card_task(
    ggufs: list[Artifact],
    settings: CardSettings,
    out_path: Path,
    model_name: str,
    version: str,
    repo_id: str,
    base_model: str = "",
    description: str = "",
    adapter: Artifact | None = None,
    eval_report: Artifact | None = None,
    pushed: Artifact | None = None,
    endpoint: str | None = None,
    _token: Any = None,
    splits: list[Artifact] | None = None,
    template_contract: Artifact | None = None,
    repos: dict[str, str] | None = None,
    space: Artifact | None = None,
) -> Artifact:
    return card(
        ggufs,
        settings,
        out_path,
        model_name=model_name,
        version=version,
        repo_id=repo_id,
        base_model=base_model,
        description=description,
        adapter=adapter,
        eval_report=eval_report,
        pushed=pushed,
        endpoint=endpoint,
        token=_token,
        splits=splits,
        template_contract=template_contract,
        repos=repos,
        space=space,
    )
