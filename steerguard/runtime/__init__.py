"""The lean runtime: numpy, onnxruntime, tokenizers only — never torch or transformers.

Today it holds what the guard needs at run time without a model: the refusal judge and the
numpy prober. The ONNX engine chain lands here next (see DESIGN.md, "Engine chain").
"""
