#!/usr/bin/env bash
# Builds the release binaries and runs the whole benchmark comparison
# (examples/bench.rs): wasmgate vs a native baseline vs the Python seed server.
#   scripts/bench.sh [--runs 3] [--seconds 3] [--no-python]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bins --examples
exec target/release/examples/bench "$@"
