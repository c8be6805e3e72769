"""Monitor: gathers metrics, events and heartbeats; JSONL, console, W&B, live view."""
