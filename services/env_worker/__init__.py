"""Env-worker: runs environments against the inference API and scores rollouts."""
