#!/usr/bin/env bash
# A soak (not part of CI): the release binary under steady correct traffic mixed
# with hostile datagrams, a module swap every second (good and broken in turn),
# SIGHUPs and metric scrapes; fails if a correct datagram is lost or wrong, or if
# memory or descriptors grow. Loopback only. See examples/soak.rs.
#   scripts/soak.sh [--minutes 30] [--clients 16] [--rate 500] [--busy 6] [--proving] [--redis]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bin wasmgate --example soak
exec target/release/examples/soak "$@"
