"""What this CPU computes in hardware. Calibration runs in bfloat16 where that is native, and only where a reading
does not need the fp32 model's exact states (the SAS layer choice, the answers' tokens, the refusal head's logits):
elsewhere bfloat16 is emulated and slower than float32."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=1)
def native_bfloat16() -> bool:
    """AMX or AVX512-BF16 (Linux's /proc/cpuinfo flags; False where they cannot be read)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return bool(flags & {"amx_bf16", "avx512_bf16"})


def compute_dtype(precision: str = "auto"):
    """`auto`: bfloat16 where native, else float32; or `float32` / `bfloat16` as named."""
    import torch

    if precision == "auto":
        return torch.bfloat16 if native_bfloat16() else torch.float32
    if precision not in ("float32", "bfloat16"):
        raise ValueError(f"precision must be auto, float32 or bfloat16, not {precision!r}")
    return getattr(torch, precision)


def cast_copy(model, dtype):
    """`model` itself at float32; otherwise a copy whose parameters are cast to `dtype` (ties kept, buffers such as
    rotary frequencies left at float32), so the fp32 model is never cast and back."""
    import copy

    import torch

    if dtype == torch.float32:
        return model
    # requires_grad as the original's: a bfloat16 lm_head weight that does not require grad made torch 2.13 expand
    # it per batch row in the first step's matmul (20 s for Gemma's 262k vocabulary at batch 32)
    memo = {id(p): torch.nn.Parameter(p.detach().to(dtype), requires_grad=p.requires_grad) for p in model.parameters()}
    return copy.deepcopy(model, memo)
