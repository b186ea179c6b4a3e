"""Stage 3, convert: merged HF folder -> {model}-F16.gguf with llama.cpp's converter.

Settings only for now: the stage's work lands with its own issue, and the flow skips a stage whose
module does not provide `run_stage` yet (it says so in the summary).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tasks.core.settings import SecretRef, StrictModel

STAGE = "convert"


class ConvertSettings(StrictModel):

    outtype: Literal["f16", "bf16", "f32", "q8_0"] = "f16"
    vocab_pre: str | None = Field(None, description="pre-tokenizer to use when llama.cpp does not recognise a BPE tokenizer (e.g. gpt-2)")
    llama_cpp_dir: str | None = Field(None, description="a llama.cpp checkout to take convert_hf_to_gguf.py from (else LLAMA_CPP_DIR, else the sdist of the installed llama-cpp-python)")
