import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_tokenizer(texts):
    """A word-level tokenizer with a ChatML template, trained on `texts` (no hub, no files)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts + ["system user assistant"], trainers.WordLevelTrainer(special_tokens=specials))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   eos_token="<|im_end|>", bos_token="<|im_start|>")
    fast.chat_template = CHATML
    return fast


def tiny_model(arch: str, vocab_size: int, seed: int = 0):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=True)
    cfg = LlamaConfig(**common) if arch == "llama" else Qwen2Config(**common)
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.fixture(scope="session")
def demo_model():
    """The real demo model (fetched once into the cache)."""
    import torch

    from steerguard.export.models import load_model

    torch.set_num_threads(2)
    return load_model("demo")


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class TinyExport:
    """A tiny random model, a guard calibrated on it, and its bundles (int8 and fp32 prober)."""

    def __init__(self, arch: str, root: Path):
        from steerguard.export.bundle import export_bundle
        from steerguard.export.calibrate import CalibrationConfig, CalibrationData, calibrate
        from steerguard.export.data import default_pairs
        from steerguard.export.models import LoadedModel

        pairs = [p for p in default_pairs() if p.source.startswith("contrast")][:40]
        tok = tiny_tokenizer([t for p in pairs for t in (p.harmful, p.benign, p.refusal)])
        self.lm = LoadedModel(model=tiny_model(arch, len(tok)), tokenizer=tok, source=f"tiny-{arch}",
                              name=f"tiny-{arch}", sha256=f"{arch}-sha")
        cfg = CalibrationConfig(refusal_targets=16, refusal_epochs=2, max_per_source=40)
        self.guard = calibrate(self.lm, CalibrationData(pairs=pairs), cfg, progress=False)
        self.bundle = export_bundle(self.lm, self.guard, root / "int8", progress=False)
        self.bundle_fp32 = export_bundle(self.lm, self.guard, root / "fp32", prober_precision="fp32", progress=False)
        self.plain = export_bundle(self.lm, None, root / "plain", progress=False)


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def tiny_export(request, tmp_path_factory):
    return TinyExport(request.param, tmp_path_factory.mktemp(f"tiny-{request.param}"))
