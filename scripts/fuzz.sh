#!/usr/bin/env bash
# Runs the fuzzers in fuzz/ (cargo fuzz, libFuzzer) on the stable toolchain.
#   scripts/fuzz.sh --smoke            each target on a copy of its corpus, 60 s after
#                                      replaying it (CI; about 10 minutes in all here)
#   scripts/fuzz.sh TARGET [SECONDS]   one target, growing its corpus in fuzz/corpus
# Installs cargo-fuzz from crates.io when it is missing. A crash fails the run and
# leaves the input in fuzz/artifacts/TARGET/.
set -euo pipefail
cd "$(dirname "$0")/.."
# cargo fuzz needs nightly-only flags (sanitizer coverage); the stable compiler
# accepts them with RUSTC_BOOTSTRAP.
export RUSTC_BOOTSTRAP=1
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked --version 0.13.2
fi
targets=(guest_boundary load_module proxy_header)
run() { # target seconds corpus-dir
  cargo fuzz run "$1" "$3" fuzz/seeds/"$1" -- -max_total_time="$2" -timeout=20 -rss_limit_mb=4096 -print_final_stats=1
}
if [ "${1:-}" = "--smoke" ]; then
  cargo fuzz build
  for t in "${targets[@]}"; do
    scratch=$(mktemp -d)
    cp -r fuzz/corpus/"$t"/. "$scratch"/ 2>/dev/null || true
    run "$t" 60 "$scratch"
    rm -rf "$scratch"
  done
else
  t=${1:?target: ${targets[*]}}
  mkdir -p fuzz/corpus/"$t"
  run "$t" "${2:-600}" fuzz/corpus/"$t"
fi
