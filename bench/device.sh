#!/usr/bin/env bash
# One device run on a lent NVIDIA GPU (H100/H200): build the bundles, check CUDA against the CPU,
# build TensorRT plans, time everything, print one table. Logs under ${OUT:-out/device}.
# Needs on the device: torch, transformers (export), onnxruntime-gpu with CUDA + TensorRT providers,
# tensorrt and cuda-python (see docs/GPU.md for carrying wheels). Not yet run: no GPU has been lent.
set -euo pipefail
OUT=${OUT:-out/device}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
GUARD=${GUARD:-runs/final-guard}
B=$OUT/bundles
log() { echo "== $*" | tee -a "$OUT/device.log"; }

log "environment"
nvidia-smi --query-gpu=name,compute_cap,memory.total --format=csv | tee -a "$OUT/device.log"
python -c "import onnxruntime as o; print(o.__version__, o.get_available_providers())" | tee -a "$OUT/device.log"

log "export fp32 (CPU reference) and fp16 (GPU) bundles"
steerguard export demo --guard "$GUARD" -o "$B/fp32" >>"$OUT/device.log" 2>&1
steerguard export demo --guard "$GUARD" --precision fp16 -o "$B/fp16" >>"$OUT/device.log" 2>&1
steerguard export demo --unguarded --precision fp16 -o "$B/fp16-unsplit" >>"$OUT/device.log" 2>&1

log "correctness: fp16 on CUDA vs fp32 on CPU, 50 prompts"
python bench/gpu_parity.py --cpu "$B/fp32" --gpu "$B/fp16" --n 50 --json "$OUT/parity.json" | tee -a "$OUT/device.log"

log "TensorRT plans"
steerguard build-trt "$B/fp16" >>"$OUT/device.log" 2>&1 || log "build-trt failed (see log)"

log "speed"
for spec in "cuda $B/fp16" "cuda $B/fp16-unsplit" "tensorrt $B/fp16" "tensorrt $B/fp16-unsplit"; do
  set -- $spec
  steerguard bench "$2" --backend "$1" --runs 5 --json >"$OUT/bench_$1_$(basename "$2").json" 2>>"$OUT/device.log" \
    || echo '{"error": "failed"}' >"$OUT/bench_$1_$(basename "$2").json"
done
python bench/peers/hf_peer.py --ids-file "$HOME/.cache/steerguard/bench/bench_ids.json" --runs 5 --device cuda \
  >"$OUT/bench_transformers_cuda.json" 2>>"$OUT/device.log" || echo '{"error": "failed"}' >"$OUT/bench_transformers_cuda.json"

log "table"
python - "$OUT" <<'PY' | tee "$OUT/table.md"
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
print("| runner | decode tok/s | first token ms |\n|---|---|---|")
for f in sorted(out.glob("bench_*.json")):
    text = f.read_text().strip().splitlines()
    r = json.loads(text[-1]) if text else {"error": "empty"}
    print(f"| {f.stem[6:]} | {r.get('decode_tok_s', r.get('error'))} | {r.get('ttft_ms', '')} |")
p = json.loads((out / "parity.json").read_text())
print(f"\nfp16 CUDA vs fp32 CPU: greedy identical {p['identical']:.0%}, decisions agree {p['decisions_agree']:.0%}")
PY
