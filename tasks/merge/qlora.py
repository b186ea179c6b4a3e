"""QLoRA: the 4-bit base an adapter was trained on, read from its records and reproduced exactly.

A QLoRA adapter learned its update against dequantize(quantize_4bit(W)), not against W. Merging it into
the 16-bit W gives a model that differs from the one that was trained by the 4-bit rounding error; merging
it into the round-tripped W gives the trained model (in 16 bits). Which 4-bit format matters: NF4 and FP4
have different code books, the block size sets how many weights share one absmax, and double quantization
stores the absmaxes themselves in 8 bits (blocks of 256, after subtracting their mean), which moves every
weight of a block a little.

The format comes from what the training recorded, in this order: the adapter folder's training metadata
(`training_args.json`, `train_config.json`, `config.json`, `trainer_state.json`: `bnb_4bit_quant_type`,
`bnb_4bit_use_double_quant`, `load_in_4bit`, a block size), then the `quantization_config` of the base the
adapter names (its config.json, when that folder or its Hub cache entry is on this machine). A base name
alone (`...-bnb-4bit`) is only a hint: it is reported, and the 16-bit weights are kept unless the user says
`merge.qlora: roundtrip`.

The arithmetic is bitsandbytes' (0.50, `functional.quantize_4bit`/`dequantize_4bit` and their CPU kernels),
written here in torch so that a merge needs no bitsandbytes (its native library does not load everywhere):
per block, absmax in float32, x * (1/absmax) clamped to [-1, 1], the nearest code-book value (ties to the
lower one), and with double quantization the absmaxes minus their mean quantized block-wise (256) with the
signed 8-bit dynamic map. tests/test_qlora.py compares it with bitsandbytes itself.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tasks.core.jsonfiles import read_json_or

log = logging.getLogger("loraship.merge")

QuantType = Literal["nf4", "fp4"]
BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)

#: The NF4 code book (QLoRA paper; bitsandbytes `get_4bit_type("nf4")`), sorted.
NF4 = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
#: bitsandbytes' FP4 (1 sign, 2 exponent bits with bias 2, 1 mantissa bit): 0, 0.0625, 2, 3, 4, 6, 8, 12 and
#: their negatives, divided by 12 (the largest), so the code book spans [-1, 1].
FP4 = tuple(sorted(s * v / 12.0 for v in (0.0, 0.0625, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0) for s in (1.0, -1.0)))  # +-0
CODE_BOOKS: dict[str, tuple[float, ...]] = {"nf4": NF4, "fp4": FP4}


class QLoraFormat(BaseModel):
    """How a base's linear weights were stored in 4 bits while the adapter trained (bitsandbytes' options)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    quant_type: QuantType = Field("nf4", description="bnb_4bit_quant_type: nf4 or fp4")
    blocksize: int = Field(64, description="weights per absmax block (bitsandbytes' default 64)")
    double_quant: bool = Field(
        False, description="bnb_4bit_use_double_quant: the absmaxes stored in 8 bits (blocks of 256)"
    )

    def model_post_init(self, _: Any) -> None:
        if self.blocksize not in BLOCK_SIZES:
            raise ValueError(f"blocksize {self.blocksize} is not one of bitsandbytes' {BLOCK_SIZES}")

    def describe(self) -> str:
        return f"{self.quant_type.upper()}, block {self.blocksize}" + (", double quant" if self.double_quant else "")

    @property
    def tag(self) -> str:
        """Short name for the artifact's meta: `nf4-b64-dq`."""
        return f"{self.quant_type}-b{self.blocksize}" + ("-dq" if self.double_quant else "")


@dataclass(frozen=True)
class QLoraDetection:
    """What the adapter's records say about a 4-bit base."""

    reason: str  # for the log: where the evidence was found
    source: Literal["metadata", "base_config", "name"]
    format: QLoraFormat | None  # None: the name suggests 4 bits, nothing says which format


# --- detection -------------------------------------------------------------------------------------------

_QLORA_NAME = re.compile(r"(bnb[-_]?4bit|[-_]4bit|nf4)", re.I)
METADATA_FILES = ("training_args.json", "train_config.json", "config.json", "trainer_state.json")
_BLOCK_KEYS = ("bnb_4bit_blocksize", "bnb_4bit_block_size", "blocksize", "block_size")


def _find_keys(obj: Any, found: dict[str, Any], depth: int = 0) -> None:
    """Collect the bitsandbytes keys anywhere in a JSON document (trainers nest them: model_init_kwargs ...)."""
    if depth > 6:
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(k, str) and (k.startswith(("bnb_4bit_", "load_in_4bit", "quant_method")) or k in _BLOCK_KEYS):
                found.setdefault(k, v)
            _find_keys(v, found, depth + 1)
    elif isinstance(obj, list):
        for v in obj[:1000]:
            _find_keys(v, found, depth + 1)


def format_from_keys(keys: dict[str, Any]) -> QLoraFormat | None:
    """A format when the keys say 4-bit bitsandbytes (load_in_4bit or a 4-bit quant type); else None."""
    qtype = str(keys.get("bnb_4bit_quant_type") or "").lower()
    four_bit = keys.get("load_in_4bit") is True or qtype in ("nf4", "fp4")
    if not four_bit or (keys.get("quant_method") not in (None, "bitsandbytes")):
        return None
    block = next((keys[k] for k in _BLOCK_KEYS if isinstance(keys.get(k), int)), 64)
    # transformers' BitsAndBytesConfig defaults: quant type fp4, no double quantization
    return QLoraFormat(
        quant_type=qtype if qtype in ("nf4", "fp4") else "fp4",
        blocksize=block,
        double_quant=bool(keys.get("bnb_4bit_use_double_quant", False)),
    )


def _base_config_of(name: str) -> tuple[Any, str] | None:
    """The config.json of the base the adapter names, from this machine only (a folder, or the Hub cache)."""
    if not name:
        return None
    p = Path(name).expanduser()
    if (p / "config.json").is_file():
        return read_json_or(p / "config.json"), str(p / "config.json")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        try:
            from huggingface_hub import hf_hub_download

            f = hf_hub_download(name, "config.json", local_files_only=True)
            return read_json_or(Path(f)), f"{name}/config.json (Hugging Face cache)"
        except Exception:  # not cached: nothing to read without the network
            return None
    return None


def detect(adapter_dir: Path, adapter_cfg: dict[str, Any]) -> QLoraDetection | None:
    """Why we think the adapter was trained on a 4-bit base, and in which format (None: no sign of it)."""
    for meta in METADATA_FILES:
        keys: dict[str, Any] = {}
        _find_keys(read_json_or(adapter_dir / meta), keys)
        fmt = format_from_keys(keys)
        if fmt is not None:
            return QLoraDetection(f"{meta} records a 4-bit bitsandbytes base ({fmt.describe()})", "metadata", fmt)
    name = str(adapter_cfg.get("base_model_name_or_path") or "")
    found = _base_config_of(name)
    if found is not None:
        cfg, where = found
        keys = {}
        _find_keys((cfg or {}).get("quantization_config") if isinstance(cfg, dict) else None, keys)
        fmt = format_from_keys(keys)
        if fmt is not None:
            return QLoraDetection(f"the quantization_config of {where} ({fmt.describe()})", "base_config", fmt)
    if _QLORA_NAME.search(name):
        return QLoraDetection(f"the adapter's base_model_name_or_path {name!r} looks like a 4-bit model", "name", None)
    return None


def applies(name: str, shape: tuple[int, ...]) -> bool:
    """bitsandbytes quantizes the linear layers, not embeddings, norms or the output head."""
    return len(shape) == 2 and not any(s in name for s in ("embed", "lm_head", "wte", "wpe", "norm", "output.weight"))


# --- the arithmetic ----------------------------------------------------------------------------------------


@cache
def dynamic_map() -> tuple[float, ...]:
    """bitsandbytes' signed 8-bit dynamic code (`create_dynamic_map(signed=True)`), sorted: 256 values."""
    import torch

    data: list[float] = []
    max_exp, non_sign = 7, 7
    for i in range(max_exp):
        n = int(2 ** (i + non_sign - max_exp) + 1)
        edges = torch.linspace(0.1, 1, n, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        scale = 10 ** (-(max_exp - 1) + i)
        data += (scale * means).tolist() + (-scale * means).tolist()  # float32 products, as bitsandbytes
    data += [0.0, 1.0]
    data += [0.0] * (256 - len(data))
    return tuple(torch.tensor(sorted(data), dtype=torch.float32).tolist())


def _quantize_blocks(flat: Any, code: Any, blocksize: int) -> tuple[Any, Any]:
    """(indices into the sorted code, float32 absmax per block) as bitsandbytes' blockwise kernels compute them."""
    import torch

    n = flat.numel()
    nblocks = -(-n // blocksize)
    padded = torch.nn.functional.pad(flat, (0, nblocks * blocksize - n)).view(nblocks, blocksize)
    # the last, partial block's absmax covers only its real values (zero padding cannot raise it)
    absmax = padded.abs().amax(dim=1)
    scaled = torch.clamp(padded * (1.0 / absmax.clamp(min=1e-38)).view(-1, 1), -1, 1)
    bounds = (code[:-1] + code[1:]) / 2
    idx = torch.bucketize(scaled, bounds)  # x == bound goes to the lower value, as bitsandbytes' trees do
    return idx, absmax


def _dequantize_blocks(idx: Any, absmax: Any, code: Any, n: int) -> Any:
    return (code[idx] * absmax.view(-1, 1)).reshape(-1)[:n]


def roundtrip(w: Any, fmt: QLoraFormat) -> Any:
    """dequantize(quantize_4bit(W)) in float32: the weights a QLoRA adapter saw while it trained."""
    import torch

    flat = w.reshape(-1).float()
    code = torch.tensor(CODE_BOOKS[fmt.quant_type], dtype=torch.float32)
    idx, absmax = _quantize_blocks(flat, code, fmt.blocksize)
    if fmt.double_quant:
        offset = absmax.mean()
        dyn = torch.tensor(dynamic_map(), dtype=torch.float32)
        centred = absmax - offset
        qidx, absmax2 = _quantize_blocks(centred, dyn, 256)
        absmax = _dequantize_blocks(qidx, absmax2, dyn, centred.numel()) + offset
    return _dequantize_blocks(idx, absmax, code, flat.numel()).view(w.shape)


def decide(setting: str, override: QLoraFormat | None, found: QLoraDetection | None) -> QLoraFormat | None:
    """The format to round-trip the base through, or None to merge into the 16-bit weights.

    `merge.qlora`: `original` never round-trips; `roundtrip` always does (with `merge.qlora_format`, else the
    recorded format, else NF4/64 with a warning); `auto` round-trips when the training records say which format
    was used, and only warns when nothing but the base's name suggests 4 bits.
    """
    if setting == "original":
        return None
    fmt = override or (found.format if found else None)
    if setting == "roundtrip":
        if fmt is None:
            log.warning(
                "merge.qlora: roundtrip, but nothing records the 4-bit format: assuming NF4, block 64, no double "
                "quantization (set merge.qlora_format to say which)"
            )
            fmt = QLoraFormat()
        return fmt
    if found is None:
        return None
    if found.format is None and override is None:
        log.warning(
            "%s, but no training record says it was trained in 4 bits: merging into the 16-bit weights. If it was "
            "a QLoRA run, set merge.qlora: roundtrip (and merge.qlora_format) to merge into the weights it trained on",
            found.reason,
        )
        return None
    return fmt
