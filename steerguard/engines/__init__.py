"""Inference backends behind one small interface (onnxruntime CPU / CUDA / TensorRT).

Lean like `steerguard.runtime`: never imports torch or transformers.
"""
