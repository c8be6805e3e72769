"""The ``rl`` launcher: one merged config, every service as a local process."""
