"""The lean runtime: numpy, onnxruntime, tokenizers and jinja2 only — never torch or transformers.

`GuardedModel.load(bundle)` verifies a bundle and runs its engine chain: prefill through `pre`
(which also returns the prober's risk), the guard's decision, then decoding through the plain head
or, when the guard fired, the refusal head."""

from .batching import ContinuousBatcher
from .model import GenerationResult, GuardedModel
from .sampling import Sampling

__all__ = ["GuardedModel", "GenerationResult", "Sampling", "ContinuousBatcher"]
