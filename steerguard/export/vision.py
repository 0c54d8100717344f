"""The `vision` engine of a multimodal bundle and what the runtime needs to feed it.

The vision tower and projector are exported with torch's ONNX exporter (they run once per image, so a
generic graph is fine; the decoder, which runs once per token, is written by hand in onnx_graph). The
packing of a tower's outputs into prompt embeddings (LLaVA-OneVision's tile grid, unpadding and
newline vectors) happens in numpy at run time, from the preprocessing the manifest records."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import onnx

from ..errors import SteerguardError
from .arch import VISION_FAMILIES, VisionFamily


def vision_family(model) -> VisionFamily | None:
    return VISION_FAMILIES.get(model.config.model_type)


class _LlavaOnevisionTower:
    """pixel_values (tiles, 3, H, W) -> (image_features (tiles, patches, d), image_newline (d,))."""

    @staticmethod
    def module(model):
        import torch

        class Tower(torch.nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m.model
                cfg = m.config
                self.layer, self.strategy = cfg.vision_feature_layer, cfg.vision_feature_select_strategy
                if not isinstance(self.layer, int):
                    raise SteerguardError("vision_feature_layer lists several layers; one layer is supported")

            def forward(self, pixel_values):
                states = self.m.vision_tower(pixel_values, output_hidden_states=True).hidden_states[self.layer]
                if self.strategy == "default":
                    states = states[:, 1:]
                return self.m.multi_modal_projector(states), self.m.image_newline * 1.0

        return Tower(model)

    @staticmethod
    def example(model):
        import torch

        size = model.config.vision_config.image_size
        return torch.zeros(2, 3, size, size)

    inputs, outputs = ["pixel_values"], ["image_features", "image_newline"]


class _Qwen2VLTower:
    """pixel_values (patches, C*T*p*p) + patch_positions (patches, 2) -> image_features (patches / m^2, d).
    One image per call, so every patch attends to every other (the model's per-image attention); the
    (h, w) positions of the patches come from the runtime, which knows the image's grid."""

    @staticmethod
    def module(model):
        import torch
        from torch.nn import functional as F
        from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

        class Tower(torch.nn.Module):
            def __init__(self, m):
                super().__init__()
                self.visual = m.model.visual

            def forward(self, pixel_values, patch_positions):
                v = self.visual
                h = v.patch_embed(pixel_values)
                cos, sin = v.rotary_pos_emb(h, patch_positions)
                n = h.shape[0]
                for blk in v.blocks:
                    a = blk.attn
                    q, k, val = a.qkv(blk.norm1(h)).reshape(n, 3, a.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
                    q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
                    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                                         val.transpose(0, 1)[None], scale=a.scaling)
                    h = h + a.proj(out[0].transpose(0, 1).reshape(n, -1))
                    h = h + blk.mlp(blk.norm2(h))
                return v.merger(h)

        return Tower(model)

    @staticmethod
    def example(model):
        import torch

        vc = model.config.vision_config
        m = vc.spatial_merge_size
        n = 4 * m * m
        return (torch.zeros(n, vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2),
                torch.zeros(n, 2, dtype=torch.long))

    inputs, outputs = ["pixel_values", "patch_positions"], ["image_features"]


class _ChameleonTokenizer:
    """pixel_values (1, 3, H, W) -> image_token_ids (1, n): the VQ encoder's codebook indices mapped to the
    text vocabulary's image tokens, which the embedding engine then embeds like any other token."""

    @staticmethod
    def module(model):
        import torch

        class Tokenizer(torch.nn.Module):
            def __init__(self, m):
                super().__init__()
                self.vq = m.model.vqmodel
                self.register_buffer("to_vocab", m.model.vocabulary_mapping.img2bpe_mapping_tensor.clone())

            def forward(self, pixel_values):
                codes = self.vq.encode(pixel_values, return_dict=True).image_tokens
                return self.to_vocab[codes].reshape(pixel_values.shape[0], -1)

        return Tokenizer(model)

    @staticmethod
    def example(model):
        import torch

        res = model.config.vq_config.resolution
        return torch.zeros(1, 3, res, res)

    inputs, outputs = ["pixel_values"], ["image_token_ids"]


TOWERS = {"llava_onevision": _LlavaOnevisionTower, "qwen2_vl": _Qwen2VLTower, "chameleon": _ChameleonTokenizer}


def vision_engine(model) -> onnx.ModelProto:
    """The model's vision tower and projector as one ONNX graph, the number of images/tiles dynamic."""
    import torch

    family = vision_family(model)
    tower = TOWERS[family.kind]
    module = tower.module(model).eval()
    example = tower.example(model)
    example = example if isinstance(example, tuple) else (example,)
    quiet = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "torch.export")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.ERROR)
    rows = torch.export.Dim("rows", min=1, max=1 << 16)   # tiles or patches, per image
    try:
        with torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
            program = torch.onnx.export(
                module, example, None, input_names=tower.inputs, output_names=tower.outputs, opset_version=23,
                dynamic_shapes={name: {0: rows} for name in tower.inputs}, dynamo=True, verbose=False)
            path = Path(tmp) / "vision.onnx"
            program.save(str(path))
            return onnx.load(str(path))
    except SteerguardError:
        raise
    except Exception as e:
        raise SteerguardError(f"the vision tower of {model.config.model_type} could not be exported to ONNX "
                              f"({str(e).splitlines()[0][:200]})") from e
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)


def vision_manifest(model, processor) -> dict:
    """The manifest's `vision` entry: the family, the placeholder token and the image preprocessing."""
    from importlib import import_module

    family = vision_family(model)
    if processor is None:
        raise SteerguardError(f"{model.config.model_type} takes images, but no image processor was loaded with "
                              "it; export from a model folder that has preprocessor_config.json")
    images = import_module(f"steerguard.runtime.images.{family.kind}")
    token_id = getattr(model.config, family.image_token_id)
    extra = {}
    if family.kind == "chameleon":   # each image's tokens sit between a start and an end sentinel
        from steerguard.runtime.images.chameleon import image_prompt_tokens

        start, _, end = image_prompt_tokens(images.processor_config(processor, model.config))
        extra = {"image_start_token_id": int(processor.tokenizer.convert_tokens_to_ids(start)),
                 "image_end_token_id": int(processor.tokenizer.convert_tokens_to_ids(end))}
    if family.kind == "qwen2_vl":
        extra = {"vision_start_token_id": int(model.config.vision_start_token_id),
                 "spatial_merge_size": int(model.config.vision_config.spatial_merge_size)}
    return {"kind": family.kind, "engine": "vision", "image_token_id": int(token_id),
            "max_images": family.max_images, **extra,
            "image_token": processor.tokenizer.convert_ids_to_tokens(int(token_id)),
            "preprocess": images.processor_config(processor if family.kind == "chameleon" else processor.image_processor,
                                                  model.config)}
