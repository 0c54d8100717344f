#!/usr/bin/env bash
# The C library's build dependencies from Debian's archive (PCRE2, cJSON, utf8proc, libcrypto headers,
# pkg-config, cmake), installed only when missing. Used by the README's test command; run as root.
set -euo pipefail
need=()
for pkg in cmake pkg-config libpcre2-dev libcjson-dev libutf8proc-dev libssl-dev; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
[ ${#need[@]} -eq 0 ] && exit 0
echo "installing ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q "${need[@]}" >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q "${need[@]}" >/dev/null; }
