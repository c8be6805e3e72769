"""Inference: vLLM behind an OpenAI-compatible API, new weights pulled over the bus."""
