#!/usr/bin/env bash
# Builds the release binaries and runs the whole benchmark comparison:
#   1. examples/bench.rs: wasmgate vs a native baseline vs the Python seed server;
#   2. examples/forward_bench.rs: forwarding (native forwarder, forward.wat, a guest
#      with on_reply, NGINX stream) and the DNS proxy against dnsdist (dnsmasq, dnsperf).
# NGINX, dnsdist, dnsmasq and dnsperf come from Debian (installed here when root);
# a tool that is missing is skipped with a note.
#   scripts/bench.sh [--runs 3] [--seconds 3] [--no-python]
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  missing=()
  for p in nginx libnginx-mod-stream dnsdist dnsmasq-base dnsperf; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "bench: installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null ||
      echo "bench: could not install ${missing[*]}; those comparisons are skipped"
  fi
fi
cargo build --release --bins --examples
target/release/examples/bench "$@"
runs=()
while [ $# -gt 0 ]; do
  case "$1" in
    --runs | --seconds) runs+=("$1" "$2"); shift 2 ;;
    *) shift ;;
  esac
done
exec target/release/examples/forward_bench "${runs[@]}"
