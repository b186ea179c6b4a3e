"""Stages convert and quantize: llama.cpp toolchain, GGUF conversion, the quantize plan, split, validation."""
