"""Built-in environments, registered under ``rlbus.environments`` in pyproject.toml."""
