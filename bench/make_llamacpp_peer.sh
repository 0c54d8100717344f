#!/usr/bin/env bash
# The llama.cpp peer for bench/serve_load.py: llama-cpp-python's OpenAI-compatible server in a venv of its
# own (never a dependency of steerguard) and a Q4_1 GGUF of the demo model (SmolLM2-135M-Instruct).
#
#   bash bench/make_llamacpp_peer.sh [PEER_DIR]        # default ~/.cache/steerguard/llamacpp-peer
#
# Builds llama-cpp-python from source (no binary wheel for this machine; ~10 min on 2 cores) with the x86
# SIMD levels up to AVX-512 but without AMX: a -march=native build emits AMX tile instructions that this
# kind of VM advertises in /proc/cpuinfo but faults on (the server dies on its first request with a
# general protection fault in libggml-cpu).
#
# The GGUF: the demo model's weights come from a Q4_1 GGUF (`fetch_named_model('demo')` downloads it and
# dequantizes it into the HF folder our bundles are exported from), so that very file is the peer's model.
# Without it (or with GGUF=convert), the HF folder is converted with the llama.cpp converter vendored in
# the same sdist (run by the steerguard environment's python, which has torch; the converter's
# sentencepiece import goes to a --target folder) and quantized to Q4_1 with llama.cpp's own
# llama_model_quantize. Prints the --peer-cmd for serve_load.py. Nothing here lands in the repository.
set -euo pipefail

PEER_DIR=${1:-$HOME/.cache/steerguard/llamacpp-peer}
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
MODEL_DIR=$(python -c "from steerguard.export.models import fetch_named_model; print(fetch_named_model('demo', progress=False))")
SOURCE_GGUF=$(python -c "from steerguard.export.models import cache_dir; print(cache_dir() / 'downloads' / 'SmolLM2-135M-Instruct.Q4_1.gguf')")
mkdir -p "$PEER_DIR/gguf" "$PEER_DIR/sdist"

if [ ! -x "$PEER_DIR/venv/bin/python" ] || ! "$PEER_DIR/venv/bin/python" -c "import llama_cpp" 2>/dev/null; then
  python -m venv "$PEER_DIR/venv"
  "$PEER_DIR/venv/bin/pip" download --no-binary :all: --no-deps "llama-cpp-python==$VERSION" -d "$PEER_DIR/sdist"
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON \
-DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AVX_VNNI=ON \
-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" MAKEFLAGS=-j2 CMAKE_BUILD_PARALLEL_LEVEL=2 \
    "$PEER_DIR/venv/bin/pip" install "$PEER_DIR/sdist/llama_cpp_python-$VERSION.tar.gz[server]"
fi

SRC="$PEER_DIR/src/llama_cpp_python-$VERSION/vendor/llama.cpp"
if [ ! -f "$SRC/convert_hf_to_gguf.py" ]; then
  [ -f "$PEER_DIR/sdist/llama_cpp_python-$VERSION.tar.gz" ] || \
    "$PEER_DIR/venv/bin/pip" download --no-binary :all: --no-deps "llama-cpp-python==$VERSION" -d "$PEER_DIR/sdist"
  mkdir -p "$PEER_DIR/src"
  tar xzf "$PEER_DIR/sdist/llama_cpp_python-$VERSION.tar.gz" -C "$PEER_DIR/src"
fi

F32="$PEER_DIR/gguf/SmolLM2-135M-Instruct.f32.gguf"
Q41="$PEER_DIR/gguf/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ "${GGUF:-}" != convert ] && [ -f "$SOURCE_GGUF" ]; then
  Q41="$SOURCE_GGUF"
elif [ ! -f "$Q41" ]; then
  python -c "import sentencepiece" 2>/dev/null || python -m pip install -q --target "$PEER_DIR/convert_extra" sentencepiece
  PYTHONPATH="$SRC/gguf-py:$SRC:$PEER_DIR/convert_extra" python "$SRC/convert_hf_to_gguf.py" "$MODEL_DIR" \
    --outtype f32 --outfile "$F32"
  "$PEER_DIR/venv/bin/python" - "$F32" "$Q41" <<'EOF'
import sys

import llama_cpp

params = llama_cpp.llama_model_quantize_default_params()
params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1
params.nthread = 2
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), params))
EOF
  rm -f "$F32"
fi

echo "--peer-cmd 'llamacpp=$PEER_DIR/venv/bin/python -m llama_cpp.server --model $Q41 --n_threads 2 --n_threads_batch 2 --host 127.0.0.1 --port {port}'"
