"""rlbus services: one package per process, plus shared model tools."""
