"""steerguard: AutoSteer (arXiv 2507.13255) made deployable.

`steerguard.export` (needs the `export` extra: torch, transformers) calibrates a guard for a
Hugging Face model; `steerguard.runtime` and `steerguard.engines` run it without torch.
"""

__version__ = "0.2.0"
