#!/usr/bin/env bash
# Rebuilds the committed guest modules from source.
#   scripts/build-guests.sh           rebuild and copy the .wasm files into place
#   scripts/build-guests.sh --check   rebuild and fail if any differs from what is committed
# Exits 3 if the wasm32 target cannot be installed, so CI can say so loudly.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
check=false
[ "${1:-}" = "--check" ] && check=true

if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-unknown-unknown; then
  echo "build-guests: installing the wasm32-unknown-unknown Rust target"
  if ! rustup target add wasm32-unknown-unknown; then
    echo "build-guests: ERROR: the wasm32-unknown-unknown target cannot be installed here;" >&2
    echo "build-guests: ERROR: the committed guest .wasm files were NOT verified against their source." >&2
    exit 3
  fi
fi

# No absolute path of this checkout may end up in a module: CI builds in another folder.
export RUSTFLAGS="-C target-feature=+simd128 -C link-arg=-zstack-size=65536 --remap-path-prefix=$root=. --remap-path-prefix=$HOME=~"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
(cd guest && cargo build --release --locked --target-dir "$out/target")

status=0
for name in uppercase; do
  built="$out/target/wasm32-unknown-unknown/release/$name.wasm"
  committed="guest/$name.wasm"
  if $check; then
    if cmp -s "$built" "$committed"; then
      echo "build-guests: $committed matches its source ($(wc -c <"$built") bytes)"
    else
      echo "build-guests: ERROR: $committed differs from a rebuild of guest/$name; run scripts/build-guests.sh and commit" >&2
      status=1
    fi
  else
    install -m 644 "$built" "$committed"
    echo "build-guests: wrote $committed ($(wc -c <"$committed") bytes)"
  fi
done
exit $status
