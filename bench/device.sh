#!/usr/bin/env bash
# The GPU run (issue 18), in one command on the lent H200, under 8 minutes:
#   export   the demo bundles from the carried GGUF: fp32 and fp16 guarded, both unguarded (unsplit), fp16-kv16
#   parity   fp32 and fp16 on CUDA against the fp32 bundle on the CPU: greedy tokens on 100 prompts of the
#            shipped eval sets (one request at a time and batched), risk difference, decisions; fire rates
#   speed    decode tok/s and time to first token at batch 1, 8, 64, fp32 and fp16, guarded vs unguarded
#   peer     transformers + PyTorch eager on the same GPU, same prompt and token counts
#   placement which execution provider ran each node (and the copies onnxruntime inserted)
#   kv16     fp16 with an fp16 KV cache: parity and speed, if time is left
#   hostkv   fp32 with its KV cache in host memory (STEERGUARD_KV=host), if time is left
#   report   $OUT/gpu.json and $OUT/gpu.md (the done-when checks first); everything logged to $OUT/device.log
# Each stage has a time limit and the whole run a budget; a stage that fails or runs out of time is
# recorded and the next one runs. The report always runs.
#
#   bash bench/device.sh             # on the device, after bench/device_unpack.sh and `source /tmp/sg/env.sh`
#   bash bench/device.sh --dry-run   # here: CPU backend with onnxruntime-allocated buffers, tiny sizes
#
# Variables (defaults for the device; the dry run's in brackets): OUT (out/device [out/device-dryrun]),
# WORK (/tmp/sg/work [/tmp/sg-dryrun]), MODEL (demo, read from STEERGUARD_CACHE=/tmp/sg/cache, where
# bench/device_carry.py puts the GGUF [demo from ~/.cache/steerguard]; or a .gguf path), GUARD (/tmp/sg/guard
# [runs/serve-demo/guard]; SG_GUARD from /tmp/sg/env.sh first), BUDGET seconds (450 [1200]), PYTHON (python3),
# REUSE=1 keeps the bundles already in WORK.
set -uo pipefail

DRY=${DRY_RUN:-0}
[[ "${1:-}" == "--dry-run" ]] && DRY=1
if [[ $DRY == 1 ]]; then
  OUT=${OUT:-out/device-dryrun}; WORK=${WORK:-/tmp/sg-dryrun}; GUARD=${GUARD:-runs/serve-demo/guard}
  BACKEND=cpu; MEMORY=device; PEER_DEVICE=cpu; BUDGET=${BUDGET:-1200}
  N=6; NEW=8; FIRE=8; BATCHES=1,2,4; SPEED_NEW=16; RUNS=1; PARITY_BATCH=3
  export STEERGUARD_FP16_ON_CPU=1       # fp16 on onnxruntime's CPU kernels, for the dry run only
else
  OUT=${OUT:-out/device}; WORK=${WORK:-/tmp/sg/work}; GUARD=${GUARD:-${SG_GUARD:-/tmp/sg/guard}}
  export STEERGUARD_CACHE=${STEERGUARD_CACHE:-/tmp/sg/cache}
  BACKEND=cuda; MEMORY=device; PEER_DEVICE=cuda; BUDGET=${BUDGET:-450}
  N=100; NEW=48; FIRE=0; BATCHES=1,8,64; SPEED_NEW=128; RUNS=3; PARITY_BATCH=25
fi
MODEL=${MODEL:-demo}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
B=$WORK/bundles
mkdir -p "$OUT" "$WORK"
LOG=$OUT/device.log
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1
[[ ${REUSE:-0} == 1 ]] || rm -rf "$B" "$WORK"/*.json "$WORK/stages.jsonl"
mkdir -p "$B"
: >"$WORK/stages.jsonl"

log() { echo "== $(date +%H:%M:%S) [${SECONDS}s] $*"; }
record() {  # stage rc seconds note (rc a number, or '"skipped"')
  printf '{"stage": "%s", "rc": %s, "seconds": %s, "note": "%s"}\n' "$1" "$2" "$3" "$4" >>"$WORK/stages.jsonl"
}
# stage NAME MAX_SECONDS COMMAND...: run it under min(MAX, what the budget leaves); its Python side gets
# DEADLINE (10 s less) to stop early and still write its JSON
stage() {
  local name=$1 max=$2; shift 2
  local left=$((BUDGET - SECONDS - 20))
  ((left < max)) && max=$left
  if ((max < 15)); then
    log "$name: skipped, the budget is spent"; record "$name" '"skipped"' 0 "the budget was spent"; return
  fi
  log "$name (up to ${max}s)"
  local t0=$SECONDS
  DEADLINE=$((max - 10)) timeout --kill-after=10 "$max" "$@"
  local rc=$?
  record "$name" "$rc" $((SECONDS - t0)) ""
  log "$name: exit $rc after $((SECONDS - t0))s"
}
have() { [[ -f "$B/$1/manifest.json" ]]; }

log "device script: dry run $DRY, backend $BACKEND, model $MODEL, guard $GUARD, budget ${BUDGET}s, out $OUT"
stage env 60 $PY bench/gpu_report.py env "$WORK/env.json"

if [[ ${REUSE:-0} == 1 ]] && have fp32 && have fp16 && have fp32-plain && have fp16-plain; then
  log "export: reusing the bundles in $B"; record export 0 0 "reused"
else
  stage export $([[ $DRY == 1 ]] && echo 900 || echo 240) $PY bench/gpu_export.py --guard "$GUARD" --out "$B" \
    --model "$MODEL" --variants fp32,fp16,fp32-plain,fp16-plain,fp16-kv16 --json "$WORK/export.json"
fi

if have fp32; then
  bundles=(--bundle "fp32=$B/fp32")
  have fp16 && bundles+=(--bundle "fp16=$B/fp16")
  stage parity 180 sh -c "$PY bench/gpu_parity.py --reference $B/fp32 ${bundles[*]} --backend $BACKEND \
    --memory $MEMORY --n $N --new-tokens $NEW --batch $PARITY_BATCH --fire-per-set $FIRE \
    --deadline \$DEADLINE --json $WORK/parity.json"
else
  record parity '"skipped"' 0 "no fp32 bundle"
fi

pairs=()
for p in fp16 fp32; do have $p && have $p-plain && pairs+=(--pair "$p=$B/$p,$B/$p-plain"); done   # fp16 first: the GPU's precision
if ((${#pairs[@]})); then
  stage speed 240 sh -c "$PY bench/gpu_speed.py runtime ${pairs[*]} --backend $BACKEND --memory $MEMORY \
    --batches $BATCHES --new-tokens $SPEED_NEW --runs $RUNS --ids-out $WORK/ids.json --deadline \$DEADLINE \
    --json $WORK/speed.json"
else
  record speed '"skipped"' 0 "no guarded and unguarded pair of bundles"
fi

HF=$($PY -c "import json,sys; print(json.load(open(sys.argv[1])).get('hf_folder', ''))" "$WORK/export.json" 2>/dev/null)
if [[ -n "$HF" && -f "$WORK/ids.json" ]]; then
  stage peer 100 sh -c "$PY bench/gpu_speed.py peer --model $HF --ids-file $WORK/ids.json --device $PEER_DEVICE \
    --batches $BATCHES --new-tokens $SPEED_NEW --runs $RUNS --deadline \$DEADLINE --json $WORK/peer.json"
else
  record peer '"skipped"' 0 "no model folder or prompt ids"
fi

placed=()
for p in fp32 fp16; do have $p && placed+=(--bundle "$p=$B/$p"); done
((${#placed[@]})) && stage placement 60 $PY bench/gpu_speed.py placement "${placed[@]}" --backend "$BACKEND" \
  --memory "$MEMORY" --profile-dir "$WORK/profiles" --json "$WORK/placement.json"

if have fp16-kv16 && have fp16-plain; then
  stage kv16_parity 60 sh -c "$PY bench/gpu_parity.py --reference $B/fp32 --bundle fp16-kv16=$B/fp16-kv16 \
    --backend $BACKEND --memory $MEMORY --n $N --new-tokens $NEW --batch $PARITY_BATCH --fire-per-set 1 \
    --deadline \$DEADLINE --json $WORK/kv16_parity.json"
  stage kv16_speed 60 sh -c "$PY bench/gpu_speed.py runtime --pair fp16-kv16=$B/fp16-kv16,$B/fp16-plain \
    --backend $BACKEND --memory $MEMORY --batches 1,${BATCHES##*,} --new-tokens $SPEED_NEW --runs $RUNS \
    --deadline \$DEADLINE --json $WORK/kv16_speed.json"
fi

if have fp32 && have fp32-plain; then     # fp32 attention may run on the CPU provider: its cache kept there
  STEERGUARD_KV=host stage hostkv_speed 60 sh -c "$PY bench/gpu_speed.py runtime --pair fp32=$B/fp32,$B/fp32-plain \
    --backend $BACKEND --memory $MEMORY --batches 1,${BATCHES##*,} --new-tokens $SPEED_NEW --runs $RUNS \
    --deadline \$DEADLINE --json $WORK/hostkv_speed.json"
fi

log "report"
$PY bench/gpu_report.py report "$WORK" "$OUT" $([[ $DRY == 1 ]] && echo --dry-run)
log "done in ${SECONDS}s: $OUT/gpu.json, $OUT/gpu.md, $LOG"
