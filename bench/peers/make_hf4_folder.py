"""Make a transformers-4.x-readable view of a transformers-5 model folder.

transformers 5 writes RoPE settings only as ``rope_parameters``; tools built on
transformers 4.x (optimum, the onnxruntime-genai builder) read ``rope_theta``
and silently fall back to 10000 when it is missing.  The tokenizer config names
``TokenizersBackend``, a class transformers 4.x lacks.  This writes a folder
whose weights are symlinks to the original and whose configs are patched.
Standard library only, so it runs with any interpreter.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

LINKED = ("model.safetensors", "tokenizer.json", "chat_template.jinja", "generation_config.json")


def make_hf4_folder(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for name in LINKED:
        if (src / name).exists() and not (dst / name).exists():
            (dst / name).symlink_to((src / name).resolve())

    config = json.loads((src / "config.json").read_text())
    rope = config.get("rope_parameters") or {}
    if "rope_theta" not in config:
        if rope.get("rope_type", "default") != "default":
            raise SystemExit(f"unsupported rope_parameters for a 4.x config: {rope}")
        config["rope_theta"] = float(rope["rope_theta"])
    config.pop("rope_parameters", None)
    config["rope_scaling"] = None
    config["torch_dtype"] = config.pop("dtype", "float32")
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    tok = json.loads((src / "tokenizer_config.json").read_text())
    if tok.get("tokenizer_class") == "TokenizersBackend":
        tok["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok.pop("backend", None)
    template = src / "chat_template.jinja"
    if template.exists() and "chat_template" not in tok:
        tok["chat_template"] = template.read_text()
    (dst / "tokenizer_config.json").write_text(json.dumps(tok, indent=2) + "\n")
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    args = ap.parse_args()
    print(make_hf4_folder(args.src, args.dst))


if __name__ == "__main__":
    main()
