"""What a LoRA merge will do to each base tensor, worked out and checked before any heavy work.

Reads the adapter (adapter_config.json + its weights, small enough to hold) and the base's safetensors
headers (never its data), and maps every adapter tensor onto the base tensor it changes:
`lora_A/lora_B` pairs on linear weights (with `fan_in_fan_out`), `lora_embedding_A/B` on embeddings,
DoRA magnitude vectors, `lora_bias`, and whole tensors the adapter carries (modules_to_save, saved
embedding layers) that replace the base's. Scaling is `lora_alpha / r` or, with rsLoRA,
`lora_alpha / sqrt(r)`, honouring `alpha_pattern`; `r` is read from the tensors themselves.

Every mismatch is reported before the merge starts: a target module the base does not have, or a
shape that does not fit, names the adapter tensor, the base tensor and both shapes. Also here: the disk
preflight. (QLoRA, the 4-bit base an adapter trained on, is tasks/merge/qlora.py.)

Tied embeddings: when the base ties lm_head to its input embedding and the adapter changes either of them
(a LoRA on lm_head or on the embedding, or a saved copy of one), a merge into the one shared tensor would
change both, while PeftModel(base, adapter) changes only one (peft's own merge_and_unload has this flaw and
warns about it). The plan unties instead: `lm_head.weight` becomes a tensor of its own (the embedding's
values + the lm_head update, `plan.added`), the embedding gets only its own update, and the merged config
says `tie_word_embeddings: false`, so the merged model equals PeftModel at every position.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.core.errors import PermanentError
from tasks.core.jsonfiles import read_json  # also imported from here by the merge paths
from tasks.merge.safetensors_io import DTYPES, FLOAT_DTYPES, TensorInfo, read_header

log = logging.getLogger("loraship.merge")

PREFIX = "base_model.model."
HEAD = "lm_head.weight"
WEIGHTS_INDEX = "model.safetensors.index.json"
_LORA = re.compile(r"^(?P<mod>.+)\.lora_(?P<ab>A|B)(?:\.(?P<adapter>[^.]+))?\.(?P<param>weight|bias)$")
_LORA_EMB = re.compile(r"^(?P<mod>.+)\.lora_embedding_(?P<ab>A|B)(?:\.(?P<adapter>[^.]+))?$")
_MAGNITUDE = re.compile(r"^(?P<mod>.+)\.lora_magnitude_vector(?:\.(?P<adapter>[^.]+))?(?:\.weight)?$")
_SAVED_COPY = re.compile(r"\.(?:modules_to_save\.[^.]+|base_layer|original_module)(?=\.)")


@dataclass
class LoraOp:
    """One low-rank update of a base tensor: W += scaling * B @ A (transposed as the layer needs)."""

    module: str
    kind: str  # "linear" | "embedding"
    A: Any
    B: Any
    scaling: float
    fan_in_fan_out: bool = False
    magnitude: Any = None  # DoRA
    bias: Any = None  # lora_B bias (lora_bias=True), added to the module's bias

    @property
    def r(self) -> int:
        return int(self.A.shape[0])


@dataclass
class MergePlan:
    base_tensors: dict[str, TensorInfo]
    shards: list[Path]
    indexed: bool
    ops: dict[str, list[LoraOp]] = field(default_factory=dict)  # base tensor name -> updates
    replace: dict[str, Any] = field(default_factory=dict)  # base tensor name -> tensor from the adapter
    bias_adds: dict[str, list[LoraOp]] = field(default_factory=dict)  # base bias name -> updates
    tied_to: str | None = None  # lm_head is tied to this embedding tensor (absent from the files)
    added: dict[str, TensorInfo] = field(default_factory=dict)  # new tensor -> the base bytes it starts from
    dora: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def changed(self) -> set[str]:
        return set(self.ops) | set(self.replace) | set(self.bias_adds) | set(self.added)

    @property
    def untied(self) -> bool:
        """lm_head was tied and the merge writes it as a tensor of its own."""
        return HEAD in self.added

    def output_tensors(self) -> dict[str, TensorInfo]:
        """Every tensor the merged files hold, with the base bytes each starts from."""
        return {**self.base_tensors, **self.added}

    def base_bytes(self) -> int:
        return sum(t.nbytes for t in self.base_tensors.values())


def out_dtype_of(src_dtype: str, target: str | None) -> str:
    """The safetensors dtype a base tensor is written in: `target` for float tensors, else its own."""
    return target if (target and src_dtype in FLOAT_DTYPES) else src_dtype


def output_bytes(plan: MergePlan, target: str | None) -> int:
    """Bytes of the merged weights: the base's tensors in their output dtypes."""
    return sum(t.numel * DTYPES[out_dtype_of(t.dtype, target)][1] for t in plan.output_tensors().values())


# --- reading the inputs -------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeaderTensor:
    """An adapter tensor known from its safetensors header only: what the plan's shape checks read.

    The fused merge stage (merge.fused_convert) plans and checks in the flow's process and leaves the arithmetic
    to the converter's process, which reads the values itself; holding the values here would import torch into
    the flow's process (about 2 s of a 10 s fused merge + convert, and its memory) for nothing."""

    shape: tuple[int, ...]
    dtype: str

    def dim(self) -> int:
        return len(self.shape)


def load_adapter(adapter_dir: Path, values: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """(adapter_config, tensors by key) of a peft LoRA adapter folder; `values=False`: `HeaderTensor`s from a
    safetensors adapter's header (a .bin adapter is read whole either way)."""
    cfg = read_json(adapter_dir / "adapter_config.json")
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise PermanentError(
            f"{adapter_dir}/adapter_config.json: peft_type {peft_type} is not a LoRA adapter",
            hint="only LoRA (and DoRA, rsLoRA) adapters can be merged; use peft directly for other methods",
        )
    st = adapter_dir / "adapter_model.safetensors"
    if st.exists():
        header = read_header(st)  # a truncated adapter fails with the file's name
        if not values:
            return cfg, {name: HeaderTensor(info.shape, info.dtype) for name, info in header.tensors.items()}
        from safetensors.torch import load_file

        return cfg, load_file(str(st))
    binf = adapter_dir / "adapter_model.bin"
    if binf.exists():
        import torch

        return cfg, torch.load(binf, map_location="cpu", weights_only=True)
    raise PermanentError(
        f"{adapter_dir} has no adapter_model.safetensors",
        hint="point source at the folder peft's save_pretrained wrote",
    )


def base_shards(base_dir: Path) -> tuple[list[Path], bool]:
    """The base model's safetensors files (from the index when there is one) and whether it is indexed."""
    index = base_dir / WEIGHTS_INDEX
    if index.exists():
        weight_map = read_json(index).get("weight_map", {})
        files = sorted({base_dir / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise PermanentError(
                f"{base_dir}: {WEIGHTS_INDEX} names shards that are missing: {', '.join(missing[:5])}",
                hint="download the base model completely",
            )
        return files, True
    if (base_dir / "model.safetensors").exists():
        return [base_dir / "model.safetensors"], False
    any_st = sorted(base_dir.glob("*.safetensors"))
    if any_st:
        return any_st, len(any_st) > 1
    if list(base_dir.glob("*.bin")) or list(base_dir.glob("*.pt")):
        raise PermanentError(
            f"{base_dir} has PyTorch .bin weights, not safetensors",
            hint="the streaming backend reads safetensors; set merge.backend: peft for this base",
        )
    raise PermanentError(
        f"{base_dir} holds no model weights (*.safetensors)",
        hint="point merge.base_model (or model.base_model) at the base model's folder or Hub id",
    )


def read_base_headers(shards: list[Path]) -> dict[str, TensorInfo]:
    tensors: dict[str, TensorInfo] = {}
    for shard in shards:
        for name, info in read_header(shard).tensors.items():
            if name in tensors:
                raise PermanentError(
                    f"tensor {name!r} is in both {tensors[name].file.name} and {shard.name}",
                    hint="the base model's files are inconsistent: download it again",
                )
            tensors[name] = info
    return tensors


# --- mapping the adapter onto the base -------------------------------------------------------------------


def _pattern_value(patterns: dict[str, Any], module: str) -> Any:
    """peft's rank/alpha pattern lookup: a key matches a module name or a dotted suffix of it."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return None


def scaling_for(cfg: dict[str, Any], module: str, r: int) -> float:
    alpha = _pattern_value(cfg.get("alpha_pattern") or {}, module)
    alpha = float(alpha if alpha is not None else cfg.get("lora_alpha", 8))
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def _find_base(name: str, base: dict[str, TensorInfo]) -> str | None:
    if name in base:
        return name
    for alt in (name.removeprefix("model."), f"model.{name}"):
        if alt in base:
            return alt
    return None


def _unknown(adapter_key: str, want: str, base: dict[str, TensorInfo]) -> PermanentError:
    close = difflib.get_close_matches(want, list(base), n=2, cutoff=0.5)
    near = f"; closest base tensors: {', '.join(close)}" if close else ""
    return PermanentError(
        f"adapter tensor {adapter_key!r} targets {want!r}, which the base model does not have{near}",
        hint=(
            "the adapter was trained on a different architecture: check merge.base_model (or model.base_model) "
            "against the adapter's base_model_name_or_path"
        ),
    )


def _shape_error(adapter_key: str, a_shape: Any, base_name: str, b_shape: Any, why: str) -> PermanentError:
    return PermanentError(
        (
            f"shape mismatch: adapter tensor {adapter_key!r} has shape {list(a_shape)} but base tensor "
            f"{base_name!r} has shape {list(b_shape)} ({why})"
        ),
        hint=(
            "the adapter was trained on a different model size or vocabulary: check merge.base_model against the "
            "adapter's base_model_name_or_path"
        ),
    )


def input_embedding(base: dict[str, TensorInfo]) -> str | None:
    for suffix in ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "tok_embeddings.weight"):
        hits = [n for n in base if n.endswith(suffix)]
        if hits:
            return sorted(hits, key=len)[0]
    return None


def build_plan(
    base_dir: Path, base_config: dict[str, Any], adapter_cfg: dict[str, Any], adapter: dict[str, Any]
) -> MergePlan:
    """Map every adapter tensor onto the base; raise a PermanentError naming the first mismatch."""
    shards, indexed = base_shards(base_dir)
    base = read_base_headers(shards)
    plan = MergePlan(base_tensors=base, shards=shards, indexed=indexed)
    tied = "lm_head.weight" not in base and bool(base_config.get("tie_word_embeddings", True))
    if tied:
        plan.tied_to = input_embedding(base)

    def resolve(key: str, module_weight: str) -> str:
        if tied and plan.tied_to and module_weight == HEAD:
            _untie(plan, key)
            return HEAD
        found = _find_base(module_weight, base)
        if found is None:
            raise _unknown(key, module_weight, base)
        return found

    pairs, magnitudes = _sort_adapter_tensors(adapter, plan, resolve)
    for (module, kind), slot in sorted(pairs.items()):
        name, op = _lora_op(plan, adapter_cfg, module, kind, slot, magnitudes, resolve)
        plan.ops.setdefault(name, []).append(op)
    if magnitudes:
        raise PermanentError(
            f"adapter has DoRA magnitudes without lora_A/lora_B for: {', '.join(sorted(magnitudes)[:3])}",
            hint="the adapter file is incomplete: copy it again",
        )
    if plan.dora and any(len(v) > 1 for v in plan.ops.values()):
        raise PermanentError("DoRA updates of a tied tensor cannot be merged", hint="merge with merge.backend: peft")
    if tied and plan.tied_to and not plan.untied and (plan.tied_to in plan.ops or plan.tied_to in plan.replace):
        _untie(plan, f"the update of {plan.tied_to}")  # the input embedding changes, the output head must not
    _check_targets(adapter_cfg, base, plan)
    return plan


Resolve = Callable[[str, str], str]  # (adapter key, module weight name) -> the base tensor it updates


def _sort_adapter_tensors(
    adapter: dict[str, Any], plan: MergePlan, resolve: Resolve
) -> tuple[dict[tuple[str, str], dict[str, Any]], dict[str, Any]]:
    """The adapter's tensors by role: LoRA A/B pairs by (module, linear|embedding), DoRA magnitudes by module;
    saved whole modules (modules_to_save) go straight into `plan.replace` after a shape check."""
    pairs: dict[tuple[str, str], dict[str, Any]] = {}
    magnitudes: dict[str, Any] = {}
    for key, tensor in adapter.items():
        short = key.removeprefix(PREFIX)
        if m := _LORA.match(short):
            slot = pairs.setdefault((m["mod"], "linear"), {"keys": {}})
            slot[m["ab"] + ("_bias" if m["param"] == "bias" else "")] = tensor
            slot["keys"][m["ab"]] = key
        elif m := _LORA_EMB.match(short):
            slot = pairs.setdefault((m["mod"], "embedding"), {"keys": {}})
            slot[m["ab"]] = tensor
            slot["keys"][m["ab"]] = key
        elif m := _MAGNITUDE.match(short):
            magnitudes[m["mod"]] = tensor
        elif "trainable_tokens" in short or "token_adapter" in short:
            raise PermanentError(
                f"adapter tensor {key!r}: trainable-token adapters are not supported by the merge stage",
                hint="merge with peft directly, or train without trainable_token_indices",
            )
        else:
            target = _SAVED_COPY.sub("", short)
            name = resolve(key, target)
            info = plan.output_tensors()[name]
            if tuple(tensor.shape) != info.shape:
                raise _shape_error(
                    key,
                    tensor.shape,
                    name,
                    info.shape,
                    "a saved module must have the base's shape; a resized vocabulary is not supported",
                )
            plan.replace[name] = tensor
    return pairs, magnitudes


def _lora_op(
    plan: MergePlan,
    adapter_cfg: dict[str, Any],
    module: str,
    kind: str,
    slot: dict[str, Any],
    magnitudes: dict[str, Any],
    resolve: Resolve,
) -> tuple[str, LoraOp]:
    """(base tensor name, the checked update) of one module's LoRA pair, with its DoRA magnitude (taken out of
    `magnitudes`) and lora_bias (recorded in `plan.bias_adds`)."""
    keys = slot["keys"]
    if "A" not in slot or "B" not in slot:
        have = ", ".join(keys.values())
        raise PermanentError(
            f"adapter for {module!r} has only {have}: lora_A and lora_B come in pairs",
            hint="the adapter file is incomplete: copy it again",
        )
    A, B = slot["A"], slot["B"]
    name = resolve(keys["A"], f"{module}.weight")
    info = plan.output_tensors()[name]
    fifo = bool(adapter_cfg.get("fan_in_fan_out"))
    r = _checked_rank(keys, kind, A, B, name, info, fifo)
    expected_r = _pattern_value(adapter_cfg.get("rank_pattern") or {}, module) or adapter_cfg.get("r")
    if expected_r and int(expected_r) != r:
        log.warning(
            "adapter %s: tensors have rank %d, adapter_config says %s; using the tensors' rank",
            module,
            r,
            expected_r,
        )
    op = LoraOp(
        module=module,
        kind=kind,
        A=A,
        B=B,
        scaling=scaling_for(adapter_cfg, module, r),
        fan_in_fan_out=fifo and kind == "linear",
    )
    if module in magnitudes:
        op.magnitude = _dora_magnitude(magnitudes.pop(module), module, kind, B, name, info)
        plan.dora = True
    if "B_bias" in slot:
        bias_name = _find_base(f"{module}.bias", plan.base_tensors)
        if bias_name is None:
            raise PermanentError(
                (
                    f"adapter tensor {keys['B'].replace('.weight', '.bias')!r} (lora_bias) needs a bias in "
                    f"the base, and {module} has none"
                ),
                hint="the adapter was trained on a different base model",
            )
        op.bias = slot["B_bias"]
        plan.bias_adds.setdefault(bias_name, []).append(op)
    return name, op


def _checked_rank(keys: dict[str, str], kind: str, A: Any, B: Any, name: str, info: TensorInfo, fifo: bool) -> int:
    """The pair's rank, once A and B fit the base tensor `name` (a linear weight or an embedding)."""
    r = A.shape[0]
    if kind == "linear":
        if A.dim() != 2 or B.dim() != 2:
            raise PermanentError(
                (
                    f"adapter tensor {keys['A']!r} is {A.dim()}-D: only linear and embedding LoRA layers can "
                    "be merged (not convolutions)"
                ),
                hint="merge with peft directly",
            )
        if len(info.shape) != 2:
            raise _shape_error(keys["A"], A.shape, name, info.shape, "LoRA applies to 2-D weights")
        out_f, in_f = (info.shape[1], info.shape[0]) if fifo else (info.shape[0], info.shape[1])
        if A.shape[1] != in_f:
            raise _shape_error(
                keys["A"],
                A.shape,
                name,
                info.shape,
                f"lora_A must be [r, in_features={in_f}]" + (" with fan_in_fan_out" if fifo else ""),
            )
        if B.shape != (out_f, r):
            raise _shape_error(keys["B"], B.shape, name, info.shape, f"lora_B must be [out_features={out_f}, r={r}]")
    elif len(info.shape) != 2 or A.shape[1] != info.shape[0] or B.shape != (info.shape[1], r):
        raise _shape_error(
            keys["A"],
            A.shape,
            name,
            info.shape,
            (
                f"lora_embedding_A must be [r, {info.shape[0]}] and lora_embedding_B "
                f"[{info.shape[1] if len(info.shape) > 1 else '?'}, r]"
            ),
        )
    return r


def _dora_magnitude(mag: Any, module: str, kind: str, B: Any, name: str, info: TensorInfo) -> Any:
    """A DoRA magnitude vector, checked: linear layers only, one value per output feature."""
    if kind != "linear":
        raise PermanentError(
            f"adapter tensor {module}.lora_magnitude_vector: DoRA on embeddings is not supported by the merge stage",
            hint="merge this adapter with merge.backend: peft",
        )
    if mag.shape != (B.shape[0],):
        raise _shape_error(
            f"{PREFIX}{module}.lora_magnitude_vector",
            mag.shape,
            name,
            info.shape,
            "the DoRA magnitude has one value per output feature",
        )
    return mag


def _untie(plan: MergePlan, why: str) -> None:
    """Give lm_head a tensor of its own, starting from the shared embedding's bytes (see the module docstring)."""
    if plan.untied or plan.tied_to is None:
        return
    src = plan.base_tensors[plan.tied_to]
    plan.added[HEAD] = dataclasses.replace(src, name=HEAD)
    plan.notes.append(
        f"{why}: lm_head is tied to {plan.tied_to}; the merged model unties them (lm_head.weight written as its own "
        "tensor, tie_word_embeddings: false) so that it equals PeftModel(base, adapter) at every position"
    )


def _check_targets(cfg: dict[str, Any], base: dict[str, TensorInfo], plan: MergePlan) -> None:
    """Every module name in target_modules must exist in the base (a typo'd target trains nothing)."""
    targets = cfg.get("target_modules")
    if not plan.ops and not plan.replace:
        raise PermanentError(
            "the adapter holds no LoRA tensors that apply to this base",
            hint="check that source points at the adapter folder the training saved",
        )
    if not isinstance(targets, list):
        return  # a regex string or "all-linear": peft resolved it at training time
    modules = {n.rsplit(".", 1)[0] for n in base} | {n.rsplit(".", 2)[0] for n in base}
    for t in targets:
        if not any(m == t or m.endswith("." + t) for m in modules) and not (t == "lm_head" and plan.tied_to):
            raise PermanentError(
                f"adapter_config.json target_modules names {t!r}, which the base model does not have",
                hint="the adapter was trained on a different architecture: check merge.base_model",
            )


# --- the adapter's base vs the configured base -------------------------------------------------------------


def _model_key(ref: str) -> str:
    """A comparable name for a Hub id or a local folder (a Hub cache snapshot resolves to its repo id)."""
    ref = ref.strip().rstrip("/")
    m = re.search(r"models--([^/]+)--([^/]+)/snapshots/", ref)
    if m:
        return f"{m[1]}/{m[2]}".lower()
    return ref.lower()


def same_base(adapter_base: str, configured: str, resolved: Path) -> bool:
    if not adapter_base:
        return True
    a, c = _model_key(adapter_base), _model_key(configured)
    if a == c or a == _model_key(str(resolved)):
        return True
    try:
        if Path(adapter_base).exists() and Path(adapter_base).resolve() == resolved.resolve():
            return True
    except OSError:
        pass
    # a Hub id against a local folder of the same name: 'org/Model' vs '/models/Model'
    return a.split("/")[-1] == c.split("/")[-1] == resolved.name.lower()


# --- a quantized base ------------------------------------------------------------------------------------


def base_is_quantized(base_config: dict[str, Any]) -> str | None:
    q = base_config.get("quantization_config")
    if not q:
        return None
    return str(q.get("quant_method") or ("bitsandbytes 4-bit" if q.get("load_in_4bit") else "quantized"))
