"""Serve engines (a registry): how the serve stage serves a run's model. `serving.engine` names one.

- `llama_cpp` (default): GGUF quants on llama-cpp-python's OpenAI-compatible server.
- `transformers`: merged/ behind the model API (tasks/model_api/).
"""

from __future__ import annotations

from tasks.core.registry import Contract, Registry
from tasks.serve.engines.base import ServeEngine
from tasks.serve.engines.llama_cpp import LlamaCppEngine
from tasks.serve.engines.transformers import TransformersEngine

SERVE_ENGINES: Registry[ServeEngine] = Registry(
    "serve engine",
    "serving.engine",
    [LlamaCppEngine(), TransformersEngine()],
    # an engine says what is missing when it starts (no llama_cpp server extra, no torch)
    contract=Contract(ServeEngine, run="start", unavailable=lambda engine: None),
)

__all__ = ["SERVE_ENGINES", "ServeEngine"]
