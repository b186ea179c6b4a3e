"""Builders of tiny real models, tokenizers and adapters for tests, the demo and benchmarks (not stage code)."""
