"""Stage local_deploy: LM Studio and Ollama targets."""
