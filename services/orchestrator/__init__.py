"""Orchestrator: schedules tasks, computes advantages, packs batches (CPU only, no torch)."""
