#!/usr/bin/env bash
# How long the gateway takes to start serving each component example: cold (an
# empty compile cache: the component is compiled) and warm (the same cache again),
# from starting the process to its "serving" log line. Medians of RUNS (default 3).
#
#   scripts/start-times.sh [RUNS]        (builds the release binary first)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
cargo build --quiet --release --locked --bin wasmgate
bin=target/release/wasmgate
tmp=$(mktemp -d)
trap 'pkill -P $$ 2>/dev/null; rm -rf "$tmp"' EXIT

# Milliseconds from start to the "serving" line, and the load_ms it reports.
start_ms() {
  local module=$1 cache=$2 log=$tmp/log
  : >"$log"
  local t0 t1
  t0=$(date +%s%N)
  "$bin" --module "$module" --listen 127.0.0.1:0 --cache-dir "$cache" --max-memory 256MiB 2>"$log" &
  local pid=$!
  for _ in $(seq 1 6000); do
    grep -q 'serving listener' "$log" && break
    sleep 0.01
  done
  t1=$(date +%s%N)
  kill "$pid"; wait "$pid" 2>/dev/null || true
  local load
  load=$(grep -o 'load_ms=[0-9]*' "$log" | head -1 | cut -d= -f2)
  echo "$(((t1 - t0) / 1000000)) ${load:-?}"
}

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

printf '%-40s %10s %12s %12s %12s\n' module bytes "cold ms" "warm ms" "warm load_ms"
for module in examples/python/python.wasm examples/js/redact.wasm examples/rust-component/router.wasm guest/uppercase.wasm; do
  cold=() warm=() load=()
  for _ in $(seq 1 "$runs"); do
    cache=$(mktemp -d -p "$tmp")
    read -r ms _ < <(start_ms "$module" "$cache"); cold+=("$ms")
    read -r ms l < <(start_ms "$module" "$cache"); warm+=("$ms"); load+=("$l")
    rm -rf "$cache"
  done
  printf '%-40s %10s %12s %12s %12s\n' "$module" "$(wc -c <"$module")" \
    "$(printf '%s\n' "${cold[@]}" | median)" "$(printf '%s\n' "${warm[@]}" | median)" \
    "$(printf '%s\n' "${load[@]}" | median)"
done
