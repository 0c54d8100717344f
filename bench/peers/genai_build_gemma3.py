"""onnxruntime-genai's model builder on a transformers-5 Gemma 3 folder, with one shim.

The builder as shipped (onnxruntime-genai 0.18.0, the `genai` venv's transformers 5.24.0) refuses Gemma 3:

    File ".../onnxruntime_genai/models/builders/base.py", line 670, in make_rope_init
        if config.rope_parameters["rope_type"] == "yarn":
    KeyError: 'rope_type'

transformers 5 keeps Gemma 3's rotary settings per layer type (`rope_parameters = {"full_attention": {...},
"sliding_attention": {...}}`); the builder's Gemma3Model still reads transformers 4's `rope_theta` (global
layers) and `rope_local_base_freq` (sliding layers), and its base class a flat `rope_parameters`. (Its
Gemma4Model reads the per-layer-type form; Gemma3Model was not moved over.) This script gives the builder the
transformers-4 view of the same values and changes nothing else: after `AutoConfig.from_pretrained`, a
per-layer-type `rope_parameters` whose types are both `default` becomes `rope_theta` = the full-attention
theta, `rope_local_base_freq` = the sliding theta and a flat `{"rope_type": "default", "rope_theta": ...}`.
Anything else (a scaled rotary) is refused. Then the builder runs as `python -m
onnxruntime_genai.models.builder` with the same arguments:

    ~/.cache/steerguard/peers/genai/bin/python bench/peers/genai_build_gemma3.py -i HF_FOLDER -o OUT -p int4 -e cpu
"""

from __future__ import annotations

import runpy
import sys

from transformers import AutoConfig

_from_pretrained = AutoConfig.from_pretrained.__func__


def _transformers4_rope(cls, *args, **kwargs):
    config = _from_pretrained(cls, *args, **kwargs)
    rope = getattr(config, "rope_parameters", None)
    if getattr(config, "model_type", "") == "gemma3_text" and isinstance(rope, dict) and "rope_type" not in rope:
        full, local = rope.get("full_attention", {}), rope.get("sliding_attention", {})
        if {full.get("rope_type"), local.get("rope_type")} != {"default"}:
            raise SystemExit(f"genai_build_gemma3: only default rotary per layer type is mapped, not {rope}")
        config.rope_theta = full["rope_theta"]
        config.rope_local_base_freq = local["rope_theta"]
        config.rope_parameters = {"rope_type": "default", "rope_theta": full["rope_theta"]}
        print(f"genai_build_gemma3: rope_theta {config.rope_theta}, rope_local_base_freq "
              f"{config.rope_local_base_freq} (from rope_parameters per layer type)", flush=True)
    return config


AutoConfig.from_pretrained = classmethod(_transformers4_rope)

if __name__ == "__main__":
    sys.argv[0] = "onnxruntime_genai.models.builder"
    runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__", alter_sys=True)
