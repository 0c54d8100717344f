#!/usr/bin/env bash
# Unpack one part made by `python bench/device_carry.py plan` into /tmp/sg, on the lent H200, at the start
# of the call that carries it (carry: [".device/parts/partK"]), from the repository root:
#
#   bash bench/device_unpack.sh K
#
# Part 1 starts afresh; part K > 1 needs parts 1..K-1 already in /tmp/sg (same machine: calls back to back,
# it is given back 30 s after each). Every chunk is sha256-checked; a stream whose chunks are all in is
# joined, checked, decompressed (xz), checked again, then installed: a wheel with pip into /tmp/sg/site, a
# file moved to its place, a tar extracted. After the last part it writes /tmp/sg/env.sh and runs the CUDA
# smoke test (bench/device_carry.py smoke). Then, from the repository root:
#
#   source /tmp/sg/env.sh   # PYTHONPATH=/tmp/sg/site:$PWD, PATH with a `steerguard` command,
#                           # STEERGUARD_CACHE=/tmp/sg/cache (the demo GGUF is in its downloads/),
#                           # SG_GUARD=/tmp/sg/guard, SG_DEMO_GGUF, LD_LIBRARY_PATH with the CUDA 13 libraries
#
# Overrides for a dry run on a CPU machine: SG_ROOT (default /tmp/sg), SG_PARTS (default .device/parts),
# SG_SMOKE=cpu (no CUDA expected) or SG_SMOKE=0 (no smoke test), SG_PYTHON (default python3).
set -euo pipefail

SG=${SG_ROOT:-/tmp/sg}
PARTS=${SG_PARTS:-.device/parts}
PY=${SG_PYTHON:-python3}
K=${1:-}

die() { echo "device_unpack: $*" >&2; exit 1; }
now() { date +%s%N; }
since() { local ms=$((($(now) - $1) / 1000000)); printf '%d.%d s' $((ms / 1000)) $((ms % 1000 / 100)); }
say() { printf 'device_unpack: %s\n' "$*"; }

check_args() {
  [[ $K =~ ^[1-9][0-9]*$ ]] || die "usage: bash bench/device_unpack.sh PART (a part number: 1, 2, ...)"
  [ -f "$PARTS/part$K/INFO" ] || die "$PARTS/part$K is missing: name .device/parts/part$K in this call's carry"
  read -r _ TOTAL <"$PARTS/part$K/INFO"
}

start_or_continue() {
  if [ "$K" = 1 ]; then
    rm -rf "$SG"
    mkdir -p "$SG/chunks" "$SG/site" "$SG/staging" "$SG/done"
    return
  fi
  for ((j = 1; j < K; j++)); do
    [ -f "$SG/done/part$j" ] ||
      die "part $j is not in $SG: this machine is not the one that unpacked it (a fresh machine is bare); start again with part 1"
  done
}

take_chunks() {
  local bad
  bad=$(cd "$PARTS/part$K" && sha256sum --strict -c SHA256SUMS 2>/dev/null | grep -v ': OK$' | cut -d: -f1 | xargs) || true
  [ -z "$bad" ] || die "part $K: $bad failed its sha256 check"
  while read -r _ file; do
    cp "$PARTS/part$K/$file" "$SG/chunks/$file"
  done <"$PARTS/part$K/SHA256SUMS"
}

decompress() {  # xz file -> plain file
  if command -v xz >/dev/null; then
    xz -dc "$1" >"$2"
  else
    "$PY" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"), 1 << 22)' "$1" "$2"
  fi
}

check_sha() {  # file expected what
  local got
  got=$(sha256sum "$1" | cut -d' ' -f1)
  [ "$got" = "$2" ] || die "$3 failed its sha256 check (got ${got:0:12}..., want ${2:0:12}...)"
}

install_stream() {  # name action dest file
  case $2 in
    wheel)
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --root-user-action=ignore \
        --disable-pip-version-check --target "$SG/site" "$4" \
        || die "pip could not install $1"
      rm -f "$4" ;;
    file)
      mkdir -p "$(dirname "$SG/$3")"
      mv "$4" "$SG/$3" ;;
    untar)
      mkdir -p "$SG/$3"
      tar -xf "$4" -C "$SG/$3"
      rm -f "$4" ;;
    *) die "unknown action $2 for $1 in STREAMS" ;;
  esac
}

assemble_ready_streams() {
  local name count transport final action dest i t0
  while read -r name count transport final action dest; do
    [ -f "$SG/done/$name" ] && continue
    for ((i = 1; i <= count; i++)); do
      [ -f "$SG/chunks/$name.xz.$(printf %03d "$i")" ] || continue 2
    done
    t0=$(now)
    for ((i = 1; i <= count; i++)); do cat "$SG/chunks/$name.xz.$(printf %03d "$i")"; done >"$SG/staging/$name.xz"
    rm -f "$SG/chunks/$name".xz.*
    check_sha "$SG/staging/$name.xz" "$transport" "$name (joined)"
    decompress "$SG/staging/$name.xz" "$SG/staging/$name"
    rm -f "$SG/staging/$name.xz"
    check_sha "$SG/staging/$name" "$final" "$name"
    install_stream "$name" "$action" "$dest" "$SG/staging/$name"
    touch "$SG/done/$name"
    say "$name in place ($action) in $(since "$t0")"
  done <"$PARTS/part$K/STREAMS"
}

nvidia_library_dirs() {
  "$PY" - <<'PY'
import glob, os, site
dirs = {os.path.dirname(p) for sp in site.getsitepackages()
        for p in glob.glob(os.path.join(sp, "nvidia", "**", "lib*.so*"), recursive=True)}
print(":".join(sorted(dirs)))
PY
}

write_env() {
  local libs
  libs=$(nvidia_library_dirs)
  mkdir -p "$SG/bin"
  printf '#!/bin/sh\nexec %s -m steerguard "$@"\n' "$PY" >"$SG/bin/steerguard"
  chmod +x "$SG/bin/steerguard"
  cat >"$SG/env.sh" <<EOF
# written by bench/device_unpack.sh; source it from the repository root
export SG_ROOT=$SG
export PYTHONPATH="$SG/site:\$PWD\${PYTHONPATH:+:\$PYTHONPATH}"
export PATH="$SG/bin:\$PATH"
export STEERGUARD_CACHE=$SG/cache
export SG_GUARD=$SG/guard
export SG_DEMO_GGUF=$SG/cache/downloads/SmolLM2-135M-Instruct.Q4_1.gguf
EOF
  [ -z "$libs" ] || echo "export LD_LIBRARY_PATH=\"$libs\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}\"" >>"$SG/env.sh"
  cat >>"$SG/env.sh" <<EOF
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
EOF
}

finish() {
  write_env
  say "all $TOTAL parts in $SG; next: source $SG/env.sh"
  case ${SG_SMOKE:-1} in
    0) ;;
    cpu) (source "$SG/env.sh" && "$PY" bench/device_carry.py smoke --cpu-only) || die "smoke test failed" ;;
    *) (source "$SG/env.sh" && "$PY" bench/device_carry.py smoke) || die "smoke test failed" ;;
  esac
}

main() {
  local t0
  t0=$(now)
  check_args
  start_or_continue
  take_chunks
  assemble_ready_streams
  touch "$SG/done/part$K"
  say "part $K of $TOTAL unpacked in $(since "$t0")"
  if [ "$K" = "$TOTAL" ]; then finish; fi
}

main
