"""The package version: its one source (pyproject.toml reads it; exported models and model cards record it)."""
__version__ = "0.1.0"
