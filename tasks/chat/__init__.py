"""The chat-template contract: one conversation, the same tokens in transformers, llama.cpp, Ollama, LM Studio.

conversations (the fixed set), families (the table of chat formats: detection by structure, Ollama
TEMPLATE, stops), jinja (transformers' renderer for bare templates), vocab (a GGUF's tokenizer via
llama.cpp), runtimes/ (one renderer per runtime), gorender/ (the Go program that renders Ollama
templates), compare, stops, generation, contract (the check), report, stage (the pipeline stage).
"""
