"""Local models that need no hub: a tiny random Qwen3 and SmolLM2 converted from its packaged GGUF."""
