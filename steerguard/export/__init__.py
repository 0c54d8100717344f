"""Calibration and export (needs the `export` extra: torch, transformers, gguf, ...)."""
