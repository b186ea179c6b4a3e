"""Stage serve: OpenAI-compatible servers for GGUFs (engines)."""
