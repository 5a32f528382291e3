"""The version of regrad-hf (`project.version` in pyproject.toml; a test keeps the two equal), importable without
the rest of the package: `regrad --version` reads it."""

__version__ = "0.1.0"
